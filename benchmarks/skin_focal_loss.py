"""Chapter 16 with a focal loss (Lin et al., 2017) in place of eq 15.2, the experiment behind its note.

The focal loss multiplies each image's weighted, label-smoothed cross-entropy (eq 15.2) by (1 − p_y)^γ, p_y the
model's probability of the true class, so that images the network already gets right count less and the hard ones,
mostly of the rare classes, count more. This script writes a copy of `nbs/16_skin_classifier.ipynb` with one cell
that swaps the cached-trunk loss inside `skindiff.classifier` and runs it through papermill with the `cpu` profile
(`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size). Everything else, validation selection included, is
the chapter's.

    python benchmarks/skin_focal_loss.py --seed 2 --out runs/s2_focal2 --gamma 2
"""
from __future__ import annotations
from _common import CACHED_VIEW_LOGITS, chapter16_args, run_chapter16_with

SWAP = CACHED_VIEW_LOGITS + '''
FOCAL_GAMMA = {gamma}   # γ of the focal loss
import torch.nn.functional as _F
def _loss_maker(n, weight=None, label_smoothing=0.0, crop=1.0, cutmix=0.0):   # cached_trunk_loss_fn, focal
    assert cutmix == 0
    def loss_fn(model, batch, generator):
        logits, y = _cached_view_logits(model, batch, generator, n, crop)
        w = torch.ones(logits.shape[1], device=logits.device) if weight is None else weight.to(logits.device, torch.float32)
        ce = _F.cross_entropy(logits, y, weight=w, label_smoothing=label_smoothing, reduction="none")   # eq 15.2 per image, before the division
        p_y = logits.log_softmax(1).gather(1, y[:, None])[:, 0].exp()
        return ((1 - p_y).pow(FOCAL_GAMMA)*ce).sum()/w[y].sum()
    return loss_fn
_sc.cached_trunk_loss_fn = _loss_maker
'''


def main() -> None:
    args = chapter16_args(__doc__, "--gamma", 2.0, "γ of the focal loss (0: eq 15.2 itself)")
    run_chapter16_with([("def make_config", SWAP.format(gamma=args.gamma))], args.out, args.seed)


if __name__ == "__main__":
    main()
