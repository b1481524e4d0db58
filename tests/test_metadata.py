"The age/sex/site model of eq 16.3 (`skindiff.metadata`): fitting, pooling, the round trip through a classifier file, bad input."
import dataclasses, json

import numpy as np
import pandas as pd
import pytest
import torch

from skindiff.core import ConfigError
from skindiff.classifier import create_classifier, save_classifier, load_classifier, CheckpointError
from skindiff.metadata import MetadataModel, fit_metadata_model, pool_metadata, check_metadata, SEXES

CLASSES = ["a", "b", "c"]


def _patients(n=600, seed=0):
    "Class c lives on the face of old patients, b on the back, a anywhere: the metadata alone should find most of it."
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    site = np.where(y == 2, "face", np.where(y == 1, "back", rng.choice(["back", "face", "hand"], n)))
    age = np.where(y == 2, rng.normal(75, 5, n), rng.normal(40, 10, n)).clip(1, 100)
    df = pd.DataFrame(dict(age=age, sex=rng.choice(list(SEXES), n), localization=site))
    df.loc[::50, "age"] = np.nan                                     # some ages missing, as in HAM10000
    return df, y


def test_fit_learns_the_metadata_and_round_trips():
    df, y = _patients()
    mm = fit_metadata_model(df, y, CLASSES)
    assert mm.sites == ["back", "face", "hand", "unknown"] and mm.alpha == 1.0
    acc = (mm.log_prob(df).argmax(1).numpy() == y).mean()
    assert acc > 0.75, acc                                          # chance is 1/3
    np.testing.assert_allclose(np.exp(mm.log_prior), np.bincount(y)/len(y))
    again = MetadataModel.from_dict(json.loads(json.dumps(mm.to_dict())))      # as a classifier's meta stores it
    assert again == mm and torch.equal(again.log_prob(df), mm.log_prob(df))
    assert torch.equal(fit_metadata_model(df, y, CLASSES).log_prob(df), mm.log_prob(df))     # deterministic


def test_pooling_is_eq_16_3():
    df, y = _patients(50)
    mm = dataclasses.replace(fit_metadata_model(df, y, CLASSES), alpha=0.7)
    p = torch.softmax(torch.randn(50, 3, generator=torch.Generator().manual_seed(0)), 1)
    q = mm.pool(p, df)
    want = (p.double().log() + 0.7*(mm.log_prob(df) - torch.tensor(mm.log_prior))).softmax(1)
    assert torch.allclose(q.double(), want, atol=1e-6) and torch.allclose(q.sum(1), torch.ones(50))
    assert torch.allclose(pool_metadata(p, mm.log_prob(df), mm.log_prior, 0.0), p, atol=1e-6)   # α = 0: the image alone
    with pytest.raises(ConfigError, match="one row per image"): mm.pool(p[:3], df)
    with pytest.raises(ConfigError, match="alpha"): pool_metadata(p, mm.log_prob(df), mm.log_prior, -1.0)


def test_unknown_values_and_bad_input():
    df, y = _patients(60)
    mm = fit_metadata_model(df, y, CLASSES)
    odd = pd.DataFrame(dict(age=[None, "", 30], sex=[None, "other", "male"], localization=["moon", None, "face"]))
    x = mm.features(odd)
    unknown_site = 3 + len(SEXES) + mm.sites.index("unknown")
    assert x[0, 2] == 1 and x[1, 2] == 1 and x[2, 2] == 0             # blank ages are missing
    assert x[0, unknown_site] == 1 and x[1, unknown_site] == 1        # unseen and missing sites count as unknown
    with pytest.raises(ConfigError, match=r"no column\(s\) \['localization'\]"): check_metadata(odd.drop(columns="localization"))
    with pytest.raises(ConfigError, match="age 'old' in row 1"): check_metadata(odd.assign(age=[1, "old", 2]))
    with pytest.raises(ConfigError, match="age 130 in row 2"): check_metadata(odd.assign(age=[1, 2, 130]))
    with pytest.raises(ConfigError, match="same number"): fit_metadata_model(df, y[:10], CLASSES)
    with pytest.raises(ConfigError, match=r"no training label for \['c'\]"): fit_metadata_model(df[y < 2], y[y < 2], CLASSES)
    d = mm.to_dict()
    with pytest.raises(ConfigError, match="keys"): MetadataModel.from_dict({k: v for k, v in d.items() if k != "weight"})
    with pytest.raises(ConfigError, match="weight"): MetadataModel.from_dict(d | dict(weight=[[0.0]]))
    with pytest.raises(ConfigError, match="unknown"): MetadataModel.from_dict(d | dict(sites=["back"]))
    for bad in (dict(sites=None), dict(classes="abc"), dict(age_sd="ten"), dict(age_mean=None), dict(age_sd=0.0)):
        with pytest.raises(ConfigError, match="MetadataModel"): MetadataModel.from_dict(d | bad)     # damaged files: clear errors


def test_a_classifier_file_carries_it(tmp_path):
    df, y = _patients(60)
    mm = fit_metadata_model(df, y, CLASSES)
    torch.manual_seed(0)
    net = create_classifier(3, pretrained=False)
    meta = dict(arch="tf_efficientnet_lite0", classes=CLASSES, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    path = save_classifier(net, tmp_path/"m.pt", meta | dict(metadata_model=mm.to_dict()))
    assert MetadataModel.from_dict(load_classifier(path)[1]["metadata_model"]) == mm
    with pytest.raises(ConfigError, match="weight"):                 # nothing malformed is written
        save_classifier(net, tmp_path/"bad.pt", meta | dict(metadata_model=mm.to_dict() | dict(weight=[[1.0]])))
    assert not (tmp_path/"bad.pt").exists()
    with pytest.raises(ConfigError, match="differ"):
        save_classifier(net, tmp_path/"bad.pt", meta | dict(metadata_model=mm.to_dict() | dict(classes=["x", "y", "z"])))
    ck = torch.load(path, weights_only=True)
    ck["meta"]["metadata_model"]["bias"] = [0.0]                     # a file damaged after it was written
    torch.save(ck, tmp_path/"damaged.pt")
    with pytest.raises(CheckpointError, match="damaged.pt: meta MetadataModel.bias"): load_classifier(tmp_path/"damaged.pt")
