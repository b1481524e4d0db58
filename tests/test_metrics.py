"""skindiff.metrics: IS/FID/KID/precision-recall against closed forms and torch-fidelity (same features, ≤ 1 %),
the offline TF-Inception port (sha256, conversion into torch-fidelity's InceptionV3, registration), reference-statistics
cache, bad input. Inception runs on a handful of CIFAR-10 images only (≈ 3-6 images/s on 2 CPU cores)."""
import math, warnings

import numpy as np
import pytest
import torch
from torch import nn

import skindiff.metrics as M
from skindiff.core import ConfigError
from skindiff.data import ChecksumError, DataNotFoundError, load_cifar10, to_model_range

torch.set_num_threads(2)
N_CHEAP = 300            # images per side for the cheap-extractor agreement test


@pytest.fixture(scope="module")
def cifar():
    x, y, info = load_cifar10("test")
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:2 * N_CHEAP]
    return x[idx[:N_CHEAP]], x[idx[N_CHEAP:]], info


class TinyCNN(nn.Module):
    "A deterministic (seeded, untrained) CNN: uint8 N×3×32×32 → N×16 'logits'; cheap stand-in for a classifier."
    weights, weights_sha256 = "tiny-cnn seed 0", "0" * 64
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 16))
    def forward(self, x):
        return 100 * self.net(to_model_range(x))        # sharpen p(y|x) so that IS is well above 1


@pytest.fixture(scope="module")
def port():
    return M.PortInception()


# --- input ------------------------------------------------------------------------------------------

def test_prepare_images_ranges():
    assert (M.prepare_images(torch.full((2, 3, 4, 4), -1.0)) == 0).all()
    assert (M.prepare_images(torch.full((2, 3, 4, 4), 1.0)) == 255).all()
    assert (M.prepare_images(torch.full((2, 3, 4, 4), 0.5), value_range=(0, 1)) == 128).all()
    u = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(M.prepare_images(u), u)
    assert torch.equal(M.prepare_images(u.numpy()), u)


@pytest.mark.parametrize("x, match", [
    (torch.rand(2, 3, 4, 4) * 255, "outside value_range"),
    (torch.rand(2, 3, 4, 4) - 1.5, "outside value_range"),
    (torch.zeros(2, 4, 4, 3), "channels last"),
    (torch.zeros(2, 2, 4, 4), "C = 1 or 3"),
    (torch.zeros(3, 4, 4), "N×C×H×W"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.int64), "dtype"),
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
])
def test_prepare_images_bad(x, match):
    with pytest.raises(ConfigError, match=match): M.prepare_images(x)


def test_prepare_images_bad_range_name():
    with pytest.raises(ConfigError, match="value_range"): M.prepare_images(torch.zeros(2, 3, 4, 4), value_range=(0, 255))


def test_grey_repeated_once(monkeypatch):
    monkeypatch.setattr(M, "_grey_told", False)
    g = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="repeating it to 3 channels"):
        out = M.prepare_images(g)
    assert out.shape == (2, 3, 5, 5) and all(torch.equal(out[:, c], g[:, 0]) for c in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.prepare_images(g)                                  # second time: silent


def test_fewer_than_two_images():
    f = torch.randn(5, 4)
    with pytest.raises(ConfigError, match="at least 2"): M.fid_from_features(f[:1], f)
    with pytest.raises(ConfigError, match="at least 2"): M.kid_from_features(f, f[:1], subset_size=2)
    with pytest.raises(ConfigError, match="at least 2"): M.ImageDataset(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="splits"): M.inception_score(torch.randn(1, 10), splits=1)


def test_biased_warning_and_kid_subset():
    f = torch.randn(40, 64)
    with pytest.warns(M.BiasedFIDWarning, match="10,000 or 50,000"):
        M.fid_from_features(f[:20], f[20:])
    with pytest.raises(ConfigError, match="subset_size=30 is larger"):
        M.kid_from_features(f[:20], f[20:], subset_size=30)


# --- the equations ----------------------------------------------------------------------------------

def test_inception_score_closed_forms():
    assert M.inception_score(torch.zeros(100, 7))[0] == pytest.approx(1, abs=1e-12)
    onehot = 60 * torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).double()
    assert M.inception_score(onehot, shuffle=False)[0] == pytest.approx(10, rel=1e-6)   # balanced splits
    # one split, two images: p1 = (1, 0), p2 = (½, ½) → p(y) = (¾, ¼); KL1 = ln(4/3), KL2 = ½ln(2/3) + ½ln 2
    logits = torch.tensor([[0.0, -1e4], [0.0, 0.0]], dtype=torch.float64)
    expect = math.exp((math.log(4 / 3) + 0.5 * math.log(2 / 3) + 0.5 * math.log(2)) / 2)
    assert M.inception_score(logits, splits=1)[0] == pytest.approx(expect, rel=1e-12)


def test_fid_kid_pr_basic():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert M.fid_from_features(a, a) == pytest.approx(0, abs=1e-9)
    assert M.fid_from_features(a, a + 2) == pytest.approx(32, rel=1e-9)          # shift only: ‖Δμ‖² = 8·4
    assert M.precision_recall(a, a) == (1.0, 1.0)
    assert M.precision_recall(a, a + 100) == (0.0, 0.0)
    b = rng.normal(size=(400, 8))
    same, shifted = M.kid_from_features(a, b, subset_size=200)[0], M.kid_from_features(a, b + 1, subset_size=200)[0]
    assert abs(same) < 0.05 * shifted                                          # unbiased: ≈ 0 for one distribution


def test_agreement_with_torch_fidelity_functions():
    "Same features into torch-fidelity's FID/KID/PRC/IS code and ours."
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.randn(500, 32, generator=g), torch.randn(400, 32, generator=g) * 1.1 + 0.2
    theirs = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), False)["frechet_inception_distance"]
    assert M.fid_from_features(f1, f2) == pytest.approx(theirs, rel=1e-6)
    kw = dict(kid_subsets=20, kid_subset_size=100, kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
              kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    kt = kid_features_to_metric(f1, f2, **kw)
    assert M.kid_from_features(f1, f2, subsets=20, subset_size=100) == pytest.approx(
        (kt["kernel_inception_distance_mean"], kt["kernel_inception_distance_std"]), rel=1e-5)
    pt = prc_features_to_metric(f1, f2, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert M.precision_recall(f1, f2) == pytest.approx((pt["precision"], pt["recall"]))
    it = isc_features_to_metric(f1[:, :10] * 3)
    assert M.inception_score(f1[:, :10] * 3) == pytest.approx((it["inception_score_mean"], it["inception_score_std"]), rel=1e-9)


def test_agreement_end_to_end_same_classifier(cifar):
    "torch_fidelity.calculate_metrics with our classifier registered vs our code: FID, KID, IS within 1 %."
    a, b, _ = cifar
    net = TinyCNN().eval()
    name = M.classifier_extractor("skindiff-test-tinycnn", net)
    theirs = M.tfidelity_metrics(a, b, feature_extractor=name, isc=True, fid=True, kid=True, feature_layer_fid="logits",
                                 feature_layer_kid="logits", kid_subset_size=100, batch_size=100)
    fa = M.extract_features(a, net, progress=False, batch_size=64)
    fb = M.extract_features(b, net, progress=False, batch_size=64)
    ours = {"frechet_inception_distance": M.fid_from_features(fa, fb),
            "kernel_inception_distance_mean": M.kid_from_features(fa, fb, subset_size=100)[0],
            "inception_score_mean": M.inception_score(fa)[0]}
    for k, v in ours.items():
        assert v == pytest.approx(theirs[k], rel=0.01), k
    assert ours["inception_score_mean"] > 1.05                    # not a degenerate classifier


# --- the offline Inception ---------------------------------------------------------------------------

def test_port_checksum(tmp_path):
    assert M.port_weights_path().is_file()
    bad = tmp_path/"default_1.pt"
    bad.write_bytes(b"not the weights")
    with pytest.raises(ChecksumError, match="TF-Inception port"): M.load_port(bad)
    with pytest.raises(DataNotFoundError): M.load_port(tmp_path/"missing.pt")


def test_port_layout_and_conversion():
    sd = M.load_port().state_dict()
    assert len(sd) == 4 * M.PORT_N_CONVS and not any("fc" in k for k in sd)
    conv = M.port_to_tfidelity_state_dict(sd)
    assert "Mixed_7c.branch_pool.conv.weight" in conv and "fc.weight" not in conv
    assert torch.equal(conv["Conv2d_1a_3x3.bn.weight"], torch.ones(32))


def test_port_matches_converted_and_torch_fidelity(cifar, port):
    "Same images: PortInception = torch-fidelity's InceptionV3 with converted weights; torch-fidelity FID (port) = ours."
    a, b, _ = cifar
    a, b = a[:10], b[:10]
    fa = M.extract_features(a, port, progress=False)
    assert fa.shape == (10, M.INCEPTION_FEATURES)
    M.register_torch_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as R
    conv = R[M.TFID_CONVERTED](M.TFID_CONVERTED, ["2048"])
    assert conv.fc is None
    with torch.no_grad(): fc = conv(a)[0]
    assert (fa - fc).abs().max() < 1e-3
    fb = M.extract_features(b, port, progress=False)
    with pytest.warns(M.BiasedFIDWarning): ours = M.fid_from_features(fa, fb)
    theirs = M.tfidelity_metrics(a, b, feature_extractor=M.TFID_PORT, fid=True, batch_size=10)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=0.01)
    with pytest.raises(ConfigError, match="needs logits"):
        M.tfidelity_metrics(a, feature_extractor=M.TFID_PORT, isc=True)
    with pytest.raises(ConfigError, match="uint8"): port(torch.rand(2, 3, 32, 32))


def test_official_weights_paths(tmp_path, monkeypatch, cifar):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="download=True"): M.official_inception_weights()
    # a stand-in file in the official format: converted port + a random fc (wrong hash unless verify=False)
    sd = M.port_to_tfidelity_state_dict()
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1008, 2048, generator=g) * 0.01, torch.zeros(1008)
    p = tmp_path/"fake-official.pth"
    torch.save(sd, p)
    with pytest.raises(ChecksumError, match="official"): M.official_inception_weights(p)
    off = M.OfficialInception(p, verify=False)
    x = cifar[0][:2]
    with torch.no_grad():
        assert off(x).shape == (2, 2048) and off.logits(x).shape == (2, 1008)


# --- results and cache -------------------------------------------------------------------------------

def test_reference_cache_and_labels(tmp_path, monkeypatch, cifar):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path))
    a, b, info = cifar
    net = TinyCNN()
    calls = []
    def images(): calls.append(1); return b
    r1 = M.reference_statistics("tiny-ref", images, net, info["reference"], batch_size=100, progress=False)
    r2 = M.reference_statistics("tiny-ref", images, net, info["reference"], batch_size=100, progress=False)
    assert len(calls) == 1 and M.stats_path("tiny-ref", net.weights_sha256).is_file()
    assert np.allclose(r1.mu, r2.mu) and r2.reference == info["reference"] and r2.weights == net.weights and r2.n == N_CHEAP
    res = M.fid_to_reference(a, r2, net, batch_size=100, progress=False)
    s = str(res)
    assert "JPEG" in s and net.weights in s and res.n_samples == N_CHEAP and not res.biased
    assert float(res) == pytest.approx(M.fid_from_features(M.extract_features(a, net, progress=False),
                                                           M.extract_features(b, net, progress=False)), rel=1e-6)
    class Other(TinyCNN): weights = "other"
    with pytest.raises(ConfigError, match="computed with"): M.fid_to_reference(a, r2, Other())
    with pytest.raises(ConfigError, match="name="): M.stats_path("a b", "0" * 64)


def test_streaming_batches(cifar):
    a = cifar[0][:50]
    net = TinyCNN()
    full = M.extract_features(a, net, progress=False, batch_size=50)
    streamed = M.extract_features((a[i:i + 7] for i in range(0, 50, 7)), net, progress=False)
    assert torch.allclose(full, streamed, atol=1e-5)
    floats = M.extract_features(to_model_range(a), net, progress=False)          # [-1, 1] floats → same uint8
    assert torch.allclose(full, floats, atol=1e-5)
