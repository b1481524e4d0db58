"""Tests for `skindiff.sde`: the SDEs against their own definitions and the DDPM schedule, every sampler and the ODE
likelihood against Gaussian data whose score is exact at every t (and a wrong sign or factor must fail), the DSM
minimiser, the ε→score conversion, and bad input."""
import math

import pytest
import torch

from skindiff.core import ConfigError, SkindiffError
from skindiff.schedules import get_schedule
from skindiff.samplers import gaussian_eps_fn
from skindiff.sde import (CORRECTORS, PREDICTORS, VPSDE, SubVPSDE, VESDE, CountedScore, GaussianMixture, Predictor,
                          bits_per_dim, dequantize, divergence, dsm_loss, edm_sigmas, euler_maruyama_sample, get_corrector,
                          get_predictor, heun_sample, likelihood_bpd, ode_log_likelihood, ode_sample, pc_sample,
                          register_predictor, reverse_diffusion_sample, score_fn_from_eps_fn, eps_model_steps)

torch.set_num_threads(2)
N_SE = 5                                   # Monte-Carlo tolerance, in standard errors
N_SAMPLES = 4000                           # samples per sampler run
MU = [1.0, -0.5]                           # 2-D Gaussian test data N(MU, COV), correlated
COV = [[0.5, 0.3], [0.3, 0.4]]
GAUSS = GaussianMixture([MU], [COV])
MIXTURE = GaussianMixture([[-1.5, 0.0], [1.0, 1.0], [0.5, -1.5]], [[[0.1, 0.0], [0.0, 0.1]], [[0.2, 0.05], [0.05, 0.1]],
                                                                    [[0.05, 0.0], [0.0, 0.3]]], [0.5, 0.3, 0.2])
SDE_FACTORIES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
F64 = dict(dtype=torch.float64)


def _gen(seed=0): return torch.Generator().manual_seed(seed)


# Each sampler at a step count where its discretisation bias is far below the Monte-Carlo tolerance, and that bias
# (max abs error of a covariance entry, measured with exact moments: EM/RD/PC ≤ 0.01, Heun-40 0.016) as an allowance.
SAMPLERS = {
    "euler_maruyama": (lambda sf, sde, **kw: euler_maruyama_sample(sf, sde, (N_SAMPLES, 2), n_steps=500, progress=False, **kw), 0.02),
    "reverse_diffusion": (lambda sf, sde, **kw: reverse_diffusion_sample(sf, sde, (N_SAMPLES, 2), n_steps=500, progress=False, **kw), 0.02),
    "pc": (lambda sf, sde, **kw: pc_sample(sf, sde, (N_SAMPLES, 2), n_steps=250, progress=False, **kw), 0.02),
    "ode_rk45": (lambda sf, sde, **kw: ode_sample(sf, sde, (N_SAMPLES, 2), **kw), 0.005),
    "heun": (lambda sf, sde, **kw: heun_sample(sf, sde, (N_SAMPLES, 2), n_steps=40, progress=False, **kw), 0.03),
    "heun_churn": (lambda sf, sde, **kw: heun_sample(sf, sde, (N_SAMPLES, 2), n_steps=40, churn=10.0, progress=False, **kw), 0.03),
}


def _moment_errors(x: torch.Tensor, gm: GaussianMixture, allowance: float) -> tuple[float, float]:
    """Largest |error| of the sample mean and covariance, each in units of its tolerance (≤ 1 passes): N_SE standard
    errors (se_mean_i = √(Σ_ii/n), se_cov_ij = √((Σ_ii Σ_jj + Σ_ij²)/n)) plus the sampler's bias allowance for the covariance."""
    x = x.double()
    n, S = len(x), gm.cov
    d = torch.diagonal(S)
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None, :] + S ** 2) / n).sqrt()
    mean_err = ((x.mean(0) - gm.mean).abs() / (N_SE * se_mean)).max().item()
    cov_err = ((torch.cov(x.T) - S).abs() / (N_SE * se_cov + allowance)).max().item()
    return mean_err, cov_err


@pytest.mark.parametrize("sde_name", list(SDE_FACTORIES))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_recovers_gaussian(sampler, sde_name):
    sde = SDE_FACTORIES[sde_name]()
    run, allowance = SAMPLERS[sampler]
    res = run(GAUSS.score_fn(sde), sde, generator=_gen(1), **F64)
    mean_err, cov_err = _moment_errors(res.samples, GAUSS, allowance)
    print(f"{sampler} on {sde_name}: NFE {res.nfe}, mean error {mean_err:.2f}, covariance error {cov_err:.2f} (of tolerance)")
    assert mean_err < 1 and cov_err < 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("wrong", ["sign", "factor"])
def test_wrong_score_fails(sampler, wrong):
    "The moment check can fail: a flipped score (or half the score, a factor bug in eq 2.11/2.13) misses by far."
    sde = VPSDE()
    exact = GAUSS.score_fn(sde)
    bad = (lambda x, t: -exact(x, t)) if wrong == "sign" else (lambda x, t: 0.5 * exact(x, t))
    run, allowance = SAMPLERS[sampler]
    try: res = run(bad, sde, generator=_gen(1), **F64)
    except SkindiffError: return                          # diverged to NaN/inf: also a failure
    mean_err, cov_err = _moment_errors(res.samples, GAUSS, allowance)
    assert max(mean_err, cov_err) > 3, (mean_err, cov_err)


def test_mixture_em_and_ode_recover_weights_and_moments():
    "On the 2-D mixture the samples' nearest-component fractions match the weights and the moments match."
    sde = VPSDE()
    for res in (euler_maruyama_sample(MIXTURE.score_fn(sde), sde, (N_SAMPLES, 2), n_steps=500, generator=_gen(2), progress=False, **F64),
                ode_sample(MIXTURE.score_fn(sde), sde, (N_SAMPLES, 2), generator=_gen(2), **F64)):
        x = res.samples
        assert max(_moment_errors(x, MIXTURE, 0.02)) < 1
        frac = torch.bincount(MIXTURE._log_resp(x, None, 0.0)[0].argmax(1), minlength=3).double() / len(x)
        se = (MIXTURE.weights * (1 - MIXTURE.weights) / len(x)).sqrt()
        assert ((frac - MIXTURE.weights).abs() < N_SE * se).all(), frac


def _exact_flow(sde, x_T: torch.Tensor, sigma_end: float) -> torch.Tensor:
    """The exact probability-flow map for Gaussian data N(μ, Σ): in x̂ = x/s, σ̂ = σ/s the ODE is dx̂/dσ̂ = σ̂ (Σ + σ̂² I)⁻¹ (x̂ − μ),
    so x̂(σ̂) − μ = (Σ + σ̂² I)^½ (Σ + σ̂_T² I)^−½ (x̂_T − μ). Returns x at σ̂ = sigma_end (as x̂: s = 1 there when sigma_end = 0)."""
    w, V = torch.linalg.eigh(GAUSS.cov)
    s_T, sig_T = float(sde.marginal_coefs(torch.tensor(sde.T, **F64))[0]), float(sde.edm_sigma(sde.T))
    M = V @ torch.diag(((w + sigma_end ** 2) / (w + sig_T ** 2)).sqrt()) @ V.T
    return GAUSS.mean + (x_T.double() / s_T - GAUSS.mean) @ M.T


@pytest.mark.parametrize("sde_name", list(SDE_FACTORIES))
def test_deterministic_solvers_match_exact_flow(sde_name):
    "No Monte Carlo: from the same x_T, RK45 and Heun land where the exact ODE map does; Heun's error falls like h²."
    sde = SDE_FACTORIES[sde_name]()
    sf = GAUSS.score_fn(sde)
    x_T = sde.prior_sampling((500, 2), _gen(3), **F64)
    eps = sde.sampling_eps
    s_eps, sig_eps = float(sde.marginal_coefs(torch.tensor(eps, **F64))[0]), float(sde.edm_sigma(eps))
    ode = ode_sample(sf, sde, x_T.shape, x_T=x_T, **F64)
    assert (ode.samples - s_eps * _exact_flow(sde, x_T, sig_eps)).abs().max() < 1e-3
    exact0 = _exact_flow(sde, x_T, 0.0)
    errs = [(heun_sample(sf, sde, x_T.shape, n_steps=n, x_T=x_T, progress=False, **F64).samples - exact0).abs().max().item() for n in (20, 40, 80)]
    print(f"{sde_name}: Heun max error at 20/40/80 steps {errs}")
    assert errs[2] < 0.01 and errs[0] / errs[1] > 3 and errs[1] / errs[2] > 3      # second order: ×4 per halving


def test_nfe_is_counted_from_calls():
    sde = VPSDE()
    calls = CountedScore(GAUSS.score_fn(sde))
    kw = dict(generator=_gen(), progress=False, **F64)
    assert euler_maruyama_sample(calls, sde, (8, 2), n_steps=7, **kw).nfe == 7 == calls.calls
    assert pc_sample(GAUSS.score_fn(sde), sde, (8, 2), n_steps=7, n_corrector_steps=2, **kw).nfe == 21
    assert reverse_diffusion_sample(GAUSS.score_fn(sde), sde, (8, 2), n_steps=7, denoise=True, **kw).nfe == 8
    assert heun_sample(GAUSS.score_fn(sde), sde, (8, 2), n_steps=7, **kw).nfe == 13
    assert heun_sample(GAUSS.score_fn(sde), sde, (8, 2), n_steps=7, churn=5.0, **kw).nfe == 13      # churn costs no NFE
    calls = CountedScore(GAUSS.score_fn(sde))
    res = ode_sample(calls, sde, (8, 2), generator=_gen(), **F64)
    assert res.nfe == calls.calls > 10 and res.timesteps[0] == 1.0 and res.timesteps[-1] == pytest.approx(sde.sampling_eps)


def test_predictor_corrector_registry():
    assert {"euler_maruyama", "reverse_diffusion", "none"} <= set(PREDICTORS) and {"langevin", "none"} <= set(CORRECTORS)
    assert get_predictor("none").__name__ == "NonePredictor" and get_corrector("langevin").__name__ == "LangevinCorrector"

    @register_predictor("test_identity")
    class Identity(Predictor):
        def update(self, x, t, dt, generator=None): return x, x
    try:
        sde = VPSDE()
        x_T = torch.randn(4, 2, **F64)
        res = pc_sample(GAUSS.score_fn(sde), sde, (4, 2), "test_identity", "none", n_steps=3, x_T=x_T, progress=False, **F64)
        assert torch.equal(res.samples, x_T)
    finally: PREDICTORS.pop("test_identity")
    for bad in (lambda: get_predictor("heun"), lambda: get_corrector("ald")):
        with pytest.raises(ConfigError, match="known"): bad()


# --- the SDEs themselves ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", list(SDE_FACTORIES))
def test_kernel_solves_the_sde(sde_name):
    """For linear drift f = a(t) x the kernel obeys ds/dt = a s and dσ²/dt = 2 a σ² + g² (VE: score_sde_pytorch's σ(t)
    is the std of data smoothed by σ_min, which obeys the same equation). Central differences, float64."""
    sde = SDE_FACTORIES[sde_name]()
    t = torch.linspace(0.05, 0.95, 19, **F64)
    h = 1e-6
    (s, std), (sp, stdp), (sm, stdm) = sde.marginal_coefs(t), sde.marginal_coefs(t + h), sde.marginal_coefs(t - h)
    a = sde.sde(torch.ones(len(t), 1, **F64), t)[0][:, 0]          # f(1, t) = a(t)
    g = sde.sde(torch.ones(len(t), 1, **F64), t)[1]
    assert torch.allclose((sp - sm) / (2 * h), a * s, rtol=1e-6, atol=1e-8)
    assert torch.allclose((stdp ** 2 - stdm ** 2) / (2 * h), 2 * a * std ** 2 + g ** 2, rtol=1e-5)


@pytest.mark.parametrize("sde_name", list(SDE_FACTORIES))
def test_edm_sigma_inverse_and_discretize(sde_name):
    sde = SDE_FACTORIES[sde_name]()
    t = torch.linspace(1e-4, 1, 50, **F64)
    assert torch.allclose(sde.t_from_edm_sigma(sde.edm_sigma(t)), t, rtol=1e-9)
    t, dt = torch.linspace(0.01, 1, 50, **F64), 1e-3
    x = torch.randn(50, 3, **F64)
    f, G = sde.discretize(x, t, dt)                       # the exact step over [t − dt, t] ≈ Euler–Maruyama at its midpoint
    drift, g = sde.sde(x, t if sde_name == "subvp" else t - dt / 2)   # sub-VP's step is Euler–Maruyama itself
    assert torch.allclose(f, drift * dt, rtol=1e-2, atol=1e-9) and torch.allclose(G, g * math.sqrt(dt), rtol=1e-2)


def test_vp_from_schedule_maps_ddpm_exactly():
    sch = get_schedule("linear", 1000)
    sde = VPSDE.from_schedule(sch)
    assert (sde.beta_0, sde.beta_1, sde.N) == (0.1, 20.0, 1000)
    assert (sde.discrete_betas - sch.betas).abs().max() < 1e-8 and (sde.alpha_bar - sch.alpha_bar).abs().max() < 1e-8
    with pytest.raises(ConfigError, match="linear"): VPSDE.from_schedule(get_schedule("cosine", 1000))


@pytest.mark.parametrize("N, tol", [(1000, 2e-3), (10000, 2e-4)])
def test_vp_marginals_match_ddpm_in_the_discrete_limit(N, tol):
    """The SDE's kernel at t = (i+1)/N against the N-step DDPM chain's √ᾱ_i, √(1−ᾱ_i): the gap is O(1/N) (1.3e-3 at
    N = 1000). The exact VP step over [t − 1/N, t] is DDPM's β_i up to O(1/N) too; the worst is the first step, where
    ∫_0^{1/N} β = β_i (1 + (β_max − β_min)/(2 N β_min)), 10 % at N = 1000."""
    sde = VPSDE(0.1, 20.0, N)
    t = torch.arange(1, N + 1, **F64) / N
    s, std = sde.marginal_coefs(t)
    ab = sde.alpha_bar
    assert (s - ab.sqrt()).abs().max() < tol and (std - (1 - ab).sqrt()).abs().max() < tol
    G = sde.discretize(torch.zeros(N, 1, **F64), t, 1 / N)[1]
    rel = (G ** 2 / sde.discrete_betas - 1).abs()
    assert rel.max() < 1.05 * (sde.beta_1 - sde.beta_0) / (2 * N * sde.beta_0)


def test_score_from_eps_fn():
    "Chapter 07's exact ε* of N(μ, s²I), read at step t (N−1), is the exact score up to the O(1/N) kernel gap."
    sch = get_schedule("linear", 1000)
    sde = VPSDE.from_schedule(sch)
    mu, s = 0.5, 0.3
    oracle = GaussianMixture([[mu, mu]], [[[s * s, 0.0], [0.0, s * s]]])
    score = score_fn_from_eps_fn(gaussian_eps_fn(mu, s, sch), sde, integer_steps=True)
    x = torch.randn(200, 2, **F64)
    for t in (0.1, 0.5, 1.0):
        tt = torch.full((200,), round(t * 999) / 999, **F64)          # exactly on a step
        ours, exact = score(x, tt), oracle.score(x, sde, tt)
        assert ((ours - exact).norm() / exact.norm()).item() < 0.02, t
    seen = {}
    def eps_fn(x, t): seen["t"] = t; return torch.zeros_like(x)
    score_fn_from_eps_fn(eps_fn, sde)(x, torch.full((200,), 0.5, **F64))
    assert seen["t"].is_floating_point() and torch.allclose(seen["t"], torch.full((200,), 499.5, **F64))
    with pytest.raises(ConfigError, match="VP"): score_fn_from_eps_fn(eps_fn, VESDE())


# --- likelihood -----------------------------------------------------------------------------------------------------

def _prior_corrected(res, gm, sde) -> torch.Tensor:
    """The ODE log-likelihood with the prior N(0, σ_T² I) replaced by the true p_T at the latent z: with the exact score the
    ODE is exact, so this must equal the analytic log p_ε(x) (the ODE starts at t = ε)."""
    return res.logp - sde.prior_logp(res.z) + gm.log_prob(res.z, sde, sde.T)


@pytest.mark.parametrize("sde_name", list(SDE_FACTORIES))
def test_ode_likelihood_of_gaussian_is_exact(sde_name):
    """With the exact trace the ODE log-likelihood equals the analytic log p_ε to 1e-4 nats once the prior mismatch
    (p_T is not exactly N(0, σ_T² I)) is taken out; with it, log p_0 to 2e-2 (VE: 0.1, its prior is 50 wide)."""
    sde = SDE_FACTORIES[sde_name]()
    x = GAUSS.sample(64, _gen(4))
    res = ode_log_likelihood(GAUSS.score_fn(sde), sde, x, hutchinson="exact", rtol=1e-8, atol=1e-8)
    err = (_prior_corrected(res, GAUSS, sde)[0] - GAUSS.log_prob(x, sde, 1e-5)).abs().max().item()
    raw = (res.logp[0] - GAUSS.log_prob(x)).abs().max().item()
    print(f"{sde_name}: max |ODE − analytic| log-density {err:.2e} nats (prior-corrected), {raw:.2e} (raw), NFE {res.nfe}")
    assert err < 1e-4 and raw < (0.1 if sde_name == "ve" else 2e-2)


def test_ode_likelihood_of_mixture_and_hutchinson():
    """Prior-corrected as above: the mixture with the exact trace within 1e-3 nats. Rademacher probes are exact for an
    isotropic Gaussian (a diagonal Jacobian); for the mixture each draw is noisy, and the mean of 8 draws agrees within
    N_SE standard errors."""
    sde = VPSDE()
    x = MIXTURE.sample(32, _gen(5))
    exact = ode_log_likelihood(MIXTURE.score_fn(sde), sde, x, hutchinson="exact", rtol=1e-7, atol=1e-7)
    assert (_prior_corrected(exact, MIXTURE, sde)[0] - MIXTURE.log_prob(x, sde, 1e-5)).abs().max() < 1e-3
    iso = GaussianMixture([[0.3, -0.2]], [[[0.2, 0.0], [0.0, 0.2]]])
    r = ode_log_likelihood(iso.score_fn(sde), sde, x, n_hutchinson=2, generator=_gen(6), rtol=1e-7, atol=1e-7)
    assert (_prior_corrected(r, iso, sde) - iso.log_prob(x, sde, 1e-5)).abs().max() < 1e-4
    for kind in ("rademacher", "gaussian"):
        h = ode_log_likelihood(MIXTURE.score_fn(sde), sde, x, n_hutchinson=8, hutchinson=kind, generator=_gen(7), rtol=1e-5, atol=1e-5)
        corrected = _prior_corrected(h, MIXTURE, sde)
        mean, se = corrected.mean(0), corrected.std(0) / math.sqrt(8)
        assert h.logp.shape == (8, 32) and len(h.nfe) == 8 and (h.logp.std(0) > 0).any()
        assert ((mean - MIXTURE.log_prob(x, sde, 1e-5)).abs() < N_SE * se + 1e-3).all(), kind


def test_bits_per_dim_and_dequantization():
    "A uniform density on [−1, 1]^D is 8 bits/dim of 8-bit data; dequantised pixels stay in their 1/128-wide cells."
    D = 784
    assert bits_per_dim(torch.tensor([-D * math.log(2)]), D).item() == pytest.approx(8.0)
    img = torch.tensor([[0, 1, 128, 255]], dtype=torch.uint8)
    y = dequantize(img.expand(1000, 4), _gen())
    lo = img.float() / 128 - 1
    assert ((y >= lo) & (y < lo + 1 / 128)).all() and y.min() >= -1 and y.max() < 1
    with pytest.raises(ConfigError, match="uint8"): dequantize(torch.rand(2, 4))
    with pytest.raises(ConfigError, match=r"pixel values in \[0, 255\].*got values in \[-3, 1000\]"):
        dequantize(torch.tensor([[1000, -3]]))


def test_likelihood_bpd_on_gaussian_pixels():
    "bits/dim = −log p_y/(D ln 2) + 7 for the dequantised pixels y, with the per-draw rows and NFE reported."
    sde = VPSDE()
    img = torch.randint(64, 192, (16, 2), generator=_gen(8), dtype=torch.uint8)
    pix = GaussianMixture([[0.0, 0.0]], [[[0.25, 0.0], [0.0, 0.25]]])
    res = likelihood_bpd(pix.score_fn(sde), sde, img, generator=_gen(9), n_hutchinson=2, rtol=1e-6, atol=1e-6)
    y = dequantize(img, _gen(9))                                       # the same draw of u
    expected = -pix.log_prob(y) / (2 * math.log(2)) + 7
    assert res.bpd.shape == (2, 16) and torch.allclose(res.bpd_per_image, expected.float().double(), atol=1e-3)


# --- training objective -----------------------------------------------------------------------------------------------

def test_dsm_minimiser_is_the_analytic_score():
    """At a fixed t the score of p_t for Gaussian data is linear, s(x) = −C⁻¹(x − s(t)μ) with C = s(t)²Σ + σ(t)²I. A linear
    model fitted to the DSM target −z/σ (least squares) and one trained on `dsm_loss` (Adam) both recover it."""
    sde, t = VPSDE(), 0.3
    s, std = (float(v) for v in sde.marginal_coefs(torch.tensor(t, **F64)))
    C = s ** 2 * GAUSS.cov + std ** 2 * torch.eye(2, **F64)
    A_true = -torch.linalg.inv(C)
    b_true = -A_true @ (s * GAUSS.mean)
    g = _gen(10)
    x0 = GAUSS.sample(50000, g)
    z = torch.randn(x0.shape, generator=g, **F64)
    xt = s * x0 + std * z
    X = torch.cat([xt, torch.ones(len(xt), 1, **F64)], 1)
    W = torch.linalg.lstsq(X, -z / std).solution                       # (3, 2): [Aᵀ; bᵀ]
    assert torch.allclose(W[:2].T, A_true, rtol=0.03, atol=0.03) and torch.allclose(W[2], b_true, atol=0.05)
    model = torch.nn.Linear(2, 2).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        loss = dsm_loss(lambda x, tt: model(x), x0[torch.randint(0, len(x0), (1024,), generator=g)], sde, g, t=t)
        opt.zero_grad(); loss.backward(); opt.step()
    assert torch.allclose(model.weight.detach(), A_true, rtol=0.05, atol=0.05) and torch.allclose(model.bias.detach(), b_true, atol=0.08)


def test_dsm_loss_of_exact_score_is_smallest():
    sde = VESDE()
    x0 = GAUSS.sample(4000, _gen(11))
    exact = dsm_loss(GAUSS.score_fn(sde), x0, sde, _gen(12))
    for wrong in (lambda x, t: -GAUSS.score(x, sde, t), lambda x, t: 0.5 * GAUSS.score(x, sde, t)):
        assert dsm_loss(wrong, x0, sde, _gen(12)) > exact
    assert dsm_loss(GAUSS.score_fn(sde), x0, sde, _gen(12), likelihood_weighting=True) > 0


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: VESDE(sigma_min=50, sigma_max=0.01), lambda: VESDE(sigma_min=1.0, sigma_max=1.0),
                                  lambda: VESDE(sigma_min=0.0), lambda: VPSDE(beta_min=20, beta_max=0.1), lambda: VPSDE(beta_min=0.0)])
def test_bad_sde_parameters(make):
    with pytest.raises(ConfigError, match="expected"): make()


@pytest.mark.parametrize("cls", [VPSDE, SubVPSDE, VESDE])
@pytest.mark.parametrize("N", [0, -5, 2.5, True])
def test_bad_N(cls, N):
    with pytest.raises(ConfigError, match="N: expected a positive integer"): cls(N=N)


@pytest.mark.parametrize("sampler", ["pc", "ode", "heun", "likelihood", "dsm"])
def test_wrong_score_shape_names_both_shapes(sampler):
    sde = VPSDE()
    bad = lambda x, t: x[:, :1]
    x = torch.randn(4, 3)
    run = {"pc": lambda: pc_sample(bad, sde, (4, 3), n_steps=2, progress=False),
           "ode": lambda: ode_sample(bad, sde, (4, 3)),
           "heun": lambda: heun_sample(bad, sde, (4, 3), n_steps=2, progress=False),
           "likelihood": lambda: ode_log_likelihood(bad, sde, x),
           "dsm": lambda: dsm_loss(bad, x, sde)}[sampler]
    with pytest.raises(ConfigError, match=r"expected shape \(4, 3\).*got \(4, 1\)"): run()


@pytest.mark.parametrize("sampler", ["pc", "ode", "heun", "likelihood"])
def test_nan_names_the_time(sampler):
    sde = VPSDE()
    def nan_late(x, t):                                                # fine until t < 0.5, then NaN
        return torch.where(t[:, None] < 0.5, torch.full_like(x, float("nan")), -x)
    x = torch.randn(4, 2)
    run = {"pc": lambda: pc_sample(nan_late, sde, (4, 2), n_steps=10, progress=False),
           "ode": lambda: ode_sample(nan_late, sde, (4, 2)),
           "heun": lambda: heun_sample(nan_late, sde, (4, 2), n_steps=5, progress=False),
           "likelihood": lambda: ode_log_likelihood(lambda x, t: torch.where(t[:, None] > 0.5, torch.full_like(x, float("nan")), -x), sde, x)}[sampler]
    with pytest.raises(SkindiffError, match=r"NaN or infinite values appeared at t = (1 |0\.[0-9])"): run()


def test_other_bad_input():
    sde, sf = VPSDE(), GAUSS.score_fn(VPSDE())
    for bad, match in ((lambda: pc_sample(sf, sde, (4, 2), snr=0.0), "snr"),
                       (lambda: pc_sample(sf, sde, (4, 2), eps=1.5), "eps"),
                       (lambda: pc_sample(sf, sde, (4, 2), n_steps=0), "N: expected"),
                       (lambda: pc_sample(sf, sde, (4, 2), x_T=torch.zeros(3, 2)), "x_T"),
                       (lambda: ode_sample(sf, sde, (4, 2), rtol=0.0), "rtol"),
                       (lambda: ode_sample(sf, sde, (4, 2), method="euler"), "method"),
                       (lambda: heun_sample(sf, sde, (4, 2), rho=-1.0), "rho"),
                       (lambda: heun_sample(sf, sde, (4, 2), churn=-1.0), "churn"),
                       (lambda: ode_log_likelihood(sf, sde, torch.zeros(2, 2), hutchinson="bernoulli"), "hutchinson"),
                       (lambda: ode_log_likelihood(sf, sde, torch.zeros(2, 2), n_hutchinson=0), "n_hutchinson"),
                       (lambda: ode_log_likelihood(sf, sde, torch.zeros(2, 100), hutchinson="exact"), "exact"),
                       (lambda: edm_sigmas(sde, 0), "N: expected"),
                       (lambda: GaussianMixture([[0.0, 0.0]], [[[1.0, 0.0], [0.0, 1.0]]], [0.5]), "weights")):
        with pytest.raises(ConfigError, match=match): bad()
    with pytest.raises(ConfigError, match="N="): VPSDE(N=10).discrete_betas


def test_divergence_exact_and_hutchinson():
    A = torch.tensor([[1.0, 2.0], [-0.5, 3.0]], **F64)
    fn = lambda x, t: x @ A.T
    x = torch.randn(5, 2, **F64)
    assert torch.allclose(divergence(fn, x, None, None)[1], torch.full((5,), 4.0, **F64))
    v = torch.tensor([[1.0, -1.0]] * 5, **F64)
    assert torch.allclose(divergence(fn, x, None, v)[1], torch.full((5,), 4.0 - 1.5, **F64))   # vᵀAv = 1 − 2 + 0.5 + 3


def test_eps_model_steps_alpha_bar_inverts_the_chain():
    "index_map='alpha_bar' puts step i at the time where s(t)² = ᾱ_i; score_sde's t (N−1) lies one to three steps later."
    sde = VPSDE.from_schedule(get_schedule("linear", 1000))
    i = torch.tensor([0, 1, 5, 100, 500, 999])
    t = sde.t_from_beta_integral(-torch.log(sde.alpha_bar[i]))
    assert torch.allclose(eps_model_steps(sde, t, "alpha_bar"), i.double(), atol=1e-9)
    late = eps_model_steps(sde, t) - i
    assert late.min() > 0.5 and late.max() < 4, late
    tt = torch.linspace(0, 1, 1001, **F64)
    s = eps_model_steps(sde, tt, "alpha_bar")
    assert s[0] == -1 and (s.diff() > 0).all() and s[-1] <= 999          # t = 0 is the data, "step −1"
    assert eps_model_steps(sde, tt.float(), "alpha_bar").dtype == torch.float32
    with pytest.raises(ConfigError, match="index_map='nearest'"):
        score_fn_from_eps_fn(lambda x, t: x, sde, index_map="nearest")


def test_score_from_eps_fn_alpha_bar_is_exact_on_steps():
    "With index_map='alpha_bar', chapter 07's exact ε* read at the time of step i is the exact score; score_sde's map is not."
    sch = get_schedule("linear", 1000)
    sde = VPSDE.from_schedule(sch)
    mu, s = 0.5, 0.3
    oracle = GaussianMixture([[mu, mu]], [[[s * s, 0.0], [0.0, s * s]]])
    exact_map = score_fn_from_eps_fn(gaussian_eps_fn(mu, s, sch), sde, integer_steps=True, index_map="alpha_bar")
    sde_map = score_fn_from_eps_fn(gaussian_eps_fn(mu, s, sch), sde, integer_steps=True)
    x = torch.randn(200, 2, **F64)
    for i in (0, 3, 100, 700):
        tt = sde.t_from_beta_integral(-torch.log(sde.alpha_bar[i])).expand(200)
        exact = oracle.score(x, sde, tt)
        assert ((exact_map(x, tt) - exact).norm() / exact.norm()).item() < 1e-6, i   # the schedule holds float32 ᾱ
        if i == 0: assert ((sde_map(x, tt) - exact).norm() / exact.norm()).item() > 0.3   # σ_1/σ_0 ≈ 1.42
