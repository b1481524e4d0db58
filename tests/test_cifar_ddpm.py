"""CIFAR-10 DDPM recipe: flips drawn from the step's generator (exact resume), config checks, cached labelled
features, sample metrics."""
import pytest, torch
from torch import nn
import skindiff.cifar_ddpm as CD
from skindiff.cifar_ddpm import CifarDDPMConfig, random_hflip, sample_metrics, cifar_features
from skindiff.train import checkpoint_step
from skindiff.core import ConfigError
from skindiff.metrics import ReferenceStats, feature_statistics
from skindiff.mnist_ddpm import train_ddpm
from skindiff.train import list_checkpoints


def test_hflip_is_seeded_and_flips_whole_images():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(8, 1, 1, 1)
    a = random_hflip(x, torch.Generator().manual_seed(1))
    b = random_hflip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [bool(torch.equal(a[i], x[i].flip(-1))) for i in range(len(x))]
    kept = [bool(torch.equal(a[i], x[i])) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)
    assert torch.equal(random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))
    with pytest.raises(ConfigError, match="p=1.5"): random_hflip(x, torch.Generator(), p=1.5)


def test_config_checks_and_checkpoints():
    with pytest.raises(ConfigError, match="image_size=28"): CifarDDPMConfig(image_size=28)
    with pytest.raises(ConfigError, match="n_checkpoints=0"): CifarDDPMConfig(n_checkpoints=0)
    cfg = CifarDDPMConfig(train_steps=1000, n_checkpoints=4)
    tc = cfg.train_config()
    assert tc.ckpt_every == 250 and tc.keep_ckpts == 5
    u = cfg.unet_config()
    assert (u.in_channels, u.base_channels, u.channel_mults, u.num_res_blocks, u.attention_resolutions, u.dropout) == (3, 32, (1, 2, 2), 1, (8,), 0.1)
    assert cfg.meta()["dataset"] == "cifar10" and cfg.meta()["augment"] == "hflip"
    assert CifarDDPMConfig(hflip=False).meta()["augment"] is None
    assert checkpoint_step("/x/ckpt_00001000.pt") == 1000
    with pytest.raises(ConfigError, match="not a checkpoint"): checkpoint_step("model.pt")


def _tiny(steps):
    return CifarDDPMConfig(train_steps=steps, batch_size=4, warmup_steps=0, lr_schedule="constant", base_channels=16,
                           num_res_blocks=1, attention_resolutions=(), n_checkpoints=steps)


def test_resume_with_flips_is_exact(tmp_path):
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    straight, _ = train_ddpm(_tiny(4), images, tmp_path / "a", progress=False, augment=random_hflip)
    train_ddpm(_tiny(2), images, tmp_path / "b", progress=False, augment=random_hflip)
    resumed, _ = train_ddpm(_tiny(4), images, tmp_path / "b", progress=False, augment=random_hflip)
    assert resumed.resumed_from == 2 and resumed.losses == straight.losses
    for p, q in zip(straight.ema.parameters(), resumed.ema.parameters()): assert torch.equal(p, q)
    plain, _ = train_ddpm(_tiny(4), images, tmp_path / "c", progress=False)
    assert plain.losses != straight.losses             # the flips change the batches
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "a")] == [1, 2, 3, 4]   # all kept


class FakeExtractor(nn.Module):
    "uint8 N×3×H×W → N×6 channel means and stds; counts calls."
    weights, weights_sha256 = "fake", "f" * 64
    def __init__(self): super().__init__(); self.calls = 0
    def forward(self, x):
        self.calls += 1
        x = x.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_cifar_features_are_cached_and_labelled(tmp_path, monkeypatch):
    pytest.importorskip("PIL")
    try: CD.load_cifar10("test")
    except Exception as e: pytest.skip(f"CIFAR-10 not available: {e}")
    monkeypatch.setattr(CD, "cache_dir", lambda: tmp_path)
    ex = FakeExtractor()
    f, y = cifar_features("test", n=20, seed=0, extractor=ex, progress=False)
    assert f.shape == (20, 6) and y.shape == (20,) and torch.bincount(y, minlength=10).tolist() == [2] * 10   # stratified
    calls = ex.calls
    f2, y2 = cifar_features("test", n=20, seed=0, extractor=ex, progress=False)
    assert ex.calls == calls and torch.equal(f, f2) and torch.equal(y, y2)       # from the cache
    assert len(list((tmp_path / "cifar_features").glob("*test-n20-s0-ffff*.pt"))) == 1


def test_sample_metrics():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g) + 0.5
    mu, sigma = feature_statistics(real)
    ref = ReferenceStats(mu, sigma, len(real), "toy reference", "toy weights")
    clf = nn.Linear(6, 10)
    m = sample_metrics(fake, ref, clf, real)
    assert m["n"] == 30 and sum(m["class_histogram"]) == 30 and len(m["class_histogram"]) == 10
    assert "toy reference" in str(m["fid"]) and "toy weights" in str(m["fid"]) and m["fid"].fid > 0
    assert 1 <= m["is_mean"] <= 10 and "kid_mean" in m
    with pytest.raises(ConfigError, match="at least 2"): sample_metrics(fake[:1], ref, clf)
