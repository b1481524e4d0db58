"""Quality of one lesion-classifier member under variations of the cached-trunk recipe (chapter 16's `cpu` profile,
one member), printed as lesion-grouped validation and test accuracy / balanced accuracy / macro AUC with 8-view TTA.

It is the script behind the single-member rows of chapter 16's recipe table. One member is one seed, so a single
difference of a few points is within the run-to-run noise (about ±0.02 balanced accuracy). The trunk cache
(`trunk_features`, eq 15.6) is saved under `--cache` and reused by later runs with the same `--arch` and `--freeze`. Variants:

- `--steps N`: the length of the cosine schedule (the profile: 1600);
- `--crop K`: train on a random K×K crop of the cached feature maps (a random translation of the image, up to
  stride × (size − K) px) and test on the whole map;
- `--la TAU --imbalance none`: the logit-adjusted loss (Menon et al., 2021), cross-entropy of logits + τ log π, in
  place of class weights;
- `--freeze 3`: cache one stage more (cheaper steps, fewer trained layers);
- `--arch tf_efficientnet_lite2`: another EfficientNet-Lite with offline weights (Lite0, Lite1, Lite2);
- `--drop-path P`: stochastic depth in the trained blocks (timm's `drop_path_rate`, a linear ramp up to P);
- `--smoothing E`: the label smoothing ε of eq 15.2 (the profile: 0.1);
- `--cutmix P`: CutMix on the cached maps (`feature_cutmix`, eq 15.8) in a batch with probability P;
- `--split-seed S`: another lesion-grouped split (chapter 16's `--seed`; the default 0 is the profile's).

It prints the selected EMA weights, the last ones, and their mean ("both": one member of chapter 16 with `keep_last`).

Not a test: run it by hand, one at a time (it uses both cores for 6–12 minutes), e.g.

    python benchmarks/skin_recipes.py --steps 1600 --crop 28
"""
from __future__ import annotations
import argparse, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skindiff.core import cache_dir
from skindiff.skin import SKIN_CLASSES, skin_split, skin_tensors
from skindiff import classifier as clf
from skindiff.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="folder holding ham10000/ (default: the usual search)")
    ap.add_argument("--size", type=int, default=128); ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--every", type=int, default=400, help="steps between validation scores (model selection)")
    ap.add_argument("--arch", default=clf.LITE0_ARCH, choices=list(clf.LITE_WEIGHTS), help="EfficientNet-Lite with offline weights")
    ap.add_argument("--seed", type=int, default=0); ap.add_argument("--freeze", type=int, default=2)
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the lesion-grouped split")
    ap.add_argument("--smoothing", type=float, default=0.1, help="label smoothing ε (eq 15.2)")
    ap.add_argument("--drop-path", type=float, default=0.0, help="stochastic-depth rate (timm drop_path_rate)")
    ap.add_argument("--crop", type=int, default=0, help="random crop side of the cached feature maps (0: none)")
    ap.add_argument("--cutmix", type=float, default=0.0, help="probability of a CutMixed batch (eq 15.8; 0: off)")
    ap.add_argument("--la", type=float, default=0.0, help="τ of the logit-adjusted loss (0: off)")
    ap.add_argument("--imbalance", default="sqrt", choices=list(clf.IMBALANCE_POWERS))
    ap.add_argument("--cache", default=str(cache_dir()/"bench_skin_recipes"), help="folder for the trunk cache")
    ap.add_argument("--save-probs", default=None, help="save the val/test TTA probabilities (torch file) for ensemble analysis")
    a = ap.parse_args()
    classes = list(SKIN_CLASSES)
    table = skin_split(a.data, scheme="lesion", seed=a.split_seed)
    data = {s: skin_tensors(table, s, a.size) for s in ("train", "val", "test")}
    mean, std = clf.normalisation(a.arch)
    (x, y), (xv, yv), (xt, yt) = data["train"], data["val"], data["test"]
    torch.manual_seed(a.seed)
    model = clf.freeze_stages(clf.create_classifier(len(classes), a.arch, drop_path_rate=a.drop_path), a.freeze).to(memory_format=torch.channels_last)
    t0 = time.time()
    clf.adapt_trunk_batchnorm(model, x, mean, std, a.freeze)
    path = Path(a.cache)/(f"trunk_{a.arch}_{a.size}px_freeze{a.freeze}" + (f"_split{a.split_seed}" if a.split_seed else "") + ".pt")
    if path.is_file(): h_all = torch.load(path, weights_only=True)
    else:
        h_all = clf.trunk_features(model, x, mean, std, a.freeze, clf.Augment(), seed=0)
        path.parent.mkdir(parents=True, exist_ok=True); torch.save(h_all, path)
    print(f"trunk cache {tuple(h_all.shape)} ready in {time.time() - t0:.0f} s", flush=True)
    weight = clf.class_weights(y, len(classes), a.imbalance)
    log_prior = torch.log(torch.bincount(y, minlength=len(classes)).float()/len(y))

    if a.la and a.cutmix: ap.error("--la and --cutmix: the logit-adjusted loss has no CutMix here")
    crop = a.crop/h_all.shape[-1] if a.crop else 1.0

    def la_loss_fn(model, batch, g):          # the logit-adjusted loss: cross-entropy of logits + τ log π
        h, yb = batch
        hk = clf.random_feature_crop(h[torch.arange(len(h)), torch.randint(0, h.shape[1], (len(h),), generator=g)].float(), crop, g)
        logits = clf.head_forward(model, hk.contiguous(memory_format=torch.channels_last), a.freeze).float()
        return F.cross_entropy(logits + a.la*log_prior, yb, weight=weight, label_smoothing=a.smoothing)

    loss_fn = la_loss_fn if a.la else clf.cached_trunk_loss_fn(a.freeze, weight, a.smoothing, crop, a.cutmix)

    cfg = TrainConfig(steps=a.steps, batch_size=64, lr=1e-3, weight_decay=0.05, warmup_steps=max(1, round(0.05*a.steps)),
                      lr_schedule="cosine", ema_decay=0.995, ckpt_every=a.steps, seed=a.seed)
    hist, best, t1 = [], None, time.time()
    with tempfile.TemporaryDirectory(prefix="skin-recipes-") as ck:
        for stop in range(a.every, a.steps + 1, a.every):
            res = train(model, loss_fn, (h_all, y), cfg, ckpt_dir=ck, progress=False, stop_at=stop)
            m = clf.classification_metrics(yv.numpy(), clf.predict_proba(res.ema, xv, mean, std).numpy().astype(np.float64), classes)
            hist.append((stop, round(m["accuracy"], 3), round(m["balanced_accuracy"], 3)))
            if best is None or m["balanced_accuracy"] > best[0]:
                best = (m["balanced_accuracy"], stop, {k: v.clone() for k, v in res.ema.state_dict().items()})
    train_s = time.time() - t1
    last = {k: v.clone() for k, v in res.ema.state_dict().items()}
    print(f"validation (1 view) by step: {hist}; selected step {best[1]}; training {train_s:.0f} s", flush=True)
    probs = {}
    for tag, state in (("selected", best[2]), ("last", last)):   # the selected EMA, and the last one (chapter 16's keep_last)
        res.ema.load_state_dict(state)
        for split, xx in (("val", xv), ("test", xt)):
            probs[tag, split] = clf.predict_proba(res.ema, xx, mean, std, tta=True).numpy().astype(np.float64)
    for split, yy in (("val", yv), ("test", yt)):
        probs["both", split] = (probs["selected", split] + probs["last", split])/2
        for tag in ("selected", "last", "both"):
            m = clf.classification_metrics(yy.numpy(), probs[tag, split], classes)
            print(f"{split:4s} {tag:8s} 8-view TTA: accuracy {m['accuracy']:.3f}  balanced accuracy {m['balanced_accuracy']:.3f}  "
                  f"macro AUC {m['macro_auc']:.3f}")
    if a.save_probs: torch.save(dict(probs=probs, y_val=yv, y_test=yt, args=vars(a)), a.save_probs)


if __name__ == "__main__":
    main()
