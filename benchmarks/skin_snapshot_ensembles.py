"""What the other checkpoints of a chapter-16 run add: its ensemble plus every saved EMA snapshot it left out.

Chapter 16's ensemble holds, per member, the EMA weights that validation selected and (with `keep_last`) the last
ones. Training also leaves the EMA of other validation steps in the run's checkpoint folder (the last two are kept,
e.g. steps 600 and 900 of a 900-step member). This script scores each of those left-out snapshots on the run's test
split with the same 8-view TTA and adds them to the run's ensemble (`eval/lesion_test/predictions.csv`, weighted by
its model count), which costs no training at all, only inference. It prints test accuracy, balanced accuracy and
macro AUC before and after, per run and averaged over the runs (one run per split: chapter 16 judges a recipe on
the mean of `--seed` 0, 1 and 2).

    python benchmarks/skin_snapshot_ensembles.py runs/s0_900 runs/s1_900 runs/s2_900
"""
from __future__ import annotations
import argparse, json, re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from skin_run_ensembles import CLASSES, load_run
from skindiff.classifier import classification_metrics, classifier_inputs, load_classifier, predict_proba, source_size
from skindiff.core import ConfigError
from skindiff.skin import skin_tensors

HEADLINE = ("accuracy", "balanced_accuracy", "macro_auc")


def member_snapshots(member_dir: Path) -> tuple[int, int, dict[int, Path]]:
    "A member's selected step, its last step and its saved checkpoints by step."
    sel = json.loads((member_dir/"selection.json").read_text())
    ckpts = {int(re.search(r"(\d+)", p.stem).group(1)): p for p in member_dir.glob("ckpt_*.pt")}
    if not ckpts: raise ConfigError(f"{member_dir}: no ckpt_*.pt; expected a finished chapter-16 member")
    return int(sel["best_step"]), max(ckpts), ckpts


def scores(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    m = classification_metrics(y, p, CLASSES)
    return {k: float(m[k]) for k in HEADLINE}


def fmt(s: dict[str, float]) -> str: return " / ".join(f"{s[k]:.3f}" for k in HEADLINE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished chapter-16 run folders")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    before, after = [], []
    print("accuracy / balanced accuracy / macro AUC on the lesion-grouped test split (8-view TTA)")
    for folder in args.runs:
        r = load_run(folder)
        model_file = folder/"models"/"skin_classifier.pt"
        if not model_file.is_file(): raise ConfigError(f"{folder}: no models/skin_classifier.pt; expected a finished chapter-16 run folder")
        saved = torch.load(model_file, map_location="cpu", weights_only=True)["meta"]
        k = int(saved.get("ensemble", 1))
        table = pd.read_csv(folder/"splits"/"lesion_split.csv").set_index("image_id").loc[r["ids"]].reset_index()
        members = [(d, *member_snapshots(d)) for d in sorted((folder/"checkpoints"/"16_skin_classifier").glob("lesion*"))]
        with_last = sum(len({best, last}) for _, best, last, _ in members)   # keep_last: selected + last EMA per member
        if k not in (with_last, len(members)):
            raise ConfigError(f"{folder}: the saved model holds {k} models; its {len(members)} members' checkpoints give "
                              f"{len(members)} (selected only) or {with_last} (with keep_last)")
        images, extra = {}, []
        for member_dir, best, last, ckpts in members:
            in_ensemble = {best, last} if k == with_last else {best}
            for step in sorted(set(ckpts) - in_ensemble):
                model, meta = load_classifier(ckpts[step])
                size = source_size(meta)
                if size not in images: images[size] = skin_tensors(table, None, size)[0]
                p = predict_proba(model.eval(), classifier_inputs(images[size], meta), meta["mean"], meta["std"], tta=True)
                extra.append(p.numpy().astype(np.float64))
                print(f"  {folder.name}: {member_dir.name} step {step} alone: {fmt(scores(r['labels'], extra[-1]))}")
        b = scores(r["labels"], r["probs"])
        a = scores(r["labels"], (k*r["probs"] + sum(extra))/(k + len(extra))) if extra else b
        before.append(b); after.append(a)
        print(f"{folder.name}: {k} models {fmt(b)}  ->  {k + len(extra)} models {fmt(a)}")
    mean = lambda rows: {h: float(np.mean([s[h] for s in rows])) for h in HEADLINE}
    print(f"mean of {len(before)} run(s): {fmt(mean(before))}  ->  {fmt(mean(after))}")


if __name__ == "__main__":
    main()
