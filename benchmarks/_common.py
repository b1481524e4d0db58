"""Shared pieces of the benchmark scripts: peak memory, and running one measurement in its own process."""
from __future__ import annotations
import json, resource, subprocess, sys


def peak_mib(cuda: bool) -> tuple[float, str]:
    "Peak memory of this process in MiB and what was measured: CUDA max_memory_allocated, else max RSS (Linux: KiB)."
    if cuda:
        import torch
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def run_worker(script: str, args: list[str], what: str) -> dict:
    """Run `python script *args` in a fresh process (so its peak memory is its own) and return the JSON object
    it prints on its last line; exit with `what` and the worker's stderr if it fails."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode: sys.exit(f"{what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# Source for a code cell of a chapter-16 experiment that swaps chapter 15's cached-trunk loss: the logits of one random
# cached view per image (optionally cropped), drawn from the generator in the same order as `cached_trunk_loss_fn`.
CACHED_VIEW_LOGITS = '''
import skindiff.classifier as _sc
def _cached_view_logits(model, batch, generator, n, crop):
    "(logits N×classes float32, labels N) of one random cached view per image, as cached_trunk_loss_fn draws it."
    h, y = batch[0], batch[1]
    k = torch.randint(0, h.shape[1], (len(h),), generator=generator, device=generator.device).to(h.device)
    hk = _sc.random_feature_crop(h[torch.arange(len(h), device=h.device), k].float(), crop, generator)
    return _sc.head_forward(model, hk.contiguous(memory_format=torch.channels_last), n).float(), y
'''


def chapter16_args(doc: str, option: str, default: float, help: str):
    """The command line of a chapter-16 experiment script: `--seed` (the split), `--out` (the run folder) and its one
    numeric `option` (e.g. '--gamma')."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the lesion split, training and the bootstrap")
    ap.add_argument("--out", required=True, help="run folder")
    ap.add_argument(option, type=float, default=default, help=help)
    return ap.parse_args()


def run_chapter16_with(cells: list[tuple[str, str]], out: str, seed: int) -> None:
    """Run a copy of `nbs/16_skin_classifier.ipynb` through papermill with the `cpu` profile (`SKIN_CLASSIFIER_CPU`,
    the DermaMNIST part at its `ci` size) into the run folder `out`, with extra code cells: each (anchor, source) of
    `cells` is inserted before the first cell whose source holds `anchor` ('+' before the anchor: after it)."""
    import time, uuid
    from pathlib import Path
    import papermill as pm
    from skindiff.study import KERNEL_ARGS, SKIN_CLASSIFIER_CPU
    root = Path(__file__).resolve().parents[1]
    nb = json.loads((root/"nbs"/"16_skin_classifier.ipynb").read_text())
    for anchor, src in cells:
        after = anchor.startswith("+")
        i = next(i for i, c in enumerate(nb["cells"]) if anchor.lstrip("+") in "".join(c["source"]))
        nb["cells"].insert(i + after, dict(cell_type="code", execution_count=None, id=uuid.uuid4().hex[:8], metadata={},
                                           outputs=[], source=src))
    dest = Path(out).resolve(); dest.mkdir(parents=True, exist_ok=True)
    src_nb = dest/"16_source.ipynb"; src_nb.write_text(json.dumps(nb))
    params = dict(SKIN_CLASSIFIER_CPU, profile="cpu", out_dir=str(dest), data_root=None, device=None, seed=seed,
                  dm_max_images=700, dm_train_steps=24, dm_eval_every=12, dm_input_size=32)
    t0 = time.time()
    pm.execute_notebook(str(src_nb), str(dest/"16_skin_classifier.ipynb"), parameters=params, kernel_name="python3",
                        cwd=str(root/"nbs"), log_output=False, progress_bar=False, extra_arguments=KERNEL_ARGS)
    print(f"done in {time.time() - t0:.0f} s; results in {dest/'results'/'16_skin_classifier.json'}")
