"""Chapters 18 and 19 at a profile's shape (default: gpu) with fewer steps, samples and NFEs than `skindiff study --smoke`.

A smoke run keeps the profile's NFEs and the notebooks' ci counts; at the gpu profile's 64 px U-Net (23 M parameters)
that is hours of 2 CPU cores. This checks the same shapes (U-Net, resolution, guidance scales, SDEdit, 128 px
classifier input, precisions) in about 11 minutes there, through the study runner (`--smoke` plus the overrides below):

    python scripts/smoke_lesion_shapes.py --out runs/gpu_smoke_lesions [--profile gpu] [--device cpu]

Its numbers are not results: the records carry the profile name `<profile>-smoke`."""
import argparse

from skindiff import study

FEWER_18 = dict(train_steps=6, batch_size=8, warmup_steps=1, nfe=4, sdedit_nfe=4, n_per_class=4, grid_per_class=2,
                n_parents=1, k_variants=2)
# chapter 19 reuses chapter 18's checkpoint, so the recipe fields agree
FEWER_19 = {k: FEWER_18[k] for k in ("train_steps", "batch_size", "warmup_steps")} | dict(
    seeds=[0], max_per_split=40, gen_nfe=4, max_parents=8, k_variants=2, clf_steps=6, clf_batch=16, eval_every=3)
OVERRIDES = {"18_lesion_diffusion": FEWER_18, "19_adversarial": FEWER_19}

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--profile", default="gpu", choices=list(study.PROFILES))
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--data", default=None, help="data root (default: the usual search)")
    a = p.parse_args(argv)
    study.run_study(a.profile, a.out, only=list(OVERRIDES), data=a.data, device=a.device, smoke=True, overrides=OVERRIDES,
                    log=lambda m: print(m, flush=True))

if __name__ == "__main__": main()
