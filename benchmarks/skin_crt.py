"""Classifier re-training (cRT, Kang et al. 2020) on a chapter-16 model's frozen features, the experiment behind a note.

Kang et al. decouple long-tailed learning: learn the features without class weights, then re-learn only the final
linear layer with class-balanced weights on the frozen features. This script takes trained classifiers (a
checkpoint or a saved model; every member of an ensemble counts), computes their pooled features of the
lesion-grouped split of `--seed` at the model's image size (training images: 1 view; validation and test: the 8
dihedral views), and refits each member's linear layer by L-BFGS on the weighted cross-entropy of eq 15.1 (w_c ∝ (N / C n_c)^p) plus
λ|W|², starting from the trained layer. It prints validation and test accuracy / balanced accuracy / macro AUC of the
members' mean 8-view probability for the trained layers and for each (p, λ), and the members' training accuracy.

    python benchmarks/skin_crt.py --seed 2 runs/s2_drw_none/checkpoints/16_skin_classifier/lesion/ckpt_00000600.pt \\
        runs/s2_drw_none/checkpoints/16_skin_classifier/lesion_1/ckpt_00000600.pt
"""
from __future__ import annotations
import argparse, time

import torch
import torch.nn.functional as F

from skindiff.classifier import DIHEDRAL_VIEWS, classification_metrics, dihedral_view, load_classifier, normalise
from skindiff.skin import SKIN_CLASSES, skin_split, skin_tensors

CLASSES = list(SKIN_CLASSES)
POWERS = (0.5, 0.75, 1.0)        # p of eq 15.1: square root to inverse frequency
RIDGES = (1e-4, 1e-3, 1e-2)      # λ


@torch.no_grad()
def pooled_features(model, x, mean, std, views, batch: int = 128) -> torch.Tensor:
    "N×V×F pooled features (pre-logits) of uint8 images `x` N×3×H×W under the dihedral `views`."
    out = []
    for i in range(0, len(x), batch):
        xb = normalise(x[i:i + batch], mean, std)
        out.append(torch.stack([model.forward_head(model.forward_features(dihedral_view(xb, k).contiguous(memory_format=torch.channels_last)),
                                                   pre_logits=True) for k in views], 1))
    return torch.cat(out)


def refit_layer(X: torch.Tensor, y: torch.Tensor, p: float, lam: float, W0: torch.Tensor, b0: torch.Tensor) -> tuple:
    "The linear layer minimising the p-weighted cross-entropy on features X N×F + λ|W|², from (W0, b0)."
    n = torch.bincount(y, minlength=len(CLASSES)).double()
    w = (n.sum()/(len(CLASSES)*n))**p
    w = w/w[y].mean()
    lin = torch.nn.Linear(X.shape[1], len(CLASSES)).double()
    with torch.no_grad(): lin.weight.copy_(W0); lin.bias.copy_(b0)
    Xd = X.double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=300, tolerance_grad=1e-7, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(Xd), y, weight=w) + lam*lin.weight.pow(2).sum()
        loss.backward(); return loss
    opt.step(closure)
    return lin.weight.detach().float(), lin.bias.detach().float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoints or saved classifiers")
    ap.add_argument("--seed", type=int, default=0, help="the lesion split (chapter 16's seed)")
    ap.add_argument("--data", default=None, help="folder holding ham10000/ (default: the usual search)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    table = skin_split(args.data, scheme="lesion", seed=args.seed)
    members, feats = [], []
    for path in args.models:
        model, meta = load_classifier(path)
        size = int(meta["image_size"])
        data = {s: skin_tensors(table, s, size) for s in ("train", "val", "test")}
        for m in (list(model.members) if hasattr(model, "members") else [model]):
            t = time.time(); layer = m.eval().get_classifier()
            feats.append(dict(W=layer.weight.detach().clone(), b=layer.bias.detach().clone(),
                              train=pooled_features(m, data["train"][0], meta["mean"], meta["std"], (0,))[:, 0],
                              **{s: pooled_features(m, data[s][0], meta["mean"], meta["std"], range(DIHEDRAL_VIEWS)) for s in ("val", "test")}))
            print(f"{path}: member features in {time.time() - t:.0f} s", flush=True)
    y = {s: data[s][1] for s in ("train", "val", "test")}
    score = lambda s, q: "/".join(f"{classification_metrics(y[s].numpy(), q, CLASSES)[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "macro_auc"))
    mean_prob = lambda layers, s: sum((f[s] @ W.T + b).softmax(-1).mean(1) for f, (W, b) in zip(feats, layers))/len(feats)
    trained = [(f["W"], f["b"]) for f in feats]
    for f, (W, b) in zip(feats, trained):
        print("member on its training images (1 view):", score("train", (f["train"] @ W.T + b).softmax(-1)))
    print(f"trained layers:       val {score('val', mean_prob(trained, 'val'))}  test {score('test', mean_prob(trained, 'test'))}")
    for p in POWERS:
        for lam in RIDGES:
            layers = [refit_layer(f["train"], y["train"], p, lam, f["W"].double(), f["b"].double()) for f in feats]
            print(f"cRT p={p:<4} λ={lam:<6g}: val {score('val', mean_prob(layers, 'val'))}  test {score('test', mean_prob(layers, 'test'))}", flush=True)


if __name__ == "__main__":
    main()
