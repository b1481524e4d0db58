"""Chapter 16 with the metadata in the training loss (a product of experts), the experiment behind its note.

Eq 16.3 pools a finished image model with p(y | m) after training. This script instead trains the image model on
the logits z(x) + A·(log p(y | m) − log π), with p(y | m) the chapter's metadata model fitted on the training split
first, so that the network learns only what the patient's age, sex and site do not already say. Validation selection
scores the same sum (1 view). It writes a copy of `nbs/16_skin_classifier.ipynb` with one cell that swaps the loss
and the selection inside `skindiff.classifier` (a second cell saves the raw probabilities to `probs.pt`) and runs it
through papermill with the `cpu` profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size). Afterwards
the notebook's z(x) alone is the "image" row, and its eq 16.3 row (α fitted on validation NLL) is the joint model.

    python benchmarks/skin_joint_metadata.py --seed 2 --out runs/s2_joint1 --alpha 1
"""
from __future__ import annotations
from _common import chapter16_args, run_chapter16_with

SWAP = '''
JOINT_ALPHA = {alpha}   # A: the weight of the metadata offset in the training loss
import skindiff.classifier as _sc, torch.nn.functional as _F
from skindiff.metadata import fit_metadata_model as _fit_mm
_ytr = data["train"][1]
_lp = torch.tensor(np.log(np.bincount(_ytr.numpy(), minlength=len(CLASSES))/len(_ytr)))
_mm = _fit_mm(rows["train"], _ytr, CLASSES, log_prior=_lp.numpy())
OFF = {{s: (JOINT_ALPHA*(_mm.log_prob(rows[s]) - _lp)).float() for s in ("train", "val", "test")}}
assert len(OFF["val"]) != len(OFF["test"]) and len(OFF["val"]) != len(OFF["train"])
_orig_train, _orig_pp = _sc.train, _sc.predict_proba
def _train(model, loss_fn, data_, cfg, **kw):          # the training rows carry their offsets N×C
    assert isinstance(data_, tuple) and len(data_) == 2 and len(data_[0]) == len(OFF["train"])
    return _orig_train(model, loss_fn, (data_[0], data_[1], OFF["train"]), cfg, **kw)
def _loss_maker(n, weight=None, label_smoothing=0.0, crop=1.0, cutmix=0.0):   # cached_trunk_loss_fn plus the offset
    assert cutmix == 0
    def loss_fn(model, batch, generator):
        h, y, off = batch
        k = torch.randint(0, h.shape[1], (len(h),), generator=generator, device=generator.device).to(h.device)
        hk = _sc.random_feature_crop(h[torch.arange(len(h), device=h.device), k].float(), crop, generator)
        logits = _sc.head_forward(model, hk.contiguous(memory_format=torch.channels_last), n).float() + off
        w = None if weight is None else weight.to(logits.device, torch.float32)
        return _F.cross_entropy(logits, y, weight=w, label_smoothing=label_smoothing)
    return loss_fn
def _pp(model, images, mean, std, *a, **kw):           # validation selection on z(x) + offset
    q = _orig_pp(model, images, mean, std, *a, **kw)
    assert len(images) == len(OFF["val"])
    return (q.clamp_min(1e-12).log() + OFF["val"]).softmax(1)
_sc.train, _sc.predict_proba, _sc.cached_trunk_loss_fn = _train, _pp, _loss_maker
'''
SAVE = '''
_sc.train, _sc.predict_proba = _orig_train, _orig_pp
torch.save(dict(p=p, yv=yv, yt=data["test"][1], off=OFF, T=T_star), run.path("probs.pt"))
'''


def main() -> None:
    args = chapter16_args(__doc__, "--alpha", 1.0, "A, the weight of the metadata offset in the loss")
    run_chapter16_with([("def make_config", SWAP.format(alpha=args.alpha)), ("+T_star = fit_temperature", SAVE)], args.out, args.seed)


if __name__ == "__main__":
    main()
