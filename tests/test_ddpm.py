"""Tests for `skindiff.ddpm`: the loss (eq 2.5) and its targets, reproducibility, label dropout, bad input."""
import pytest
import torch
from torch import nn

from skindiff.core import ConfigError
from skindiff.ddpm import (PREDICTIONS, ddpm_loss, drop_labels, make_ddpm_loss, model_output_to_eps, model_output_to_x0,
                           training_target, velocity)
from skindiff.schedules import get_schedule
from skindiff.train import TrainConfig, train

torch.set_num_threads(2)


class Recorder(nn.Module):
    "Returns zeros and remembers what it was called with."
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(()))
    def forward(self, x, t, y=None):
        self.seen = (x.detach().clone(), t.clone(), None if y is None else y.clone())
        return x * self.w


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_loss_is_mse_against_target(prediction):
    "The loss equals the MSE between the output and the target rebuilt from the same generator draws."
    sch = get_schedule("cosine")
    x0 = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = Recorder()
    loss = ddpm_loss(net, x0, sch, torch.Generator().manual_seed(1), prediction=prediction)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, sch.T, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    assert torch.equal(net.seen[1], t) and torch.allclose(net.seen[0], sch.q_sample(x0, t, noise=eps))
    target = {"eps": eps, "x0": x0, "v": velocity(x0, eps, t, sch)}[prediction]
    assert loss.ndim == 0 and torch.allclose(loss, target.pow(2).mean())
    assert torch.equal(loss, ddpm_loss(net, x0, sch, torch.Generator().manual_seed(1), prediction=prediction))  # reproducible


def test_conversions_round_trip():
    sch = get_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 300, 800, 999])
    xt = sch.q_sample(x0, t, noise=eps)
    v = velocity(x0, eps, t, sch)
    ab = sch.alpha_bar[t].view(-1, 1)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
    for p in PREDICTIONS:
        out = training_target(x0, eps, t, sch, p)
        assert torch.allclose(model_output_to_eps(out, xt, t, sch, p), eps, atol=1e-8)
        assert torch.allclose(model_output_to_x0(out, xt, t, sch, p), x0, atol=1e-8)


def test_label_dropout():
    sch = get_schedule("linear")
    y = torch.arange(10).repeat(100)
    net = Recorder()
    ddpm_loss(net, torch.zeros(1000, 2), sch, torch.Generator().manual_seed(0), y=y, p_uncond=0.2, null_class=10)
    dropped = net.seen[2] == 10
    assert 0.15 < dropped.float().mean() < 0.25 and torch.equal(net.seen[2][~dropped], y[~dropped])
    ddpm_loss(net, torch.zeros(1000, 2), sch, torch.Generator().manual_seed(0), y=y)
    assert torch.equal(net.seen[2], y)
    assert torch.equal(drop_labels(y, 1.0, 10), torch.full_like(y, 10))


def test_make_ddpm_loss_trains():
    "Smoke test with the training loop: a batch (x0,) and a batch (x0, y) both work and the loss falls."
    sch = get_schedule("linear", 100)
    x = 0.5 + 0.1 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0))

    class Toy(nn.Module):
        def __init__(self): super().__init__(); self.net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(), nn.Linear(32, 2))
        def forward(self, x, t, y=None): return self.net(torch.cat([x, t.float()[:, None] / 100], 1))

    cfg = TrainConfig(steps=60, batch_size=128, lr=1e-2, ema_decay=0.0)
    torch.manual_seed(0)
    res = train(Toy(), make_ddpm_loss(sch), (x,), cfg, progress=False)
    assert sum(res.losses[-10:]) < sum(res.losses[:10])
    res = train(Toy(), make_ddpm_loss(sch, prediction="v", p_uncond=0.1, null_class=3),
                (x, torch.zeros(512, dtype=torch.long)), cfg, progress=False)
    assert len(res.losses) == 60


def test_bad_input():
    sch = get_schedule("linear")
    x0 = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"expected shape \(4, 1, 8, 8\).*got \(4, 1, 4, 4\)"):
        ddpm_loss(lambda x, t: x[..., :4, :4], x0, sch)
    with pytest.raises(ConfigError, match="prediction"): ddpm_loss(lambda x, t: x, x0, sch, prediction="score")
    with pytest.raises(ConfigError, match="null_class"): ddpm_loss(lambda x, t, y: x, x0, sch, y=torch.zeros(4, dtype=torch.long), p_uncond=0.1)
    with pytest.raises(ConfigError, match="needs labels"): ddpm_loss(lambda x, t: x, x0, sch, p_uncond=0.1, null_class=10)
    with pytest.raises(ConfigError, match="y: expected labels"): ddpm_loss(lambda x, t, y: x, x0, sch, y=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="p_uncond"): make_ddpm_loss(sch, p_uncond=1.5)
    with pytest.raises(ConfigError, match="null_class"): make_ddpm_loss(sch, p_uncond=0.1)
    with pytest.raises(ConfigError, match="batch"): make_ddpm_loss(sch)(lambda x, t: x, (x0, x0, x0), None)


def test_min_snr_weighting():
    from skindiff.ddpm import min_snr_weight, ddpm_loss
    from skindiff.schedules import get_schedule
    sch = get_schedule("linear")
    t = torch.arange(0, 1000, 37)
    ab = sch.alpha_bar[t].float(); snr = ab / (1 - ab)
    assert torch.allclose(min_snr_weight(sch, t, 5.0, "eps"), torch.clamp(snr, max=5) / snr)
    assert torch.allclose(min_snr_weight(sch, t, 5.0, "x0"), torch.clamp(snr, max=5))
    assert torch.allclose(min_snr_weight(sch, t, 5.0, "v"), torch.clamp(snr, max=5) / (snr + 1))
    # with a huge gamma the ε weights are all 1: the weighted loss equals eq 2.5
    model = lambda x, t: 0.5 * x
    x0 = torch.randn(16, 1, 4, 4)
    a = ddpm_loss(model, x0, sch, torch.Generator().manual_seed(0))
    b = ddpm_loss(model, x0, sch, torch.Generator().manual_seed(0), min_snr_gamma=1e12)
    assert torch.allclose(a, b)
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        from skindiff.ddpm import make_ddpm_loss
        make_ddpm_loss(sch, min_snr_gamma=0)
    with pytest.raises(ConfigError, match=r"min_snr_gamma: expected γ > 0 or None, got -5"):
        ddpm_loss(model, x0, sch, torch.Generator().manual_seed(0), min_snr_gamma=-5)   # the function, not only the factory
