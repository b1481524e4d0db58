"""What more training compute buys the lesion classifier: ensembles of k whole chapter-16 runs on the same split.

Each run folder (from `skindiff study --only 16_skin_classifier`, or chapter 16 through papermill) holds its
test-set probabilities (`eval/lesion_test/predictions.csv`, 8-view TTA, the ISIC submission format), its split
(`splits/lesion_split.csv`) and its training time (`results/16_skin_classifier.json`). For every k this script
averages the probabilities of each combination of k runs that share a split (each run is already an ensemble of
the profile's members, trained in its own ~25 minutes), and prints the test accuracy and balanced accuracy:
the mean over the combinations, the range, and the training seconds the k runs took together. The last block averages
each k over the splits that have that many runs, which is how chapter 16 judges a recipe (one split's balanced
accuracy has a CI of about ±0.05).

It answers one question: is the cpu profile short of the targets (accuracy 0.83 and balanced accuracy 0.75)
because 25 CPU-minutes are too few, or is the recipe at a plateau? Runs of different recipes on one split may be
pooled (they are all candidates for the same budget); name them to say so.

    python benchmarks/skin_run_ensembles.py runs/s0_900 runs/s0_sog runs/s1_900 runs/s1_sog ...
"""
from __future__ import annotations
import argparse, hashlib, itertools, json
from pathlib import Path

import numpy as np
import pandas as pd

from skindiff.classifier import classification_metrics, prediction_columns
from skindiff.core import ConfigError
from skindiff.skin import SKIN_CLASSES

CLASSES = list(SKIN_CLASSES)


def load_run(folder: Path, which: str = "lesion_test") -> dict:
    """Test probabilities (image ids × classes, in SKIN_CLASSES order), labels, training seconds and split digest of a
    run; `which` names another evaluation of it under `eval/` (e.g. the validation split's)."""
    preds, split = folder/"eval"/which/"predictions.csv", folder/"splits"/"lesion_split.csv"
    for f in (preds, split):
        if not f.is_file(): raise ConfigError(f"{folder}: no {f.relative_to(folder)}; expected a finished chapter-16 run folder")
    cols, order = prediction_columns(CLASSES)                # ISIC column names and their class indices
    p = pd.read_csv(preds).set_index("image")
    if list(p.columns) != cols: raise ConfigError(f"{preds}: columns {list(p.columns)}, expected {cols}")
    probs = np.empty((len(p), len(CLASSES)))
    probs[:, order] = p[cols].to_numpy()
    table = pd.read_csv(split, usecols=["image_id", "label_idx", "split"]).set_index("image_id")
    labels = table.loc[p.index, "label_idx"].to_numpy()
    digest = hashlib.sha256(table.sort_index()["split"].str.cat().encode()).hexdigest()[:12]
    res = folder/"results"/"16_skin_classifier.json"
    seconds = next((r["value"] for r in json.loads(res.read_text()) if r["name"] == "lesion_train_seconds"), np.nan) if res.is_file() else np.nan
    return dict(name=folder.name, ids=list(p.index), probs=probs, labels=labels, split=digest, seconds=float(seconds))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="chapter-16 run folders (grouped by their split automatically)")
    args = ap.parse_args()
    runs = [load_run(f) for f in args.runs]
    by_split: dict[str, list[dict]] = {}
    for r in runs: by_split.setdefault(r["split"], []).append(r)
    means: dict[int, list[tuple[float, float]]] = {}
    print(f"{'split':>12} {'k':>2} {'combos':>6} {'train s':>8} {'accuracy':>9} {'(range)':>15} {'bal. acc.':>9} {'(range)':>15}  runs")
    for digest, rs in by_split.items():
        ids = rs[0]["ids"]
        for r in rs[1:]:
            if sorted(r["ids"]) != sorted(ids): raise ConfigError(f"{r['name']} and {rs[0]['name']} share a split but not the test images")
        for r in rs: r["P"] = pd.DataFrame(r["probs"], index=r["ids"]).loc[ids].to_numpy()
        y = rs[0]["labels"].copy()
        for k in range(1, len(rs) + 1):
            acc, ba, secs = [], [], []
            for combo in itertools.combinations(rs, k):
                m = classification_metrics(y, sum(r["P"] for r in combo)/k, CLASSES)
                acc.append(m["accuracy"]); ba.append(m["balanced_accuracy"]); secs.append(sum(r["seconds"] for r in combo))
            means.setdefault(k, []).append((float(np.mean(acc)), float(np.mean(ba))))
            print(f"{digest:>12} {k:>2} {len(acc):>6} {np.mean(secs):>8.0f} {np.mean(acc):>9.3f} [{min(acc):.3f}, {max(acc):.3f}] "
                  f"{np.mean(ba):>9.3f} [{min(ba):.3f}, {max(ba):.3f}]  {', '.join(r['name'] for r in rs) if k == 1 else ''}")
    print("\nmean over the splits with at least k runs:")
    for k, v in sorted(means.items()):
        a = np.array(v)
        print(f"  k = {k}: {len(v)} split(s), accuracy {a[:, 0].mean():.3f}, balanced accuracy {a[:, 1].mean():.3f}")


if __name__ == "__main__":
    main()
