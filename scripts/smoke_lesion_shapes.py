"""Chapters 18 and 19 at a profile's shape (default: gpu) with fewer steps, samples and NFEs than `skindiff study --smoke`.

A smoke run keeps the profile's NFEs and the notebooks' ci counts; at the gpu profile's 64 px U-Net (23 M parameters)
that is hours of 2 CPU cores. This checks the same shapes (U-Net, resolution, guidance scales, SDEdit, 128 px
classifier input, precisions) in about 11 minutes there:

    python scripts/smoke_lesion_shapes.py --out runs/gpu_smoke_lesions [--profile gpu] [--device cpu]

Its numbers are not results: the records carry the profile name `<profile>-smoke`."""
import argparse, time
from pathlib import Path

import papermill as pm

from skindiff import study
from skindiff.data import find_data_root

FEWER_18 = dict(train_steps=6, batch_size=8, warmup_steps=1, nfe=4, sdedit_nfe=4, n_per_class=4, grid_per_class=2,
                n_parents=1, k_variants=2)
# chapter 19 reuses chapter 18's checkpoint, so the recipe fields agree
FEWER_19 = {k: FEWER_18[k] for k in ("train_steps", "batch_size", "warmup_steps")} | dict(
    seeds=[0], max_per_split=40, gen_nfe=4, max_parents=8, k_variants=2, clf_steps=6, clf_batch=16, eval_every=3)

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (the executed notebooks go there too)")
    p.add_argument("--profile", default="gpu", choices=list(study.PROFILES))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--data", default=None, help="data root (default: the usual search)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve(); out.mkdir(parents=True, exist_ok=True)
    common = dict(profile=f"{a.profile}-smoke", out_dir=str(out), data_root=str(find_data_root(a.data, need="ham10000")),
                  device=a.device, seed=0)
    for ch, fewer in (("18_lesion_diffusion", FEWER_18), ("19_adversarial", FEWER_19)):
        params = common | study.smoke_parameters(study.PROFILES[a.profile].get(ch, {})) | fewer
        print(ch, {k: v for k, v in params.items() if k not in common}, flush=True)
        t = time.time()
        pm.execute_notebook(str(study.notebooks_dir()/f"{ch}.ipynb"), str(out/f"{ch}.ipynb"), parameters=params,
                            kernel_name="python3", cwd=str(study.notebooks_dir()), progress_bar=False)
        print(f"{ch}: {time.time()-t:.0f} s", flush=True)

if __name__ == "__main__": main()
