"""Tests for `skindiff.schedules`: the formulas, Monte-Carlo moments of q_sample, and diffusers as an oracle."""
import math

import pytest
import torch

from skindiff.core import ConfigError
from skindiff.schedules import (DEFAULT_T, NoiseSchedule, check_timesteps, cosine_schedule, extract, get_schedule,
                                linear_schedule)

SCHEDULE_NAMES = ("linear", "cosine")
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
ORACLE_TOL = 1e-6        # max abs difference allowed against diffusers
N_SE = 5                 # Monte-Carlo tolerance, in standard errors


@pytest.fixture(scope="module", params=SCHEDULE_NAMES)
def sch(request) -> NoiseSchedule:
    return get_schedule(request.param, DEFAULT_T)


def test_alpha_bar_basics(sch):
    assert sch.T == DEFAULT_T == len(sch.betas) and sch.betas.dtype == torch.float64
    assert (sch.alpha_bar.diff() < 0).all()                               # strictly decreasing
    assert sch.alpha_bar[0].item() == pytest.approx(1 - sch.betas[0].item(), abs=1e-15)   # ᾱ_1 = 1 − β_1
    assert sch.alpha_bar[-1] < 1e-4                                       # ᾱ_T ≈ 0 (linear 4.0e-5, cosine 2.4e-9)
    assert sch.alpha_bar_prev[0] == 1 and torch.equal(sch.alpha_bar_prev[1:], sch.alpha_bar[:-1])
    assert torch.allclose(sch.alpha_bar, torch.cumprod(1 - sch.betas, 0))
    assert torch.allclose(sch.snr, sch.alpha_bar / (1 - sch.alpha_bar))
    assert torch.allclose(sch.log_snr, torch.log(sch.snr))


def test_posterior_coefficients(sch):
    b, ab, abp = sch.betas, sch.alpha_bar, sch.alpha_bar_prev
    assert torch.allclose(sch.posterior_variance, b * (1 - abp) / (1 - ab), rtol=1e-12, atol=0)
    assert sch.posterior_variance[0] == 0
    assert (sch.posterior_variance[1:] < b[1:]).all()                    # β̃_t < β_t
    assert sch.posterior_log_variance_clipped[0] == sch.posterior_log_variance_clipped[1]
    assert torch.allclose(sch.posterior_log_variance_clipped[1:], sch.posterior_variance[1:].log())
    assert torch.allclose(sch.posterior_mean_coef1, b * abp.sqrt() / (1 - ab))
    assert torch.allclose(sch.posterior_mean_coef2, (1 - abp) * (1 - b).sqrt() / (1 - ab))


def test_posterior_is_consistent_with_forward(sch):
    "With x_t built from x_0 by eq 2.2 and ε̂ = ε, predict_x0_from_eps recovers x_0, and the posterior mean at t=1 is x_0."
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998])
    xt = sch.q_sample(x0, t, noise=eps)
    assert torch.allclose(sch.predict_x0_from_eps(xt, t, eps), x0, atol=1e-8)
    mean, var, logvar = sch.q_posterior_mean_variance(x0, xt, t)
    assert mean.shape == x0.shape and var.shape == logvar.shape == (7, 1, 1, 1)
    assert torch.allclose(mean[0], x0[0])                                  # q(x_0 | x_1, x_0) is a point mass at x_0


def test_extract_shapes():
    coef = torch.arange(5.0, dtype=torch.float64)
    out = extract(coef, torch.tensor([4, 0, 2]), (3, 1, 8, 8), torch.float32)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32 and out.flatten().tolist() == [4, 0, 2]


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_q_sample_monte_carlo(name):
    "Mean and variance of q_sample over many draws match √ᾱ_t x0 and 1 − ᾱ_t (eq 2.2) within N_SE standard errors."
    sch, n = get_schedule(name), 200_000
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-1.0, -0.3, 0.0, 0.5, 1.0], dtype=torch.float64)  # a fixed 5-pixel "image"
    for i in (0, 99, 499, 749, DEFAULT_T - 1):
        xt = sch.q_sample(x0.expand(n, -1), i, generator=g)
        ab = sch.alpha_bar[i]
        se_mean = math.sqrt((1 - ab) / n)                                  # sd of a sample mean
        se_var = (1 - ab) * math.sqrt(2 / (n - 1))                         # sd of a Gaussian sample variance
        assert ((xt.mean(0) - ab.sqrt() * x0).abs() < N_SE * se_mean).all(), i
        assert ((xt.var(0) - (1 - ab)).abs() < N_SE * se_var).all(), i


def test_q_step_iterates_to_q_sample():
    "Iterating eq 2.1 t times has the moments of eq 2.2 (a short schedule keeps this fast)."
    sch, n, steps = linear_schedule(T=50, beta_end=0.2), 100_000, 30
    g = torch.Generator().manual_seed(2)
    x0 = torch.tensor([-1.0, 0.25, 1.0], dtype=torch.float64)
    x = x0.expand(n, -1).clone()
    for i in range(steps): x = sch.q_step(x, i, generator=g)
    ab = sch.alpha_bar[steps - 1]
    assert ((x.mean(0) - ab.sqrt() * x0).abs() < N_SE * math.sqrt((1 - ab) / n)).all()
    assert ((x.var(0) - (1 - ab)).abs() < N_SE * (1 - ab) * math.sqrt(2 / (n - 1))).all()


def test_q_sample_dtype_and_generator():
    sch = cosine_schedule()
    x0 = torch.zeros(4, 1, 8, 8)
    a = sch.q_sample(x0, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(3))
    b = sch.q_sample(x0, torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert sch.q_sample(x0.half(), 5).dtype == torch.float16


def _diffusers_reference(name: str):
    "diffusers' DDPMScheduler for our schedule `name`, with random inputs and every t (one image per t)."
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=DEFAULT_T, beta_schedule=DIFFUSERS_NAME[name])
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(DEFAULT_T, 3, 8, 8, generator=g), torch.randn(DEFAULT_T, 3, 8, 8, generator=g)
    return ref, x0, noise, torch.arange(DEFAULT_T)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_matches_diffusers(name):
    "betas, ᾱ and x_t agree with diffusers to ORACLE_TOL (x_t with diffusers' add_noise run in float64)."
    ref, x0, noise, t = _diffusers_reference(name)
    sch = get_schedule(name, DEFAULT_T)
    assert (sch.betas - ref.betas.double()).abs().max() < ORACLE_TOL
    assert (sch.alpha_bar - ref.alphas_cumprod.double()).abs().max() < ORACLE_TOL
    # diffusers keeps ᾱ in float32, so its 1 − ᾱ_t cancels catastrophically at small t (see the next test).
    # Give its own add_noise code its own betas with ᾱ accumulated in float64, and compare in float64 ...
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    theirs64 = ref.add_noise(x0.double(), noise.double(), t)
    assert (sch.q_sample(x0.double(), t, noise=noise.double()) - theirs64).abs().max() < ORACLE_TOL
    # ... and our float32 output against that (only float32 rounding of x_t remains)
    ours32 = sch.q_sample(x0, t, noise=noise)
    assert ours32.dtype == torch.float32 and (ours32.double() - theirs64).abs().max() < ORACLE_TOL


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_matches_stock_diffusers_float32(name):
    """Stock diffusers in float32 differs by up to ~7e-6: float32 ᾱ_t ≈ 1 carries an absolute error of ~3e-8, which
    is a relative error of ~3e-4 in 1 − ᾱ_t ≈ 1e-4 at t = 1. Ours (float64 coefficients) is closer to the exact value."""
    ref, x0, noise, t = _diffusers_reference(name)
    sch = get_schedule(name, DEFAULT_T)
    ours, theirs = sch.q_sample(x0, t, noise=noise), ref.add_noise(x0, noise, t)
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max() < 10 * ORACLE_TOL
    assert (ours - theirs)[100:].abs().max() < 2 * ORACLE_TOL             # the gap is at small t
    ab = torch.cumprod(1 - ref.betas.double(), 0)[:, None, None, None]     # exact ᾱ for diffusers' betas
    exact = ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()
    assert (ours.double() - exact).abs().max() < ORACLE_TOL


def test_bad_betas():
    for bad in (torch.tensor([0.1, 0.0]), torch.tensor([0.5, 1.0]), torch.tensor([-0.1]), torch.tensor([0.1, float("nan")])):
        with pytest.raises(ConfigError, match="betas"): NoiseSchedule(bad)
    with pytest.raises(ConfigError, match="betas"): NoiseSchedule(torch.full((2, 3), 0.1))
    with pytest.raises(ConfigError, match="betas"): linear_schedule(beta_end=1.5)
    with pytest.raises(ConfigError, match="T"): linear_schedule(T=0)


def test_unknown_schedule_name():
    with pytest.raises(ConfigError, match="quadratic.*cosine, linear"): get_schedule("quadratic")


def test_bad_timesteps():
    sch, x0 = linear_schedule(), torch.zeros(2, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"\[0, 999\]"): sch.q_sample(x0, torch.tensor([0, 1000]))
    with pytest.raises(ConfigError, match=r"\[0, 999\]"): sch.q_sample(x0, torch.tensor([-1, 3]))
    with pytest.raises(ConfigError, match="integer"): sch.q_sample(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ConfigError, match="batch"): sch.q_sample(x0, torch.tensor([0, 1, 2]))
    assert check_timesteps(7, 1000, 3).tolist() == [7, 7, 7]


def test_to_device():
    sch = linear_schedule()
    assert sch.to("cpu") is sch
    if torch.cuda.is_available():
        g = sch.to("cuda")
        assert g.alpha_bar.is_cuda and g.T == sch.T
        x = g.q_sample(torch.zeros(2, 1, 4, 4, device="cuda"), torch.tensor([1, 2], device="cuda"))
        assert x.is_cuda
