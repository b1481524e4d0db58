"""Chapter 20 (skindiff.report): reading chapter 19's predictions with clear errors, the before/after table against
hand-computed values, comparisons whose verdicts follow simulated truth, hard cases and the written conclusion."""
import numpy as np, pandas as pd, pytest
from skindiff.core import ConfigError, SkindiffError, atomic_savez
from skindiff.skin import SKIN_CLASSES
from skindiff.report import (ALL_ARMS, BEFORE, TARGETED, ARM_LABELS, load_predictions, seed_metrics, arm_table, compare_arms,
                             comparison_metrics, verdict, hard_cases, hard_case_rates, ph2_metrics, conclusion, accuracy_metric,
                             class_sensitivity_metric)

C = len(SKIN_CLASSES)

def one_hot_probs(pred, sharp=0.9):
    "S × N × C probabilities whose argmax is `pred` (S × N)."
    p = np.full((*pred.shape, C), (1 - sharp) / (C - 1))
    np.put_along_axis(p, pred[..., None], sharp, -1)
    return p

def simulate(n_per_class=60, seeds=3, acc=None, seed=0):
    "Labels, lesion ids (two images per lesion) and per-arm predictions with per-arm accuracies `acc`."
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n_per_class)
    lesions = np.array([f"l{c}_{i // 2}" for c in range(C) for i in range(n_per_class)])
    acc = acc or {a: 0.7 for a in ALL_ARMS}
    preds = {}
    for a in ALL_ARMS:
        right = rng.random((seeds, len(y))) < acc[a]
        wrong = (y + rng.integers(1, C, (seeds, len(y)))) % C
        preds[a] = np.where(right, y, wrong)
    return y, lesions, preds

def write_npz(path, y, lesions, preds, ph2_y=None, drop=None, **over):
    ph2_y = np.array([SKIN_CLASSES.index("mel")] * 10 + [SKIN_CLASSES.index("nv")] * 30) if ph2_y is None else ph2_y
    S = len(next(iter(preds.values())))
    d = dict(seeds=np.arange(S), arms=np.asarray(list(ALL_ARMS)), test_labels=y, test_ids=np.array([f"img{i}" for i in range(len(y))]),
             test_lesions=lesions, ph2_labels=ph2_y, **{f"test_{a}": one_hot_probs(p) for a, p in preds.items()},
             **{f"ph2_{a}": one_hot_probs(np.tile(ph2_y, (S, 1))) for a in preds})
    d.update(over)
    for k in drop or (): d.pop(k)
    atomic_savez(path, **d)
    return path

def test_load_predictions_round_trip(tmp_path):
    y, les, preds = simulate()
    P = load_predictions(write_npz(tmp_path/"p.npz", y, les, preds))
    assert set(P.test_probs) == set(ALL_ARMS) and P.test_probs[TARGETED].shape == (3, len(y), C)
    assert (P.test_probs[BEFORE].argmax(-1) == preds[BEFORE]).all() and (P.test_labels == y).all()

def test_load_predictions_errors_name_the_file_and_problem(tmp_path):
    y, les, preds = simulate()
    with pytest.raises(SkindiffError, match="does not exist: run chapter 19"): load_predictions(tmp_path/"none.npz")
    with pytest.raises(SkindiffError, match=r"arms \['targeted'\] are missing"):
        load_predictions(write_npz(tmp_path/"a.npz", y, les, preds, drop=["test_targeted"]))
    with pytest.raises(SkindiffError, match="missing \\['test_lesions'\\]"):
        load_predictions(write_npz(tmp_path/"b.npz", y, les, preds, drop=["test_lesions"]))
    with pytest.raises(SkindiffError, match="test_real has shape"):
        load_predictions(write_npz(tmp_path/"c.npz", y, les, preds, test_real=one_hot_probs(preds["real"][:2])))
    bad = one_hot_probs(preds["augment"]); bad[0, 0, 0] = 5.0
    with pytest.raises(SkindiffError, match="test_augment is not a probability"):
        load_predictions(write_npz(tmp_path/"d.npz", y, les, preds, test_augment=bad))
    with pytest.raises(SkindiffError, match="test_labels outside"):
        load_predictions(write_npz(tmp_path/"e.npz", y + 1, les, preds))

def test_seed_metrics_match_hand_computation():
    y, _, preds = simulate(seeds=2)
    df = seed_metrics(y, one_hot_probs(preds["real"]))
    for s in range(2):
        p = preds["real"][s]
        sens = [np.mean(p[y == c] == c) for c in range(C)]
        spec = [np.mean(p[y != c] != c) for c in range(C)]
        assert df["accuracy"][s] == pytest.approx(np.mean(p == y))
        assert df["balanced_accuracy"][s] == pytest.approx(np.mean(sens))
        assert df["macro_specificity"][s] == pytest.approx(np.mean(spec))
        assert df["sensitivity/mel"][s] == pytest.approx(sens[SKIN_CLASSES.index("mel")])
    with pytest.raises(ConfigError, match="seeds × images × classes"): seed_metrics(y, one_hot_probs(preds["real"])[0])

def test_arm_table_mean_sd():
    t = arm_table({"x": pd.DataFrame({"m": [0.5, 0.7]})}, ["m"], {"x": "arm x"})
    assert t.loc["arm x", "m"] == f"0.600 ± {np.std([0.5, 0.7], ddof=1):.3f}"

def test_verdict_and_comparisons_follow_the_truth():
    assert verdict([0.01, 0.05]) == "better" and verdict([-0.05, -0.01]) == "worse" and verdict([-0.01, 0.02]) == "no detectable difference"
    with pytest.raises(ConfigError, match="ci="): verdict([0.1, -0.1])
    acc = {a: 0.55 for a in ALL_ARMS} | {TARGETED: 0.85, "augment": 0.9}
    y, les, preds = simulate(acc=acc, n_per_class=80)
    m = comparison_metrics()
    assert set(m) == {"balanced_accuracy", "accuracy", "sensitivity/mel", "sensitivity/df", "sensitivity/vasc", "sensitivity/akiec"}
    better = compare_arms(y, preds["real"], preds[TARGETED], les, m, C, n_boot=300)
    worse = compare_arms(y, preds["augment"], preds[TARGETED], les, m, C, n_boot=300)
    assert better["metrics"]["balanced_accuracy"]["verdict"] == "better" and better["n_significant"] == 3
    assert worse["metrics"]["balanced_accuracy"]["verdict"] == "worse"
    assert better["metrics"]["balanced_accuracy"]["diff"] == pytest.approx(
        np.mean([np.mean([np.mean(preds[TARGETED][s][y == c] == c) - np.mean(preds["real"][s][y == c] == c) for c in range(C)]) for s in range(3)]))
    same = compare_arms(y, preds["real"], preds["real"], les, m, C, n_boot=50)
    assert same["metrics"]["accuracy"]["diff"] == 0 and same["n_significant"] == 0
    with pytest.raises(ConfigError, match="pred_x, pred_d"): compare_arms(y, preds["real"][:2], preds[TARGETED], les, m, C)

def test_metric_helpers():
    y = np.array([0, 0, 1, 1]); p = np.array([0, 1, 1, 1])
    assert accuracy_metric(y, p, 2) == 0.75 and class_sensitivity_metric(0)(y, p, 2) == 0.5 and class_sensitivity_metric(1)(y, p, 2) == 1.0

def test_hard_cases_majority_of_before_models():
    y = np.array([0, 1, 2, 3])
    before = np.array([[1, 1, 0, 3], [1, 1, 0, 0], [0, 0, 2, 0]])     # image 0: 2 of 3 wrong; 1: right; 2: 2 of 3 wrong; 3: 2 of 3 wrong
    hard = hard_cases(y, before)
    assert hard.tolist() == [True, False, True, True]
    r = hard_case_rates(y, np.array([[0, 0, 2, 0]]), hard)
    assert r["fixed"][0] == pytest.approx(2 / 3) and r["broken"][0] == 1.0
    with pytest.raises(ConfigError, match="before_pred"): hard_cases(y, before[:, :3])

def test_ph2_metrics_sensitivity_specificity_auc():
    mel, nv = SKIN_CLASSES.index("mel"), SKIN_CLASSES.index("nv")
    lab = np.array([mel, mel, nv, nv])
    p = np.zeros((1, 4, C)); p[0, :, mel] = [0.8, 0.3, 0.1, 0.6]; p[0, :, nv] = 1 - p[0, :, mel]
    r = ph2_metrics(lab, p).iloc[0]
    assert r["sensitivity"] == 0.5 and r["specificity"] == 0.5 and r["auc"] == 0.75

def test_conclusion_says_what_the_cis_say():
    def cmp_(lo, hi): return {"metrics": {"balanced_accuracy": {"diff": (lo + hi) / 2, "ci": [lo, hi], "verdict": verdict([lo, hi])}}}
    means = {a: 0.7 for a in ALL_ARMS}
    all_better = conclusion({x: cmp_(0.01, 0.03) for x in ALL_ARMS if x != TARGETED}, means, ARM_LABELS)
    assert "beats every control" in all_better and all_better.count("**better than**") == 4
    mixed = conclusion({x: cmp_(0.01, 0.03) if x in (BEFORE, "real") else cmp_(-0.02, 0.03) for x in ALL_ARMS if x != TARGETED}, means, ARM_LABELS)
    assert "no evidence" in mixed and "**not distinguishable from**" in mixed
    worse = conclusion({x: cmp_(-0.05, -0.01) if x == "augment" else cmp_(0.01, 0.03) for x in ALL_ARMS if x != TARGETED}, means, ARM_LABELS)
    assert "worse than at least one control" in worse
