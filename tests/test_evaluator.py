"""MNIST evaluator: Fréchet distance against closed forms and scipy, the cached classifier, metrics on real vs noise, bad input.
Uses the cached classifier (`get_mnist_classifier` trains it once, ~1-4 min on 2 CPU cores, when the cache is empty)."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from skindiff.core import ConfigError, SkindiffError
from skindiff.data import load_mnist, seeded_subset
from skindiff import evaluator as ev
from skindiff.evaluator import (frechet_distance, feature_statistics, MnistClassifier, MnistEvaluator,
                                get_mnist_classifier, load_mnist_classifier, prepare_samples, random_shift)

N = 500

# --- Fréchet distance -------------------------------------------------------------------------------

def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2)**2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))

def test_fd_closed_form_diagonal():
    rng = np.random.default_rng(1)
    for d in (1, 3, 50):
        a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        expect = ((m1 - m2)**2).sum() + ((np.sqrt(a) - np.sqrt(b))**2).sum()
        assert math.isclose(frechet_distance(m1, np.diag(a), m2, np.diag(b)), expect, rel_tol=1e-10)

def test_fd_symmetry_identity_and_scipy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 20))
    y = rng.normal(0.5, 1, size=(300, 20)) @ rng.normal(size=(20, 20)) / 3
    sx, sy = feature_statistics(x), feature_statistics(y)
    d = frechet_distance(*sx, *sy)
    assert math.isclose(d, frechet_distance(*sy, *sx), rel_tol=1e-9)
    assert math.isclose(d, _scipy_fd(*sx, *sy), rel_tol=1e-6)
    assert frechet_distance(*sx, *sx) < 1e-9
    # singular covariances (fewer samples than dimensions): still finite, real, symmetric
    s1, s2 = feature_statistics(x[:8]), feature_statistics(y[:8])
    d = frechet_distance(*s1, *s2)
    assert np.isfinite(d) and d > 0 and math.isclose(d, frechet_distance(*s2, *s1), rel_tol=1e-6)

def test_fd_bad_input():
    with pytest.raises(ConfigError, match="at least 2"): feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ConfigError, match="N×d"): feature_statistics(np.zeros(4))
    with pytest.raises(ConfigError, match="dimensions"): frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError, match="sigma1"): frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ConfigError, match="positive semi-definite"): frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ConfigError, match="NaN"): feature_statistics(np.full((3, 2), np.nan))

# --- classifier and evaluator -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluator():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    x_test = load_mnist("test")[0]
    x_train = load_mnist("train")[0]
    return MnistEvaluator(get_mnist_classifier(device="cpu", progress=False), x_test, x_train, device="cpu")

def test_classifier_cache_info(evaluator):
    info = evaluator.classifier.info
    assert info["test_accuracy"] >= 0.99 and info["seed"] == ev.CLASSIFIER_SEED

def test_classifier_shapes_and_padding():
    m = MnistClassifier().eval()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    assert m.features(x).shape == (3, ev.FEATURE_DIM)
    assert torch.allclose(m(x), m(xp), atol=1e-5)                    # 32×32 is center-cropped back to 28×28
    with pytest.raises(ConfigError, match="N×1×28×28"): m(torch.zeros(2, 1, 30, 30))

def test_random_shift_is_seeded_and_bounded():
    x = torch.randn(6, 1, 28, 28)
    a = random_shift(x, torch.Generator().manual_seed(0)); b = random_shift(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert torch.equal(random_shift(x, torch.Generator(), max_shift=0), x)

def test_real_vs_noise(evaluator):
    x_test = load_mnist("test")[0]
    real = evaluator.evaluate(x_test[seeded_subset(len(x_test), N, seed=0)])
    noise = evaluator.evaluate((0.5 * torch.randn(N, 1, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    assert real["n"] == N and sum(real["class_histogram"]) == N
    assert real["mean_confidence"] > 0.97 and real["entropy_ratio"] > 0.99
    assert noise["classifier_fid"] > 20 * real["classifier_fid"]
    assert real["classifier_fid"] < 3 * real["reference_fid"] + 1     # real test ≈ real train at the same n
    # uint8 32×32 padded, float 28×28: the same images give the same numbers
    padded = torch.nn.functional.pad(x_test[:N], (2, 2, 2, 2))
    a, b = evaluator.evaluate(padded, reference=False), evaluator.evaluate(x_test[:N].float() / 127.5 - 1, reference=False)
    assert math.isclose(a["classifier_fid"], b["classifier_fid"], rel_tol=1e-6)

def test_reference_fid(evaluator):
    r = evaluator.reference_fid(N)
    assert r == evaluator.reference_fid(N) and r >= 0
    with pytest.raises(ConfigError, match="n=1"): evaluator.reference_fid(1)

def test_bad_samples(evaluator):
    with pytest.raises(ConfigError, match="shape"): evaluator.evaluate(torch.zeros(4, 3, 28, 28))
    with pytest.raises(ConfigError, match="shape"): evaluator.evaluate(torch.zeros(4, 28, 28))
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"): evaluator.evaluate(torch.full((4, 1, 28, 28), 255.0))
    with pytest.raises(ConfigError, match="dtype"): evaluator.evaluate(torch.zeros(4, 1, 28, 28, dtype=torch.int64))
    with pytest.raises(ConfigError, match="at least 2"): evaluator.evaluate(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="NaN"): evaluator.evaluate(torch.full((4, 1, 28, 28), float("nan")))
    with pytest.raises(ConfigError, match="Tensor or numpy"): evaluator.evaluate([[0.0]])
    with pytest.warns(UserWarning, match=r"\[0, 1\]"): prepare_samples(torch.rand(4, 1, 28, 28))

def test_corrupt_cache_is_named(tmp_path):
    bad = tmp_path/"mnist_classifier-v1.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SkindiffError, match="mnist_classifier-v1.pt.*corrupt.*retrain=True"): load_mnist_classifier(bad)
    with pytest.raises(SkindiffError, match="no cached"): load_mnist_classifier(tmp_path/"missing.pt")
