"""Chapter 18 (skindiff.guidance): classifier-free guidance, SDEdit, SSIM, variant metadata, input errors and
the recipe's checkpoint check. Fast: no real data, tiny networks, an exact Gaussian ε as the model."""
import numpy as np, pytest, torch
from skindiff.core import ConfigError
from skindiff.guidance import (NUM_CLASSES, LesionDDPMConfig, cfg_combine, guided_eps_fn, sdedit, sdedit_timesteps, ssim,
                               gaussian_window, cosine_to_parent, mean_pairwise_distance, variant_metadata, check_images,
                               train_lesion_ddpm, load_lesion_ddpm, sample_lesions, random_dihedral)
from skindiff.mnist_ddpm import DDPMRecipe, MnistDDPMConfig, train_ddpm
from skindiff.samplers import gaussian_eps_fn
from skindiff.schedules import get_schedule
from skindiff.train import CheckpointError

SCHEDULE = get_schedule("linear", 1000)
ORACLE = gaussian_eps_fn(0.0, 0.5, SCHEDULE)             # exact ε for data N(0, 0.5² I)

def oracle_model(x, t, y):                               # a conditional ε model that ignores its label
    return ORACLE(x, t)

def tiny_cfg(**kw) -> LesionDDPMConfig:
    return LesionDDPMConfig(**dict(dict(train_steps=1, batch_size=4, warmup_steps=0, image_size=16, base_channels=16,
                                        channel_mults=(1, 2), attention_resolutions=(8,), max_images=8), **kw))

# --- classifier-free guidance (eq 18.1) ---
def test_cfg_combination_formula():
    ec, eu = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(cfg_combine(ec, eu, 0.0), ec)                              # w = 0: the conditional model
    assert torch.allclose(cfg_combine(ec, eu, 2.0), 3 * ec - 2 * eu)                 # (1 + w) ε_c − w ε_u
    assert torch.allclose(cfg_combine(ec, eu, 2.0), eu + 3 * (ec - eu))              # = ε_u + s (ε_c − ε_u) with s = 1 + w

def test_guided_eps_fn_uses_the_null_class_and_the_formula():
    def model(x, t, y):                                  # ε = label value everywhere: conditional y, null class 7
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()
    x, t = torch.zeros(2, 3, 4, 4), torch.tensor([5, 5])
    out = guided_eps_fn(model, torch.tensor([1, 4]), 2.0)(x, t)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([3 * 1 - 2 * NUM_CLASSES, 3 * 4 - 2 * NUM_CLASSES]).float())
    assert torch.allclose(guided_eps_fn(model, 3, 0.0)(x, t), torch.full_like(x, 3.0))

@pytest.mark.parametrize("w", [-0.5, float("nan"), float("inf"), "2", True])
def test_bad_guidance_scale(w):
    with pytest.raises(ConfigError, match="w \\(guidance scale\\)"): guided_eps_fn(oracle_model, 0, w)

@pytest.mark.parametrize("y", [7, -1, 12, 2.0])
def test_unknown_class_label(y):
    x0 = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="y \\(class label\\)"): sdedit(oracle_model, SCHEDULE, x0, 0.5, y, 1.0, nfe=5)

# --- SDEdit (eq 18.2) ---
def test_sdedit_timesteps_are_the_part_of_the_chain_below_t0():
    assert sdedit_timesteps(1000, 1.0, 10).tolist() == np.linspace(0, 999, 10).round().astype(int)[::-1].tolist()
    ts = sdedit_timesteps(1000, 0.5, 10)
    assert ts[0] == 499 and ts[-1] == 0 and len(ts) == 5 and (ts[1:] < ts[:-1]).all()
    assert sdedit_timesteps(1000, 1e-4, 50).tolist() == [0]

def test_sdedit_small_t0_returns_nearly_the_input():
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    out = sdedit(oracle_model, SCHEDULE, x0, 1e-3, 0, 0.0, torch.Generator().manual_seed(0), nfe=50)
    assert out.nfe == 1 and (out.samples - x0).abs().max() < 0.05

def test_sdedit_t0_one_forgets_the_input():
    a, b = torch.full((2, 3, 16, 16), -0.8), torch.full((2, 3, 16, 16), 0.8)
    run = lambda x, t0: sdedit(oracle_model, SCHEDULE, x, t0, [1, 2], 1.0, torch.Generator().manual_seed(0), nfe=20).samples
    # same seed, inputs 1.6 apart: at t0 = 1 only √ᾱ_T ≈ 0.006 of the input survives ...
    assert (run(a, 1.0) - run(b, 1.0)).abs().max() < 0.02
    # ... while at t0 = 0.3 most of it does
    assert (run(a, 0.3) - run(b, 0.3)).abs().mean() > 0.3

def test_sdedit_is_seeded():
    x0 = torch.zeros(2, 3, 16, 16)
    f = lambda s: sdedit(oracle_model, SCHEDULE, x0, 0.6, 3, 2.0, torch.Generator().manual_seed(s), nfe=10).samples
    assert torch.equal(f(0), f(0)) and not torch.equal(f(0), f(1))

@pytest.mark.parametrize("t0", [0, -0.1, 1.5, float("nan")])
def test_t0_outside_unit_interval(t0):
    with pytest.raises(ConfigError, match="t0_frac"): sdedit(oracle_model, SCHEDULE, torch.zeros(1, 3, 16, 16), t0, 0, 1.0, nfe=5)

def test_images_of_the_wrong_size_or_range():
    model = torch.nn.Identity(); model.cfg = tiny_cfg().unet_config()           # any ε model with a config
    with pytest.raises(ConfigError, match="x0: the model works at 16×16 px, got 32×32"):
        sdedit(model, SCHEDULE, torch.zeros(1, 3, 32, 32), 0.5, 0, 1.0, nfe=5)
    with pytest.raises(ConfigError, match=r"x0: float images must lie in \[-1, 1\]"):
        sdedit(model, SCHEDULE, torch.full((1, 3, 16, 16), 200.0), 0.5, 0, 1.0, nfe=5)
    with pytest.raises(ConfigError, match="x0: expected float images"):
        sdedit(model, SCHEDULE, torch.zeros(1, 3, 16, 16, dtype=torch.uint8), 0.5, 0, 1.0, nfe=5)
    with pytest.raises(ConfigError, match="x0: expected a non-empty batch N×3×16×16"):
        sdedit(model, SCHEDULE, torch.zeros(3, 16, 16), 0.5, 0, 1.0, nfe=5)
    with pytest.raises(ConfigError, match="images: expected a non-empty batch"): check_images(torch.zeros(2, 1, 8, 8), name="images")

# --- SSIM (eq 18.3) ---
def test_ssim_identity_symmetry_and_decrease_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 24, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    z = (x + 0.6 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x))
    assert (ssim(x, z) < ssim(x, y)).all() and (ssim(x, y) < 1).all()

def test_ssim_of_constant_images_is_the_luminance_term():
    a, b, L = 0.3, -0.2, 2.0
    c1 = (0.01 * L) ** 2                                     # σ = 0: SSIM = (2ab + C1)/(a² + b² + C1) exactly
    s = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)

def test_ssim_matches_scipy_reference():
    from scipy.ndimage import gaussian_filter
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 20, 20, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    a, b = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    f = lambda m: gaussian_filter(m, 1.5, truncate=3.5)[5:-5, 5:-5]   # radius int(3.5·1.5 + 0.5) = 5: window 11
    mx, my = f(a), f(b)
    vx, vy, cxy = f(a * a) - mx ** 2, f(b * b) - my ** 2, f(a * b) - mx * my
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    ref = (((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean()
    assert ssim(x, y).item() == pytest.approx(ref, rel=1e-9)
    assert gaussian_window().sum().item() == pytest.approx(1.0) and len(gaussian_window()) == 11

def test_ssim_bad_input():
    with pytest.raises(ConfigError, match="smaller than the 11×11 window"): ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="same shape|one shape"): ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 12, 12))

# --- feature similarity and diversity ---
def test_cosine_and_diversity():
    p = torch.tensor([[1.0, 0.0]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])
    assert torch.allclose(cosine_to_parent(p, v), torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64))
    assert mean_pairwise_distance(v).item() == pytest.approx((1 + 0 + 1) / 3)          # pairs: (a,b)=1, (a,c)=0, (b,c)=1
    assert mean_pairwise_distance(v[:, [0, 2]]).item() == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="k ≥ 2"): mean_pairwise_distance(v[:, :1])

# --- metadata ---
def test_variant_metadata_fields(tmp_path):
    ck = tmp_path / "ckpt.pt"; ck.write_bytes(b"weights")
    m = variant_metadata("ISIC_0024306", "mel", 0.6, 2.0, 7, ck, nfe=30, variant=2)
    assert {"parent_id", "label", "label_idx", "t0", "w", "seed", "variant", "sampler", "nfe", "checkpoint",
            "checkpoint_sha256", "method"} <= set(m)
    assert m["label"] == "mel" and m["label_idx"] == 4 and m["t0"] == 0.6 and m["w"] == 2.0 and m["seed"] == 7
    import hashlib
    assert m["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert variant_metadata("ISIC_1", 4, 0.6, 2.0, 7, ck, nfe=30) == {**m, "parent_id": "ISIC_1", "variant": 0}
    with pytest.raises(ConfigError, match="t0_frac"): variant_metadata("ISIC_1", 4, 0.0, 2.0, 7, ck, nfe=30)
    with pytest.raises(ConfigError, match="checkpoint"): variant_metadata("ISIC_1", 4, 0.5, 2.0, 7, tmp_path / "absent.pt", nfe=30)
    with pytest.raises(ConfigError, match="y \\(class label\\)"): variant_metadata("ISIC_1", 9, 0.5, 2.0, 7, ck, nfe=30)

# --- recipe, training with labels, checkpoint check ---
def test_recipe_validation():
    with pytest.raises(ConfigError, match="p_uncond"): tiny_cfg(p_uncond=0.0)
    with pytest.raises(ConfigError, match="attention_resolutions"): tiny_cfg(attention_resolutions=(32,))

def test_train_with_labels_then_sample_and_refuse_other_checkpoints(tmp_path):
    cfg = tiny_cfg()
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % NUM_CLASSES
    res, schedule = train_lesion_ddpm(cfg, x, y, ckpt_dir=tmp_path / "lesion", progress=False)
    assert res.step == 1 and res.checkpoint is not None
    ck = torch.load(res.checkpoint, weights_only=True)
    assert ck["meta"]["p_uncond"] == 0.1 and ck["meta"]["dataset"] == "ham10000" and ck["meta"]["unet"]["num_classes"] == NUM_CLASSES
    model, sch = load_lesion_ddpm(cfg, tmp_path / "lesion")
    s = sample_lesions(model, sch, [0, 6], w=1.0, nfe=2)
    assert s.shape == (2, 3, 16, 16) and s.abs().max() <= 1
    with pytest.raises(CheckpointError, match=r"unet.base_channels: 16 in the checkpoint, 32 here"):
        load_lesion_ddpm(tiny_cfg(base_channels=32), res.checkpoint)
    with pytest.raises(ConfigError, match="labels: 7 is not a class"):
        train_lesion_ddpm(cfg, x, torch.full((8,), 7), ckpt_dir=tmp_path / "x", progress=False)
    with pytest.raises(ConfigError, match="images: the model works at 16×16 px, got 8×8"):
        train_lesion_ddpm(cfg, x[:, :, :8, :8], y, ckpt_dir=tmp_path / "x", progress=False)
    # an MNIST checkpoint is another dataset and architecture
    mn, _ = train_ddpm(MnistDDPMConfig(train_steps=1, batch_size=4, warmup_steps=0, base_channels=16),
                       torch.zeros(8, 1, 28, 28), ckpt_dir=tmp_path / "mnist", progress=False)
    with pytest.raises(CheckpointError, match=r"dataset: 'mnist' in the checkpoint, 'ham10000' here"):
        load_lesion_ddpm(cfg, mn.checkpoint)

def test_train_ddpm_labels_are_optional_and_checked(tmp_path):
    # unconditional recipes are unchanged: no p_uncond in their metadata, no labels needed
    assert "p_uncond" not in MnistDDPMConfig().meta()
    with pytest.raises(ConfigError, match="p_uncond"):
        train_ddpm(MnistDDPMConfig(train_steps=1, batch_size=4, p_uncond=0.1), torch.zeros(8, 1, 28, 28), progress=False)
    with pytest.raises(ConfigError, match="unconditional"):
        train_ddpm(MnistDDPMConfig(train_steps=1, batch_size=4), torch.zeros(8, 1, 28, 28), labels=torch.zeros(8, dtype=torch.long),
                   progress=False)

def test_random_dihedral_permutes_views():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(32, 1, 1, 1)
    out = random_dihedral(x, torch.Generator().manual_seed(0))
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)   # same pixels, rearranged
    assert len({tuple(o.flatten().tolist()) for o in out}) > 1
