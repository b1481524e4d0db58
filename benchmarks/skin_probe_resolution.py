"""Linear probe of frozen ImageNet EfficientNet-Lite features on HAM10000 lesions shown at several input sizes.

The lesion images are decoded at `--source` px (chapter 16's 128) and upsampled (bilinear, antialiased, as
`resize_images` does) to each `--sizes` px before the frozen, ImageNet-pretrained network. So every size carries the
same information, and any difference comes from the scale at which the pretrained filters see the lesion. A
multinomial logistic regression (square-root class weights, eq 15.1; L-BFGS; ridge `--l2`) is fitted on the pooled
features of `--n-train` training images of the lesion-grouped split `--split-seed`. It prints validation accuracy,
balanced accuracy and macro AUC, with the seconds each size took.

It is behind chapter 16's "Upsampling the input" paragraph (`--l2 0.001 0.01`, the defaults). Not a test: run it by
hand, one at a time (it uses both cores for about 5 minutes):

    python benchmarks/skin_probe_resolution.py --sizes 128 160 192
"""
from __future__ import annotations
import argparse, time

import torch
import torch.nn.functional as F

from skindiff.classifier import class_weights, classification_metrics, create_classifier, extract_features, normalisation
from skindiff.data import resize_images
from skindiff.skin import SKIN_CLASSES, skin_split, skin_tensors


def probe(f_train: torch.Tensor, y_train: torch.Tensor, f_val: torch.Tensor, weight: torch.Tensor, l2: float) -> torch.Tensor:
    "Validation probabilities of a class-weighted multinomial logistic regression fitted on standardised features."
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = ((f_train - mu)/sd).double(), ((f_val - mu)/sd).double()
    lin = torch.nn.Linear(a.shape[1], len(weight)).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), y_train, weight=weight.double()) + l2*lin.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad(): return lin(b).softmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tf_efficientnet_lite2")
    ap.add_argument("--source", type=int, default=128, help="px the images are decoded at (their information)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 160, 192], help="px the network sees (upsampled)")
    ap.add_argument("--n-train", type=int, default=2500, help="training images for the probe (a seeded random subset)")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="folder holding ham10000/ (default: the usual search)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads())); torch.manual_seed(0)
    classes = list(SKIN_CLASSES)
    table = skin_split(args.data, scheme="lesion", seed=args.split_seed)
    x_tr, y_tr = skin_tensors(table, "train", args.source)
    x_val, y_val = skin_tensors(table, "val", args.source)
    keep = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(0))[:args.n_train]
    x_tr, y_tr = x_tr[keep], y_tr[keep]
    model = create_classifier(len(classes), args.arch).eval()
    mean, std = normalisation(args.arch)
    weight = class_weights(y_tr, len(classes), "sqrt")
    print(f"{args.arch}, {len(x_tr)} training / {len(x_val)} validation images decoded at {args.source} px (split {args.split_seed})")
    for size in args.sizes:
        t = time.time()
        f_tr = extract_features(model, resize_images(x_tr, size), mean, std)
        f_val = extract_features(model, resize_images(x_val, size), mean, std)
        for l2 in args.l2:
            m = classification_metrics(y_val, probe(f_tr, y_tr, f_val, weight, l2), classes)
            print(f"  {size:>4} px, l2 {l2:g}: validation accuracy {m['accuracy']:.3f}, balanced accuracy "
                  f"{m['balanced_accuracy']:.3f}, macro AUC {m['macro_auc']:.3f}  ({time.time() - t:.0f} s)")


if __name__ == "__main__":
    main()
