"The skin subcommands of the CLI: evaluate, predict, download (argument checking only: no internet here)."
import json
from pathlib import Path

import pytest
import torch

from skindiff.cli import main, EXIT_USAGE, evaluation_data
from skindiff.classifier import create_classifier, save_classifier
from skindiff.data import find_data_root
from skindiff.skin import SKIN_CLASSES, save_split_csv, skin_split

SIZE = 32


@pytest.fixture(scope="module")
def data_root():
    try: return find_data_root(None, need="ph2")
    except Exception: pytest.skip("the shared data (ph2, ham10000) is not available")


def _model(path, classes=SKIN_CLASSES):
    torch.manual_seed(0)
    m = create_classifier(len(classes), pretrained=False)
    return save_classifier(m, path, dict(arch="tf_efficientnet_lite0", classes=list(classes), image_size=SIZE,
                                         mean=[0.5] * 3, std=[0.5] * 3))


def test_evaluate_ph2_writes_metrics_and_isic_csv(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    out = tmp_path/"eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--out", str(out), "--n-boot", "20"]) == 0
    m = json.loads((out/"metrics.json").read_text())
    assert m["n"] == 200 and 0 <= m["accuracy"] <= 1
    header = (out/"predictions.csv").read_text().splitlines()[0]
    assert header == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    assert "balanced_accuracy" in capsys.readouterr().out


def test_evaluate_with_split_csv_keeps_only_that_split(tmp_path, data_root):
    split = skin_split(data_root, out=tmp_path/"split.csv")
    x, y, ids, groups, what, patients = evaluation_data(str(data_root/"ham10000"), None, 16, "test", str(tmp_path/"split.csv"))
    test_ids = set(split.loc[split["split"] == "test", "image_id"])
    assert set(ids) == test_ids and len(x) == len(y) == len(ids) and x.shape[1:] == (3, 16, 16)
    assert groups is not None and len(groups) == len(ids)
    assert list(patients.columns) == ["age", "sex", "localization"] and len(patients) == len(ids)   # eq 16.3's inputs, row by row
    want = split.set_index("image_id").loc[ids, "localization"].tolist()
    assert patients["localization"].tolist() == want


def test_evaluate_model_of_other_classes_is_refused(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"cifar.pt", classes=[f"c{i}" for i in range(10)])
    out = tmp_path/"eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--out", str(out), "--n-boot", "0"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "trained on classes" in err and "akiec" in err and not out.exists()


def test_evaluate_split_without_csv_is_named(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--split", "test"]) == EXIT_USAGE
    assert "--split-csv" in capsys.readouterr().err


def test_predict_prints_top_k(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    imgs = sorted((data_root/"ph2").rglob("*.jpg"))[:2] or sorted((data_root/"ph2").rglob("*.png"))[:2]
    assert main(["predict", "--model", str(ckpt), "-k", "2", *map(str, imgs)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.count(",") == 1 for line in lines)
    for line in lines:
        probs = [float(tok.split()[-1]) for tok in line.split(": ", 1)[1].split(", ")]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)


def test_predict_missing_image_and_bad_model(tmp_path, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    assert main(["predict", "--model", str(ckpt), str(tmp_path/"nope.jpg")]) == EXIT_USAGE
    assert "nope.jpg does not exist" in capsys.readouterr().err
    assert main(["predict", "--model", str(ckpt), str(tmp_path)]) == EXIT_USAGE
    assert f"IMAGE: {tmp_path} is a folder, not an image file" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), str(ckpt)]) == EXIT_USAGE
    assert f"classifier {tmp_path} is a folder" in capsys.readouterr().err
    (tmp_path/"bad.pt").write_bytes(b"not a checkpoint")
    img = tmp_path/"x.png"
    from PIL import Image; Image.new("RGB", (40, 30), (120, 80, 60)).save(img)
    assert main(["predict", "--model", str(tmp_path/"bad.pt"), str(img)]) == EXIT_USAGE
    assert "bad.pt" in capsys.readouterr().err


def test_predict_and_evaluate_apply_the_calibration_temperature(tmp_path, data_root, capsys):
    torch.manual_seed(0)
    m = create_classifier(len(SKIN_CLASSES), pretrained=False)
    ckpt = save_classifier(m, tmp_path/"cal.pt", dict(arch="tf_efficientnet_lite0", classes=list(SKIN_CLASSES), image_size=SIZE,
                                                      mean=[0.5] * 3, std=[0.5] * 3, temperature=0.3))
    img = str(sorted((data_root/"ph2").rglob("*.jpg"))[0])
    top = {}
    for flag in ([], ["--uncalibrated"]):
        assert main(["predict", "--model", str(ckpt), "-k", "1", *flag, img]) == 0
        top[bool(flag)] = float(capsys.readouterr().out.strip().rsplit(" ", 1)[1])
    assert top[False] > top[True]                  # T = 0.3 sharpens the top probability
    for flag in ([], ["--uncalibrated"]):
        out = tmp_path/f"eval{len(flag)}"
        assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--out", str(out), "--n-boot", "0", *flag]) == 0
        said = capsys.readouterr().out
        assert json.loads((out/"metrics.json").read_text())["temperature"] == (1.0 if flag else 0.3)
        assert ("raw probabilities" if flag else "calibrated with T = 0.300") in said


def test_evaluate_decodes_at_the_models_source_size(tmp_path, data_root, monkeypatch):
    "A model trained on 8 px images shown at 32 px (meta source_size) is evaluated on images decoded at 8 px, not 32."
    import skindiff.cli as cli
    torch.manual_seed(0)
    ckpt = save_classifier(create_classifier(len(SKIN_CLASSES), pretrained=False), tmp_path/"up.pt",
                           dict(arch="tf_efficientnet_lite0", classes=list(SKIN_CLASSES), image_size=SIZE, source_size=8,
                                mean=[0.5] * 3, std=[0.5] * 3))
    sizes, real = [], cli.evaluation_data
    monkeypatch.setattr(cli, "evaluation_data", lambda data, fmt, size, *a: sizes.append(size) or real(data, fmt, size, *a))
    out = tmp_path/"eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--out", str(out), "--n-boot", "0"]) == 0
    m = json.loads((out/"metrics.json").read_text())
    assert sizes == [8] and m["image_size"] == SIZE and m["resized_from"] == [8, 8]


def test_predict_same_lesion_prints_the_mean_of_the_images(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    imgs = [str(p) for p in sorted((data_root/"ph2").rglob("*.jpg"))[:2]]
    assert main(["predict", "--model", str(ckpt), "-k", str(len(SKIN_CLASSES)), "--same-lesion", *imgs]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith("one lesion (2 images): ")
    probs = [dict((tok.rsplit(" ", 1)[0], float(tok.rsplit(" ", 1)[1])) for tok in line.split(": ", 1)[1].split(", ")) for line in lines]
    for c in SKIN_CLASSES:                                    # eq 15.11: the lesion's probability is the mean of its images'
        assert abs(probs[2][c] - (probs[0][c] + probs[1][c])/2) < 2e-3


def test_evaluate_fuse_lesions(tmp_path, data_root, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    from skindiff.core import ConfigError
    from skindiff.classifier import evaluate_checkpoint
    with pytest.raises(ConfigError, match="lesion ids"):               # data without lesion ids (DermaMNIST) cannot be fused
        evaluate_checkpoint(ckpt, torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8), [0, 1], ["a", "b"], None, list(SKIN_CLASSES),
                            groups=None, n_boot=0, fuse_lesions=True)
    skin_split(data_root, out=tmp_path/"split.csv")
    out = tmp_path/"eval"
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ham10000"), "--split-csv", str(tmp_path/"split.csv"),
                 "--split", "val", "--fuse-lesions", "--n-boot", "0", "--out", str(out)]) == 0
    import pandas as pd
    pred = pd.read_csv(out/"predictions.csv").set_index("image")
    split = pd.read_csv(tmp_path/"split.csv").set_index("image_id")
    lesion = split.loc[pred.index, "lesion_id"]
    assert json.loads((out/"metrics.json").read_text())["fused_lesions"] is True
    assert (pred.groupby(lesion.values).nunique() == 1).all().all()   # every image of a lesion has the same probabilities
    assert lesion.duplicated().any()                                  # and some lesions do have several images


def _metadata_model(data_root, tmp_path, alpha=1.0):
    "The age/sex/site model of eq 16.3 fitted on the HAM10000 training split, and a classifier file carrying it."
    import dataclasses
    from skindiff.metadata import fit_metadata_model
    split = skin_split(data_root, out=tmp_path/"split.csv")
    train = split[split["split"] == "train"]
    mm = dataclasses.replace(fit_metadata_model(train, train["label_idx"].to_numpy(), list(SKIN_CLASSES)), alpha=alpha)
    save_split_csv(split[split["split"] == "test"].head(150), tmp_path/"some_test.csv")     # a small test set, for speed
    torch.manual_seed(0)
    ckpt = save_classifier(create_classifier(len(SKIN_CLASSES), pretrained=False), tmp_path/"meta.pt",
                           dict(arch="tf_efficientnet_lite0", classes=list(SKIN_CLASSES), image_size=SIZE, mean=[0.5] * 3,
                                std=[0.5] * 3, metadata_model=mm.to_dict()))
    return mm, ckpt


def test_evaluate_metadata_pools_age_sex_and_site(tmp_path, data_root, capsys):
    import numpy as np
    import pandas as pd
    mm, ckpt = _metadata_model(data_root, tmp_path, alpha=0.8)
    pred = {}
    for flag in ([], ["--metadata"]):
        out = tmp_path/f"eval{len(flag)}"
        assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ham10000"), "--split-csv", str(tmp_path/"some_test.csv"),
                     "--split", "test", "--n-boot", "0", "--out", str(out), *flag]) == 0
        pred[bool(flag)] = pd.read_csv(out/"predictions.csv").set_index("image")
        m = json.loads((out/"metrics.json").read_text())
        assert (m["alpha"], m["metadata"]) == ((0.8, ["age", "sex", "localization"]) if flag else (None, None))
    assert "pooled with age, sex and site (eq 16.3, alpha = 0.8)" in capsys.readouterr().out
    x, *_, patients = evaluation_data(str(data_root/"ham10000"), None, SIZE, "test", str(tmp_path/"some_test.csv"))
    cols = [c.upper() for c in SKIN_CLASSES]
    want = mm.pool(torch.tensor(pred[False].loc[_ids(x, tmp_path), cols].to_numpy()), patients)   # eq 16.3 on the plain run's output
    np.testing.assert_allclose(pred[True].loc[_ids(x, tmp_path), cols].to_numpy(), want.numpy(), atol=2e-5)


def _ids(x, tmp_path):
    import pandas as pd
    ids = pd.read_csv(tmp_path/"some_test.csv")["image_id"].tolist()
    assert len(ids) == len(x) == 150
    return ids


def test_evaluate_metadata_needs_the_model_and_the_columns(tmp_path, data_root, capsys):
    plain = _model(tmp_path/"clf.pt")
    assert main(["evaluate", "--model", str(plain), "--data", str(data_root/"ph2"), "--metadata", "--n-boot", "0",
                 "--out", str(tmp_path/"e1")]) == EXIT_USAGE
    assert "has no age/sex/site model" in capsys.readouterr().err and not (tmp_path/"e1").exists()
    _, ckpt = _metadata_model(data_root, tmp_path)
    assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--metadata", "--n-boot", "0",
                 "--out", str(tmp_path/"e2")]) == EXIT_USAGE
    assert "no age, sex and localization columns" in capsys.readouterr().err and not (tmp_path/"e2").exists()


def test_predict_with_age_sex_and_site(tmp_path, data_root, capsys):
    mm, ckpt = _metadata_model(data_root, tmp_path)
    img = str(sorted((data_root/"ph2").rglob("*.jpg"))[0])
    k = str(len(SKIN_CLASSES))
    read = lambda line: dict((tok.rsplit(" ", 1)[0], float(tok.rsplit(" ", 1)[1])) for tok in line.split(": ", 1)[1].split(", "))
    assert main(["predict", "--model", str(ckpt), "-k", k, img]) == 0
    plain = read(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", "--model", str(ckpt), "-k", k, "--age", "80", "--sex", "Male", "--site", " face", img]) == 0   # case and spaces do not matter
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "pooled with the patient's age 80, sex male, site face (eq 16.3)"
    pooled = read(out[1])
    import pandas as pd
    want = mm.pool(torch.tensor([[plain[c] for c in SKIN_CLASSES]]), pd.DataFrame(dict(age=[80], sex=["male"], localization=["face"])))[0]
    assert all(abs(pooled[c] - float(w)) < 2e-3 for c, w in zip(SKIN_CLASSES, want))
    assert pooled["akiec"] + pooled["bcc"] > plain["akiec"] + plain["bcc"]     # keratinocyte cancers: old skin, sun-exposed sites
    assert main(["predict", "--model", str(ckpt), "--site", "moon", img]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "site 'moon'" in err and "face" in err and "back" in err
    assert main(["predict", "--model", str(ckpt), "--sex", "x", img]) == EXIT_USAGE
    assert "male, female" in capsys.readouterr().err.replace("'", "")
    assert main(["predict", "--model", str(ckpt), "--age", "-3", img]) == EXIT_USAGE
    assert "age -3" in capsys.readouterr().err
    assert main(["predict", "--model", str(_model(tmp_path/"plain.pt")), "--age", "50", img]) == EXIT_USAGE
    assert "has no age/sex/site model" in capsys.readouterr().err


def test_evaluate_and_download_check_their_folders_first(tmp_path, data_root, capsys, monkeypatch):
    "An --out or --dest that cannot be written is one line and exit 2, before any scoring or request."
    import skindiff.classifier
    ckpt = _model(tmp_path/"clf.pt")
    a_file = tmp_path/"a_file"; a_file.write_text("x")
    monkeypatch.setattr(skindiff.classifier, "evaluate_checkpoint", lambda *a, **k: pytest.fail("scored before checking --out"))
    for out, why in ((a_file, "exists and is not a directory"), (a_file/"sub", "is a file, so the directory cannot be created")):
        assert main(["evaluate", "--model", str(ckpt), "--data", str(data_root/"ph2"), "--out", str(out)]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--out {out}: " in err and why in err
    assert main(["download", "dermamnist", "--dest", str(a_file/"sub")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--dest {a_file/'sub'}: " in err


def test_evaluate_names_a_bad_data_argument(tmp_path, capsys):
    ckpt = _model(tmp_path/"clf.pt")
    empty = tmp_path/"empty"; empty.mkdir(); (empty/"notes.txt").write_text("x")
    for data, expect in ((tmp_path/"nowhere", "does not exist"), (ckpt, "is a file but not a DermaMNIST .npz"),
                         (empty, "cannot tell the format")):
        assert main(["evaluate", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path/"o")]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(data) in err and expect in err, err
    assert "pass --format one of ham10000, isic2018" in err
