"""Chapter 16 with eq 15.2's label smoothing as written, the experiment behind its note.

PyTorch's `F.cross_entropy(weight=w, label_smoothing=ε)`, which the chapter trains with, weights the smoothing term
of each image by every class's own weight, ε/C Σ_c w_c (−log p_c), and divides by Σ_i w_{y_i}. With square-root class
weights the loss-optimal target of an nv image then puts about 0.70 on nv and most of the rest on df and vasc: a
second push towards the rare classes on top of the class weights. Eq 15.2 as first written weights an image's whole
smoothed loss by w_{y_i}, so the optimal target is 1 − ε + ε/C on the true class for every image. This script writes a
copy of `nbs/16_skin_classifier.ipynb` with one cell that swaps the cached-trunk loss inside `skindiff.classifier`
for that form and runs it through papermill with the `cpu` profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its
`ci` size). Everything else, validation selection included, is the chapter's.

    python benchmarks/skin_smoothing_form.py --seed 2 --out runs/s2_smooth_y
"""
from __future__ import annotations
from _common import CACHED_VIEW_LOGITS, run_chapter16_with

SWAP = CACHED_VIEW_LOGITS + '''
def _loss_maker(n, weight=None, label_smoothing=0.0, crop=1.0, cutmix=0.0):   # cached_trunk_loss_fn, w_y-weighted smoothing
    assert cutmix == 0
    def loss_fn(model, batch, generator):
        logits, y = _cached_view_logits(model, batch, generator, n, crop)
        logp = logits.log_softmax(1)
        w = torch.ones(logits.shape[1], device=logits.device) if weight is None else weight.to(logits.device, torch.float32)
        eps = label_smoothing
        per_image = -(1 - eps)*logp.gather(1, y[:, None])[:, 0] - eps*logp.mean(1)
        return (w[y]*per_image).sum()/w[y].sum()
    return loss_fn
_sc.cached_trunk_loss_fn = _loss_maker
'''


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the lesion split, training and the bootstrap")
    ap.add_argument("--out", required=True, help="run folder")
    args = ap.parse_args()
    run_chapter16_with([("def make_config", SWAP)], args.out, args.seed)


if __name__ == "__main__":
    main()
