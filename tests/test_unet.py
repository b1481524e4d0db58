"""Tests for `skindiff.unet`: shapes of every preset, class conditioning with the null class, bad input,
the time embedding, gradient flow, determinism."""
import pytest
import torch

from skindiff.core import ConfigError
from skindiff.unet import (UNET_PRESETS, UNet, UNetConfig, count_parameters, sinusoidal_embedding, unet_preset)

BATCH = 2
TINY = dict(base_channels=16, norm_groups=4, num_heads=2)     # shrinks a preset for fast tests


def _randomize_zero_init(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    "Give the zero-initialised layers random weights, so outputs depend on the inputs (for checks)."
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any(): p.normal_(0, std)
    return model


def _inputs(cfg: UNetConfig, batch: int = BATCH, size: int | None = None):
    s = size or cfg.image_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.in_channels, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g)


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_preset_output_shape(name):
    cfg = unet_preset(name)
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, t = _inputs(cfg)
    with torch.no_grad(): out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out == 0).all()                                  # zero-initialised output conv


def test_mnist_preset_size_and_zero_init():
    assert 1_000_000 <= count_parameters(UNet(unet_preset("mnist"))) <= 2_000_000


@pytest.mark.parametrize("size", [28, 32, 40])
def test_other_sizes_divisible_by_four(size):
    cfg = unet_preset("mnist", **TINY)
    x, t = _inputs(cfg, size=size)
    assert UNet(cfg)(x, t).shape == x.shape


def test_float_and_scalar_timesteps():
    cfg = unet_preset("mnist", **TINY)
    model = _randomize_zero_init(UNet(cfg)).eval()
    x, _ = _inputs(cfg)
    with torch.no_grad():
        assert torch.allclose(model(x, 5), model(x, torch.tensor([5, 5])))
        assert torch.allclose(model(x, torch.tensor([5.0, 5.0])), model(x, torch.tensor([5, 5])))
        assert model(x, torch.tensor([0.25, 0.75])).shape == x.shape


def test_class_conditioning_null_class():
    cfg = unet_preset("mnist", num_classes=10, **TINY)
    model = _randomize_zero_init(UNet(cfg)).eval()
    assert model.null_class == 10 and model.label_embed.num_embeddings == 11
    x, t = _inputs(cfg)
    with torch.no_grad():
        null = model(x, t, torch.full((BATCH,), model.null_class))
        assert torch.equal(model(x, t), null)                         # y=None means all-null
        assert not torch.allclose(model(x, t, torch.tensor([3, 7])), null)
        a, b = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([4, 4]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [[0, 11], [-1, 0]])
def test_bad_label_is_an_error(bad):
    cfg = unet_preset("mnist", num_classes=10, **TINY)
    x, t = _inputs(cfg)
    with pytest.raises(ConfigError, match=r"y: labels must lie in \[0, 10\]"):
        UNet(cfg)(x, t, torch.tensor(bad))


def test_bad_label_type_or_shape():
    cfg = unet_preset("mnist", num_classes=10, **TINY)
    model = UNet(cfg)
    x, t = _inputs(cfg)
    with pytest.raises(ConfigError, match="integer class labels"): model(x, t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="integer class labels"): model(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="unconditional"): UNet(unet_preset("mnist", **TINY))(x, t, torch.tensor([1, 2]))


def test_bad_image_size_is_an_error():
    cfg = unet_preset("mnist", **TINY)
    model = UNet(cfg)
    x, t = _inputs(cfg, size=30)
    with pytest.raises(ConfigError, match=r"image size 30×30 must be divisible by 4"): model(x, t)
    with pytest.raises(ConfigError, match=r"x: expected shape \(B, 1, H, W\)"): model(torch.randn(2, 3, 32, 32), t)
    with pytest.raises(ConfigError, match=r"t: expected shape \(2,\)"): model(torch.randn(2, 1, 32, 32), torch.zeros(3))


@pytest.mark.parametrize("field, value", [("image_size", 30), ("channel_mults", ()), ("attention_resolutions", (5,)),
                                          ("norm_groups", 5), ("num_heads", 3), ("dropout", 1.0), ("num_classes", 0),
                                          ("base_channels", 0), ("base_channels", 33)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"UNetConfig.{field}="):
        unet_preset("mnist", **{field: value})


def test_unknown_preset_and_override():
    with pytest.raises(ConfigError, match="unet preset 'imagenet'"): unet_preset("imagenet")
    with pytest.raises(ConfigError, match="unknown UNetConfig fields"): unet_preset("mnist", widht=3)


def test_time_embedding_distinct():
    t = torch.arange(0, 1000, 7)
    emb = sinusoidal_embedding(t, 64)
    assert emb.shape == (len(t), 64) and torch.isfinite(emb).all()
    dist = torch.cdist(emb, emb) + torch.eye(len(t)) * 1e9
    assert dist.min() > 0.1                                   # every pair of steps gets a different code
    assert torch.allclose(sinusoidal_embedding(torch.tensor([3]), 64), sinusoidal_embedding(torch.tensor([3.0]), 64))
    model = UNet(unet_preset("mnist", **TINY))
    with torch.no_grad(): h = model.time_embed(torch.tensor([0, 1, 500, 999]))
    assert torch.cdist(h, h)[~torch.eye(4, dtype=bool)].min() > 0
    with pytest.raises(ConfigError, match="dim=7"): sinusoidal_embedding(t, 7)
    with pytest.raises(ConfigError, match="t: expected a \\(B,\\)"): sinusoidal_embedding(torch.zeros(2, 2), 8)


def test_gradient_flows_to_every_parameter():
    cfg = unet_preset("mnist", num_classes=10, **TINY)
    torch.manual_seed(0)
    model = _randomize_zero_init(UNet(cfg))
    x, t = _inputs(cfg)
    loss = (model(x, t, torch.tensor([1, model.null_class])) - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # only label rows that were not used may lack a gradient; their parameter holds all rows, so it has one
    assert not no_grad, no_grad


def test_zero_init_model_trains():
    "From the real (zero) initialisation a few AdamW steps make the output non-zero and reduce the loss."
    cfg = unet_preset("mnist", **TINY)
    torch.manual_seed(0)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = _inputs(cfg, batch=4)
    target = x.flip(-1)
    losses = []
    for _ in range(4):
        loss = (model(x, t) - target).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_deterministic_in_eval_mode():
    cfg = unet_preset("mnist", dropout=0.3, **TINY)
    model = _randomize_zero_init(UNet(cfg)).eval()
    x, t = _inputs(cfg)
    with torch.no_grad(): a, b = model(x, t), model(x, t)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad(): c, d = model(x, t), model(x, t)
    assert not torch.equal(c, d)                               # dropout is active in training mode


def test_channels_last_matches():
    cfg = unet_preset("mnist", **TINY)
    model = _randomize_zero_init(UNet(cfg)).eval()
    x, t = _inputs(cfg)
    with torch.no_grad():
        a = model(x, t)
        b = model.to(memory_format=torch.channels_last)(x, t)
    assert torch.allclose(a, b, atol=1e-5)
