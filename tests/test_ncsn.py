"""Tests for `skindiff.ncsn`: NCSNv2's noise-level and step-size rules on toy inputs, the DSM minimiser on Gaussian
data, annealed Langevin dynamics with an exact score, checkpoints of another model, and bad input."""
import itertools, math

import pytest
import torch
from scipy.stats import norm

from skindiff.core import ConfigError
from skindiff.mnist_ddpm import MnistDDPMConfig, train_ddpm
from skindiff.ncsn import (MnistNCSNConfig, NoiseConditionalScoreNet, annealed_langevin, check_sigmas, denoise_step, dsm_loss,
                           geometric_ratio, geometric_sigmas, langevin_step_size, langevin_variance_ratio, level_overlap,
                           max_pairwise_distance, ncsnv2_noise_levels, num_levels_for_ratio, score_fn_from_model, train_ncsn)
from skindiff.train import CheckpointError, load_weights
from skindiff.unet import UNet

torch.set_num_threads(2)
N_SE = 5                        # Monte-Carlo tolerance, in standard errors
MU, S = 0.5, 0.3                # Gaussian test data N(MU, S² I)


def gaussian_score(mu, s):
    "The exact score of N(mu, s² I) perturbed at level σ: −(x − mu)/(s² + σ²)."
    return lambda x, sigma: -(x - mu) / (s**2 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


# ---- technique 1 and 2: the noise levels ----

@pytest.mark.parametrize("dim", [16, 64, 784, 3072])
def test_gamma_satisfies_its_equation(dim):
    "γ solves Φ(√(2D)(γ−1)+3γ) − Φ(√(2D)(γ−1)−3γ) = 1/2, checked with scipy's Φ."
    g = geometric_ratio(dim)
    a = math.sqrt(2 * dim) * (g - 1)
    assert g > 1 and abs(norm.cdf(a + 3 * g) - norm.cdf(a - 3 * g) - 0.5) < 1e-9
    assert abs(level_overlap(g, dim) - 0.5) < 1e-12


def test_gamma_rule_reproduces_ncsnv2_scale():
    "CIFAR-10 (D = 3072, σ_1 = 50, σ_L = 0.01): NCSNv2 used L = 232; the rule at overlap 1/2 gives 220."
    g = geometric_ratio(3072)
    assert num_levels_for_ratio(50, 0.01, g) == 220


def test_gamma_rule_has_no_solution_in_low_dimension():
    with pytest.raises(ConfigError, match=r"dim \(D\)=2"):
        geometric_ratio(2)
    with pytest.raises(ConfigError, match="dim"):
        geometric_ratio(0)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_sigma_max_is_the_max_pairwise_distance(chunk):
    x = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x[5] += 3                                          # one far point, so the maximum is unambiguous
    brute = max(float((x[i].double() - x[j].double()).norm()) for i, j in itertools.combinations(range(len(x)), 2))
    assert max_pairwise_distance(x, chunk=chunk) == pytest.approx(brute, rel=1e-12)


def test_geometric_levels_and_their_number():
    sig = geometric_sigmas(50.0, 0.01, 232)
    assert sig.dtype == torch.float64 and len(sig) == 232 and sig[0] == 50.0 and sig[-1] == 0.01
    ratios = sig[:-1] / sig[1:]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-10)
    g = 1.05
    L = num_levels_for_ratio(50.0, 0.01, g)
    assert (50 / 0.01) ** (1 / (L - 1)) <= g < (50 / 0.01) ** (1 / (L - 2))
    assert num_levels_for_ratio(8.0, 1.0, 2.0) == 4         # exactly 8 = 2³: no extra level from round-off


def test_ncsnv2_noise_levels_cap_keeps_both_ls():
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    full = ncsnv2_noise_levels(x, 0.02)
    capped = ncsnv2_noise_levels(x, 0.02, max_levels=10)
    assert full.num_levels == full.num_levels_rule > 10 and full.gamma <= full.gamma_rule
    assert capped.num_levels == 10 and capped.num_levels_rule == full.num_levels_rule and capped.gamma > capped.gamma_rule
    assert capped.sigma_max == pytest.approx(max_pairwise_distance(x)) and capped.dim == 784
    assert len(capped.sigmas) == 10 and float(capped.sigmas[-1]) == 0.02


# ---- technique 4: the step size ----

@pytest.mark.parametrize("sigma_max, L, eps_paper", [(50, 232, 6.2e-6), (90, 500, 3.3e-6)])
def test_step_size_reproduces_ncsnv2(sigma_max, L, eps_paper):
    "NCSNv2's configs: CIFAR-10 (σ_1 = 50, L = 232, T = 5, ε = 6.2e-6) and CelebA (σ_1 = 90, L = 500, T = 5, ε = 3.3e-6)."
    gamma = (sigma_max / 0.01) ** (1 / (L - 1))
    eps = langevin_step_size(0.01, gamma, 5)
    assert eps == pytest.approx(eps_paper, rel=0.02)
    best = langevin_variance_ratio(eps, 0.01, gamma, 5)
    assert all(abs(langevin_variance_ratio(eps * f, 0.01, gamma, 5) - 1) > abs(best - 1) for f in (0.8, 1.25))


def test_variance_ratio_matches_a_simulated_chain():
    "Eq 4: T Langevin steps at σ on a single data point, from N(0, γ²σ² I), end with variance ratio s_T²/σ²."
    sigma, gamma, T, eps, n = 0.5, 1.3, 4, 0.02, 200_000
    g = torch.Generator().manual_seed(0)
    x0 = gamma * sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    point_score = lambda x, s: -x / s.reshape(-1, 1) ** 2
    out = annealed_langevin(point_score, [sigma], (n, 1), T, eps, generator=g, denoise=False, x_init=x0,
                            progress=False, dtype=torch.float64)
    ratio = float(out.samples.var()) / sigma**2
    expected = langevin_variance_ratio(eps, sigma, gamma, T)
    assert abs(ratio - expected) < N_SE * expected * math.sqrt(2 / n), (ratio, expected)


# ---- eq 2.8: the DSM minimiser ----

def test_dsm_minimiser_is_the_perturbed_gaussian_score():
    """A score model that can represent the exact answer, s(x̃, σ_i) = (a_i x̃ + b_i)/σ_i, fitted by minimising
    `dsm_loss` on N(MU, S² I) data, recovers −(x̃ − MU)/(S² + σ_i²) at every level: σ_i s is a least-squares
    regression of −z on x̃, so its slope and its value at x̃ = MU are checked within N_SE standard errors."""
    sigmas, n, dim = geometric_sigmas(2.0, 0.05, 5).float(), 50_000, 3
    x = MU + S * torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    a = torch.zeros(len(sigmas), requires_grad=True)
    b = torch.zeros(len(sigmas), requires_grad=True)

    def model(x_tilde, sigma):
        i = (sigma[:, None] == sigmas[None]).float().argmax(1)
        return (a[i, None] * x_tilde + b[i, None]) / sigma[:, None]

    opt = torch.optim.LBFGS([a, b], lr=1, max_iter=200, line_search_fn="strong_wolfe")
    def closure():                                     # the same draws every call: a fixed quadratic objective
        opt.zero_grad()
        loss = dsm_loss(model, x, sigmas, torch.Generator().manual_seed(1))
        loss.backward()
        return loss
    opt.step(closure)
    m = n * dim / len(sigmas)                          # regression pairs per level (about)
    for i, sig in enumerate(sigmas.tolist()):
        slope, at_mu = float(a[i].detach()), float((a[i] * MU + b[i]).detach())       # σ s = slope · x̃ + b
        exact_slope = -sig / (S**2 + sig**2)                      # σ · −(x̃ − MU)/(S² + σ²)
        resid = S**2 / (S**2 + sig**2)                            # Var(z | x̃)
        se_slope, se_mu = math.sqrt(resid / (m * (S**2 + sig**2))), math.sqrt(resid / m)
        assert abs(slope - exact_slope) < N_SE * se_slope, (sig, slope, exact_slope)
        assert abs(at_mu) < N_SE * se_mu, (sig, at_mu)


def test_dsm_loss_of_a_zero_score_is_one_half():
    sigmas = geometric_sigmas(1.0, 0.1, 4).float()
    x = torch.randn(4096, 2, 3)
    loss = dsm_loss(lambda x, s: torch.zeros_like(x), x, sigmas, torch.Generator().manual_seed(0))
    assert abs(float(loss) - 0.5) < N_SE * 0.5 * math.sqrt(2 / x.numel())


# ---- eq 2.9: annealed Langevin dynamics ----

LANGEVIN_N, LANGEVIN_DIM = 10_000, 2
LANGEVIN_SIGMA_MIN = 0.05
LANGEVIN_REL_STEP = 0.3          # ε = 0.3 σ_L²: at σ_L, α/(S² + σ_L²) = 0.008 per step, 100 steps per level: mixed


def _langevin_gaussian(sign: float, seed: int = 0):
    "Annealed Langevin from σ_1 = 3 to σ_L = 0.05 (L = 20, T = 100) with the exact score of N(MU, S² I), its sign flipped or not."
    sig = geometric_sigmas(3.0, LANGEVIN_SIGMA_MIN, 20)
    score = gaussian_score(MU, S)
    return annealed_langevin(lambda x, s: sign * score(x, s), sig, (LANGEVIN_N, LANGEVIN_DIM), 100,
                             LANGEVIN_REL_STEP * LANGEVIN_SIGMA_MIN**2, generator=torch.Generator().manual_seed(seed),
                             denoise=False, progress=False).samples


def _recovers(x, mu, var) -> bool:
    """Mean within N_SE standard errors, variance within N_SE standard errors (relative √(2/n)) of N(mu, var): 0.011
    and 5 % for 20 000 values. The discretised chain's own bias, 1/(1 − α/2v) − 1 < 0.5 %, is well inside."""
    if not torch.isfinite(x).all(): return False
    n = x.numel()
    return abs(float(x.mean()) - mu) < N_SE * math.sqrt(var / n) and abs(float(x.var()) / var - 1) < N_SE * math.sqrt(2 / n)


def test_annealed_langevin_recovers_a_gaussian():
    x = _langevin_gaussian(+1.0)
    assert _recovers(x, MU, S**2 + LANGEVIN_SIGMA_MIN**2), (float(x.mean()), float(x.var()))


def test_flipped_score_fails():
    x = _langevin_gaussian(-1.0)
    assert not _recovers(x, MU, S**2 + LANGEVIN_SIGMA_MIN**2)


def test_denoising_step_is_tweedie_on_the_same_chain():
    sig, shape, score = geometric_sigmas(2.0, 0.1, 6), (64, 3), gaussian_score(MU, S)
    raw = annealed_langevin(score, sig, shape, 3, 1e-3, generator=torch.Generator().manual_seed(0), denoise=False,
                            return_intermediates=3, progress=False)
    den = annealed_langevin(score, sig, shape, 3, 1e-3, generator=torch.Generator().manual_seed(0), denoise=True, progress=False)
    assert raw.nfe == 18 and den.nfe == 19 and raw.timesteps == list(range(6))
    assert torch.allclose(den.samples, denoise_step(score, raw.samples, 0.1))
    assert torch.allclose(den.samples, MU + (raw.samples - MU) * S**2 / (S**2 + 0.01))
    assert [s["level"] for s in raw.intermediates] == [0, 2, 5] and raw.intermediates[-1]["sigma"] == pytest.approx(0.1)


# ---- the score network and its checkpoints ----

@pytest.mark.filterwarnings("ignore:precision='bfloat16'")   # said on CPUs without bfloat16 units; the numbers are what is tested
def test_score_net_divides_by_sigma_and_wraps_in_bfloat16():
    cfg = MnistNCSNConfig(sigma_max=10.0, sigma_min=0.02, num_levels=5, base_channels=16).unet_config()
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(cfg).eval()
    x = torch.randn(3, 1, 28, 28)
    assert net(x, 2.0).abs().max() == 0                         # zero-initialised last layer: s = 0
    torch.nn.init.normal_(net.unet.out[-1].weight, std=0.1)
    sigma = torch.tensor([0.05, 1.0, 8.0])
    with torch.no_grad():
        assert torch.allclose(net(x, sigma), net.unet(x, sigma.log()) / sigma[:, None, None, None])
        s32, s16 = score_fn_from_model(net)(x, sigma), score_fn_from_model(net, "bfloat16")(x, sigma)
    assert s16.dtype == torch.float32 and torch.allclose(s16, s32, rtol=0.1, atol=0.1 * float(s32.abs().mean()))
    with pytest.raises(ConfigError, match="sigma"):
        net(x, torch.tensor([1.0, 0.0, 1.0]))


def _tiny(**kw):
    return dict(train_steps=1, batch_size=4, warmup_steps=0, **kw)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    levels = dict(sigma_max=20.0, sigma_min=0.02, num_levels=10)
    small = MnistNCSNConfig(**levels, **_tiny(), base_channels=16)
    res = train_ncsn(small, images, ckpt_dir=tmp_path/"ncsn", progress=False)
    assert res.step == 1 and res.checkpoint is not None
    with pytest.raises(CheckpointError, match=r"unet.base_channels: 16 in the checkpoint, 32 here"):
        train_ncsn(MnistNCSNConfig(**levels, **_tiny(), base_channels=32), images, ckpt_dir=tmp_path/"ncsn", progress=False)
    with pytest.raises(CheckpointError, match=r"num_levels: 10 in the checkpoint, 12 here"):
        train_ncsn(MnistNCSNConfig(**{**levels, "num_levels": 12}, **_tiny(), base_channels=16), images, ckpt_dir=tmp_path/"ncsn", progress=False)
    # a DDPM checkpoint (same optimisation settings) is another model
    ddpm, _ = train_ddpm(MnistDDPMConfig(**_tiny(), base_channels=16), images, ckpt_dir=tmp_path/"ddpm", progress=False)
    with pytest.raises(CheckpointError, match=r"model: 'unet-mnist' in the checkpoint, 'ncsn-unet' here"):
        train_ncsn(small, images, ckpt_dir=tmp_path/"ddpm", progress=False)
    with pytest.raises(CheckpointError, match=r"model: 'unet-mnist' in the checkpoint, 'ncsn-unet' here"):
        load_weights(NoiseConditionalScoreNet(small.unet_config()), ddpm.checkpoint, meta=small.meta())
    with pytest.raises(CheckpointError, match="does not fit NoiseConditionalScoreNet"):
        load_weights(NoiseConditionalScoreNet(small.unet_config()), ddpm.checkpoint)
    with pytest.raises(CheckpointError, match="does not fit UNet"):
        load_weights(UNet(small.unet_config()), res.checkpoint)
    net = load_weights(NoiseConditionalScoreNet(small.unet_config()), res.checkpoint, meta=small.meta())
    assert isinstance(net, NoiseConditionalScoreNet)


# ---- bad input ----

def _score(x, s): return torch.zeros_like(x)

@pytest.mark.parametrize("call, match", [
    (lambda: geometric_sigmas(0.01, 1.0, 10), "sigma_min=1.0 must be smaller than sigma_max=0.01"),
    (lambda: geometric_sigmas(1.0, 1.0, 10), "sigma_min"),
    (lambda: geometric_sigmas(1.0, -0.1, 10), "sigma_min"),
    (lambda: MnistNCSNConfig(sigma_max=0.5, sigma_min=1.0, num_levels=10), "sigma_min"),
    (lambda: geometric_sigmas(1.0, 0.01, 0), r"num_levels \(L\)=0"),
    (lambda: geometric_sigmas(1.0, 0.01, -3), r"num_levels \(L\)"),
    (lambda: MnistNCSNConfig(sigma_max=1.0, sigma_min=0.01, num_levels=0), r"num_levels \(L\)"),
    (lambda: ncsnv2_noise_levels(torch.rand(8, 64), 0.01, max_levels=0), r"num_levels \(L\)"),
    (lambda: annealed_langevin(_score, [1.0, 0.1], (4, 2), 0, 1e-3), r"n_steps_each \(T\)=0"),
    (lambda: annealed_langevin(_score, [1.0, 0.1], (4, 2), 2.5, 1e-3), r"n_steps_each \(T\)"),
    (lambda: langevin_step_size(0.01, 1.1, 0), r"n_steps_each \(T\)"),
    (lambda: annealed_langevin(_score, [1.0, 0.1], (4, 2), 2, 0.0), r"step_size \(ε\)=0.0"),
    (lambda: annealed_langevin(_score, [1.0, 0.1], (4, 2), 2, -1e-3), r"step_size \(ε\)"),
    (lambda: langevin_variance_ratio(0.0, 0.01, 1.1, 5), r"step_size \(ε\)"),
    (lambda: annealed_langevin(lambda x, s: x[:, :1], [1.0, 0.1], (4, 2), 2, 1e-3), r"score_fn output: expected a tensor of shape \(4, 2\)"),
    (lambda: annealed_langevin(lambda x, s: None, [1.0, 0.1], (4, 2), 2, 1e-3), "score_fn output"),
    (lambda: denoise_step(lambda x, s: x[:2], torch.zeros(4, 2), 0.1), "score_fn output"),
    (lambda: annealed_langevin(_score, [0.1, 1.0], (4, 2), 2, 1e-3), "strictly decreasing"),
    (lambda: check_sigmas([]), "sigmas"),
    (lambda: annealed_langevin(_score, [1.0, 0.1], (4, 2), 2, 1e-3, x_init=torch.zeros(3, 2)), "x_init"),
    (lambda: dsm_loss(lambda x, s: x[:, :1], torch.zeros(4, 2), torch.tensor([1.0, 0.1])), "score model output"),
])
def test_bad_input_raises_config_error(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
