"""Tests for `skindiff.samplers`: every update rule against diffusers' DDPMScheduler / DDIMScheduler, full loops
on Gaussian data whose exact ε is known, and bad input."""
import math, warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from skindiff.core import ConfigError
from skindiff.schedules import DEFAULT_T, get_schedule
import skindiff.samplers as samplers_mod
from skindiff.samplers import (SAMPLERS, SampleResult, ddim_sample, ddim_step, ddpm_sample, ddpm_step, eps_fn_from_model,
                               SPACINGS, gaussian_chain_std, gaussian_eps_fn, make_timesteps, resolve_precision, sample, score_fn_from_eps)

torch.set_num_threads(2)
ORACLE_TOL = 1e-5                 # max abs difference allowed against diffusers (float32)
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
VARIANCE_TYPE = {"beta_tilde": "fixed_small", "beta": "fixed_large"}
SHAPE = (4, 3, 8, 8)
N_SE = 5                          # Monte-Carlo tolerance, in standard errors
MU, S = 0.5, 0.3                  # Gaussian test data N(MU, S² I)
N, DIM = 2000, 4


def _ddpm_scheduler(name, variance, clip):
    # diffusers settings matched: our 0-based step index == diffusers' timestep, steps_offset=0, 'leading' spacing
    return DDPMScheduler(num_train_timesteps=DEFAULT_T, beta_schedule=DIFFUSERS_SCHEDULE[name], variance_type=VARIANCE_TYPE[variance],
                         clip_sample=clip, clip_sample_range=1.0, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)


def _ddim_scheduler(name, clip):
    return DDIMScheduler(num_train_timesteps=DEFAULT_T, beta_schedule=DIFFUSERS_SCHEDULE[name], clip_sample=clip, clip_sample_range=1.0,
                         set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", prediction_type="epsilon")


def _float64(ref, sch):
    """Give diffusers our float64 ᾱ so that the *update rules* are compared, not float32 rounding: diffusers keeps ᾱ
    in float32 (relative error up to 1e-5 at the cosine tail, where ᾱ_T = 2.4e-9), which 1/√ᾱ_t amplifies in x̂_0.
    That the schedules agree is tested in test_schedules.py; float32 whole loops are compared below."""
    ref.betas, ref.alphas, ref.alphas_cumprod = sch.betas.clone(), sch.alphas.clone(), sch.alpha_bar.clone()
    ref.one = ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return eps, 1.5 * torch.randn(SHAPE, generator=g, dtype=torch.float64)   # eps, x_t (x_t wide enough to clip)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_step_matches_diffusers(name, variance, clip):
    sch = get_schedule(name)
    ref = _float64(_ddpm_scheduler(name, variance, clip), sch)
    worst = 0.0
    for i, t in enumerate([999, 998, 700, 500, 100, 10, 1, 0]):
        eps, x = _inputs(i)
        out = ref.step(eps, t, x, generator=torch.Generator().manual_seed(100 + i))
        noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        ours, x0 = ddpm_step(eps, torch.full((SHAPE[0],), t), x, sch, variance, noise, clip_x0=clip)
        worst = max(worst, (ours - out.prev_sample).abs().max().item(), (x0 - out.pred_original_sample).abs().max().item())
    print(f"max abs diff vs diffusers: {worst:.3g}")
    assert worst < ORACLE_TOL, worst


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_respaced_ddpm_step_matches_diffusers(name, variance):
    "With set_timesteps(S) diffusers' DDPMScheduler is the respaced chain: β' = 1 − ᾱ_t/ᾱ_prev."
    sch = get_schedule(name)
    ref = _float64(_ddpm_scheduler(name, variance, True), sch)
    ref.set_timesteps(20)
    ts = ref.timesteps.tolist()
    assert ts == make_timesteps(DEFAULT_T, 20, "leading").tolist()
    worst = 0.0
    for i, t in enumerate(ts):
        eps, x = _inputs(i)
        out = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i))
        noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours, _ = ddpm_step(eps, t, x, sch, variance, noise, t_prev=t_prev)
        worst = max(worst, (ours - out.prev_sample).abs().max().item())
    print(f"max abs diff vs diffusers: {worst:.3g}")
    assert worst < ORACLE_TOL, worst


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_step_matches_diffusers(name, eta, clip):
    sch = get_schedule(name)
    ref = _float64(_ddim_scheduler(name, clip), sch)
    ref.set_timesteps(25)
    ts = ref.timesteps.tolist()
    assert ts == make_timesteps(DEFAULT_T, 25).tolist()
    worst = 0.0
    for i, t in enumerate(ts):
        eps, x = _inputs(i)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
        out = ref.step(eps, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=clip)
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        ours, x0 = ddim_step(eps, t, t_prev, x, sch, eta, noise, clip_x0=clip)
        worst = max(worst, (ours - out.prev_sample).abs().max().item(), (x0 - out.pred_original_sample).abs().max().item())
    print(f"max abs diff vs diffusers: {worst:.3g}")
    assert worst < ORACLE_TOL, worst


def _diffusers_loop(ref, eps_fn, x, steps_kw, **step_kw):
    for t in ref.timesteps:
        x = ref.step(eps_fn(x, torch.full((len(x),), int(t))), t, x, **step_kw).prev_sample
    return x


def test_full_loops_match_diffusers():
    "Whole trajectories: DDPM (same generator ⇒ same noise draws) and DDIM η=0 from the same x_T."
    sch = get_schedule("linear")
    eps_fn = gaussian_eps_fn(0.2, 0.5, sch)
    shape = (16, 1, 4, 4)
    ref = _ddpm_scheduler("linear", "beta_tilde", True); ref.set_timesteps(100)
    g = torch.Generator().manual_seed(0)
    x_T = randn_tensor(shape, generator=g, dtype=torch.float32)
    theirs = _diffusers_loop(ref, eps_fn, x_T, None, generator=g)
    ours = ddpm_sample(eps_fn, sch, shape, torch.Generator().manual_seed(0), num_steps=100, progress=False)
    assert (ours.samples - theirs).abs().max().item() < 1e-4
    ref = _ddim_scheduler("linear", True); ref.set_timesteps(50)
    theirs = _diffusers_loop(ref, eps_fn, x_T, None, eta=0.0)
    ours = ddim_sample(eps_fn, sch, shape, 50, x_T=x_T, progress=False)
    assert (ours.samples - theirs).abs().max().item() < 1e-4


def _check_gaussian(res: SampleResult, exact_std: float):
    x = res.samples.double()
    se_mean, se_std = S / math.sqrt(x.numel()), S / math.sqrt(2 * x.numel())
    assert abs(x.mean().item() - MU) < N_SE * se_mean
    assert abs(x.std().item() - exact_std) < N_SE * se_std
    return x


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_1000_steps_recovers_gaussian(variance):
    sch = get_schedule("linear")
    res = ddpm_sample(gaussian_eps_fn(MU, S, sch), sch, (N, DIM), torch.Generator().manual_seed(1), variance=variance,
                      clip_x0=False, progress=False)
    assert res.nfe == DEFAULT_T and res.samples.shape == (N, DIM) and res.timesteps == list(range(DEFAULT_T - 1, -1, -1))
    exact = gaussian_chain_std(sch, res.timesteps, S, "ddpm", variance)
    assert abs(exact - S) < 0.015 * S                    # the 1000-step chain is within 1.5 % of the data std
    _check_gaussian(res, exact)
    _check_gaussian(res, S)                              # … which is within Monte-Carlo error of s itself


def test_ddim_50_steps_gaussian():
    "50 DDIM steps recover the mean; their std matches the exact discretised chain (8 % narrow for s = 0.3, by design)."
    sch = get_schedule("linear")
    res = ddim_sample(gaussian_eps_fn(MU, S, sch), sch, (N, DIM), 50, generator=torch.Generator().manual_seed(2),
                      clip_x0=False, progress=False)
    assert res.nfe == 50 and res.timesteps[0] == 980 and res.timesteps[-1] == 0
    exact = gaussian_chain_std(sch, res.timesteps, S, "ddim")
    assert 0.9 * S < exact < S
    _check_gaussian(res, exact)
    long = ddim_sample(gaussian_eps_fn(MU, S, sch), sch, (N, DIM), DEFAULT_T, generator=torch.Generator().manual_seed(2),
                       clip_x0=False, progress=False)
    _check_gaussian(long, S)                             # and converge to s as the steps shrink


def test_ddim_deterministic_and_eta1_is_ddpm():
    sch = get_schedule("cosine")
    eps_fn = gaussian_eps_fn(0.0, 0.5, sch)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(eps_fn, sch, (8, 2), 10, x_T=x_T, progress=False, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(eps_fn, sch, (8, 2), 10, x_T=x_T, progress=False, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.samples, b.samples)
    c = ddim_sample(eps_fn, sch, (8, 2), 10, eta=1.0, progress=False, generator=torch.Generator().manual_seed(3))
    d = ddpm_sample(eps_fn, sch, (8, 2), torch.Generator().manual_seed(3), num_steps=10, progress=False)
    assert torch.allclose(c.samples, d.samples, atol=1e-5)


def test_intermediates_and_custom_timesteps():
    sch = get_schedule("linear")
    res = ddim_sample(gaussian_eps_fn(0.0, 0.5, sch), sch, (3, 1, 2, 2), timesteps=[900, 500, 100, 5],
                      return_intermediates=True, progress=False)
    assert res.nfe == 4 and res.timesteps == [900, 500, 100, 5]
    assert [d["t"] for d in res.intermediates] == [900, 500, 100, 5]
    assert all(d["x_t"].shape == d["pred_x0"].shape == (3, 1, 2, 2) for d in res.intermediates)
    res = sample("ddpm", gaussian_eps_fn(0.0, 0.5, sch), sch, (3, 2), 40, progress=False, return_intermediates=5)
    assert len(res.intermediates) == 5 and res.intermediates[0]["t"] == res.timesteps[0] and res.intermediates[-1]["t"] == 0
    assert ddpm_sample(gaussian_eps_fn(0.0, 0.5, sch), sch, (3, 2), num_steps=5, progress=False).intermediates is None
    assert make_timesteps(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]


def test_every_spacing_gives_num_steps_valid_indices():
    for T in (10, 100, 1000, 4000):
        for n in range(1, T + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for spacing in SPACINGS:
                    ts = make_timesteps(T, n, spacing)
                    assert len(ts) == n and int(ts.min()) >= 0 and int(ts.max()) <= T - 1, (T, n, spacing, ts[-3:].tolist())
                    assert (ts[1:] < ts[:-1]).all(), (T, n, spacing)
            assert int(make_timesteps(T, n, "trailing")[0]) == T - 1
    assert make_timesteps(1000, 61, "trailing").tolist()[-2:] == [32, 15]        # diffusers: 62 steps, ending −1


def test_gaussian_chain_std_names_a_bad_variance():
    with pytest.raises(ConfigError, match=r"variance: expected one of 'beta', 'beta_tilde', got 'fixed_large'"):
        gaussian_chain_std(get_schedule("linear"), [999, 0], 0.5, "ddpm", variance="fixed_large")


def test_leading_spacing_warns_when_it_starts_far_below_T():
    with pytest.warns(UserWarning, match=r"starts at step 599, 400 steps below"): make_timesteps(1000, 600, "leading")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (10, 20, 50, 100, 1000): make_timesteps(1000, n, "leading")


def test_sample_follows_generator_device_and_dtype():
    sch = get_schedule("linear")
    res = sample("ddim", gaussian_eps_fn(0.0, 0.5, sch), sch, (2, 3), 5, generator=torch.Generator().manual_seed(0),
                 dtype=torch.float64, progress=False)
    assert res.samples.dtype == torch.float64 and res.samples.device.type == "cpu"


class _Net(torch.nn.Module):
    "A toy conditional network: output = x·(1 + t/T) + y (broadcast), so the parts are easy to tell apart."
    def forward(self, x, t, y=None):
        out = x * (1 + t.float().view(-1, 1) / DEFAULT_T)
        return out if y is None else out + y.float().view(-1, 1)


def test_eps_fn_from_model_guidance_and_conversions():
    sch, net = get_schedule("linear"), _Net()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([1, 2, 3, 4])
    w, null = 2.0, 10
    guided = eps_fn_from_model(net, y=y, guidance_scale=w, null_class=null)(x, t)
    assert torch.allclose(guided, (1 + w) * net(x, t, y) - w * net(x, t, torch.full_like(y, null)))
    assert torch.allclose(eps_fn_from_model(net, y=3)(x, t), net(x, t, torch.full((4,), 3)))
    assert torch.allclose(eps_fn_from_model(net)(x, t), net(x, t))
    ab = sch.alpha_bar[t].float().view(-1, 1)
    out = net(x, t)
    assert torch.allclose(eps_fn_from_model(net, "x0", schedule=sch)(x, t), (x - ab.sqrt() * out) / (1 - ab).sqrt(), atol=1e-5)
    assert torch.allclose(eps_fn_from_model(net, "v", schedule=sch)(x, t), ab.sqrt() * out + (1 - ab).sqrt() * x, atol=1e-6)
    score = score_fn_from_eps(eps_fn_from_model(net), sch)(x, t)
    assert torch.allclose(score, -out / (1 - ab).sqrt(), rtol=1e-4)


def test_bad_input():
    sch = get_schedule("linear")
    eps_fn = gaussian_eps_fn(0.0, 1.0, sch)
    with pytest.raises(ConfigError, match="known samplers: ddim, ddpm"): sample("heun", eps_fn, sch, (2, 1), 10)
    for nfe in (0, -3, DEFAULT_T + 1, 2.5):
        with pytest.raises(ConfigError, match=r"num_steps \(NFE\)"): sample("ddim", eps_fn, sch, (2, 1), nfe)
    with pytest.raises(ConfigError, match=r"expected shape \(2, 3\).*got \(2, 1\)"):
        ddim_sample(lambda x, t: x[:, :1], sch, (2, 3), 5, progress=False)
    with pytest.raises(ConfigError, match=r"expected shape \(2, 3\).*got \(2, 3, 1\)"):
        ddpm_sample(lambda x, t: x[..., None], sch, (2, 3), num_steps=5, progress=False)
    with pytest.raises(ConfigError, match="variance"): ddpm_sample(eps_fn, sch, (2, 1), variance="learned", progress=False)
    with pytest.raises(ConfigError, match="eta"): ddim_sample(eps_fn, sch, (2, 1), 5, eta=-1, progress=False)
    with pytest.raises(ConfigError, match="strictly decreasing"): ddim_sample(eps_fn, sch, (2, 1), timesteps=[5, 10], progress=False)
    with pytest.raises(ConfigError, match="strictly decreasing"): ddim_sample(eps_fn, sch, (2, 1), timesteps=[1000, 10], progress=False)
    with pytest.raises(ConfigError, match="spacing"): ddim_sample(eps_fn, sch, (2, 1), 5, spacing="odd", progress=False)
    with pytest.raises(ConfigError, match="x_T"): ddim_sample(eps_fn, sch, (2, 1), 5, x_T=torch.zeros(3, 1), progress=False)
    with pytest.raises(ConfigError, match="noise"):
        ddim_step(torch.zeros(2, 1), 10, 5, torch.zeros(2, 1), sch, eta=0.5, noise=None)
    with pytest.raises(ConfigError, match="t_prev"): ddim_step(torch.zeros(2, 1), 10, 10, torch.zeros(2, 1), sch)
    with pytest.raises(ConfigError, match="schedule"): eps_fn_from_model(_Net(), "v")
    with pytest.raises(ConfigError, match="null_class"): eps_fn_from_model(_Net(), y=1, guidance_scale=1.0)
    with pytest.raises(ConfigError, match="labels"): eps_fn_from_model(_Net(), guidance_scale=1.0, null_class=10)
    with pytest.raises(ConfigError, match="prediction"): eps_fn_from_model(_Net(), "score")
    assert set(SAMPLERS) >= {"ddpm", "ddim"}


def test_bfloat16_precision_returns_float32_close_to_float32(monkeypatch):
    "precision='bfloat16' runs the network under autocast but hands the sampler float32 ε̂ close to the float32 one."
    from skindiff.unet import UNet, unet_preset
    monkeypatch.setattr(samplers_mod, "cpu_bf16_native", lambda: True)   # numerics only: no warning on CPUs without bf16 units
    torch.manual_seed(0)
    model = UNet(unet_preset("mnist", base_channels=16, image_size=16, attention_resolutions=(4,))).eval()
    with torch.no_grad():   # give the zero-initialised output layer weights, so ε̂ is not identically 0
        for p in model.parameters(): p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999])
        e32 = eps_fn_from_model(model)(x, t)
        e16 = eps_fn_from_model(model, precision="bfloat16")(x, t)
    assert e16.dtype == torch.float32 and e32.abs().mean() > 0.01
    rel = ((e16 - e32).norm() / e32.norm()).item()
    assert 0 < rel < 0.05, rel


def test_unknown_precision_is_named():
    with pytest.raises(ConfigError, match="precision='float16'"):
        eps_fn_from_model(lambda x, t: x, precision="float16")
    with pytest.raises(ConfigError, match="precision='half'.*auto"):
        resolve_precision("half", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch, native):
    "'auto' is bfloat16 on CUDA and on CPUs with bfloat16 units, float32 on the others; explicit bfloat16 there warns."
    import warnings
    monkeypatch.setattr(samplers_mod, "cpu_bf16_native", lambda: native)
    assert resolve_precision("auto", "cpu") == ("bfloat16" if native else "float32")
    assert resolve_precision("auto", torch.device("cuda")) == resolve_precision("auto", "cuda:1") == "bfloat16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # float32 never warns, nor bfloat16 where it is native
        assert resolve_precision("float32", "cpu") == "float32"
        if native: assert resolve_precision("bfloat16", "cpu") == "bfloat16"
    if not native:
        with pytest.warns(UserWarning, match="no bfloat16 units.*'auto' picks float32"):
            assert resolve_precision("bfloat16", "cpu") == "bfloat16"    # kept as asked: the user may want its numbers


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_runs_the_network_as_resolved(monkeypatch, native):
    "eps_fn_from_model(precision='auto') gives exactly the ε̂ of the precision it resolves to on the device of x_t."
    import warnings
    monkeypatch.setattr(samplers_mod, "cpu_bf16_native", lambda: native)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    seen = []
    model = lambda x, t: (seen.append(torch.is_autocast_enabled("cpu")), net(x))[1]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # explicit bfloat16 on a CPU without units warns (tested above)
        auto = eps_fn_from_model(model, precision="auto")
        got = [auto(x, t) for _ in range(2)]                # resolved once per device, same answer on every call
        want = eps_fn_from_model(model, precision="bfloat16" if native else "float32")(x, t)
    assert seen == [native]*2 + [native]
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want) and torch.equal(got[1], want)
