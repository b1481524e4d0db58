"""Chapter 19 (skindiff.adversarial): splits without leakage, the loop's bookkeeping (metadata, near-copy rule,
controls of equal size, resuming after an interruption, refusing another loop's folder, bad input) with a tiny
stand-in classifier and generator, and the statistics against hand-computed and simulated oracles."""
import json, math
import numpy as np, pandas as pd, pytest, torch
from skindiff.core import ConfigError, SkindiffError, atomic_torch_save, atomic_savez
from skindiff.skin import SKIN_CLASSES, lesion_split
from skindiff.adversarial import (LoopConfig, Backend, SplitData, LeakageError, loop_split, check_loop_split, check_training_sources,
                                  check_eval_set, check_classes, run_loop, run_controls, predict_arms, arm_model_paths,
                                  mine_hard_cases, nearest_neighbours, near_copy_thresholds, flag_near_copies, pixel_vectors,
                                  balanced_accuracy, per_class_sensitivity, mean_sd, paired_bootstrap_diff, mcnemar, mel_vs_nv)

C, S = len(SKIN_CLASSES), 8

# --- data: 7 classes of coloured 8 px squares, lesions with one to three images ---
def make_table(n_lesions=(60, 30, 30, 20, 40, 200, 20), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(n_lesions):
        for l in range(n):
            for i in range(int(rng.integers(1, 4))):
                rows.append(dict(image_id=f"img_{c}_{l}_{i}", lesion_id=f"les_{c}_{l}", label=SKIN_CLASSES[c], label_idx=c))
    return pd.DataFrame(rows)

def make_images(table, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[110 + 8 * c, 140 - 6 * c, 120 + (c % 3) * 6] for c in range(C)], dtype=torch.float32)
    y = torch.as_tensor(table["label_idx"].to_numpy(np.int64).copy())
    shift = 20 * torch.randn(len(y), 3, 1, 1, generator=g)                         # per image: the classes overlap
    x = base[y][:, :, None, None] + shift + 40 * torch.randn(len(y), 3, S, S, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), y

@pytest.fixture(scope="module")
def split_table():
    return loop_split(lesion_split(make_table()), 0.25, seed=0)

def loop_data(table):
    x, y = make_images(table)
    m = {s: torch.from_numpy((table["split"] == s).to_numpy().copy()) for s in ("train", "mine", "select", "test")}
    return {s: SplitData(x[m[s]], y[m[s]],
                         table.loc[table["split"] == s, "image_id"].tolist()) for s in ("train", "mine", "select", "test")}

# --- a tiny backend: nearest class mean, generator = parent + seeded noise ---
class Calls:
    def __init__(self, fail_at=None): self.n, self.fail_at = 0, fail_at

def tiny_backend(calls: Calls | None = None, classes=SKIN_CLASSES, generator_classes=SKIN_CLASSES) -> Backend:
    calls = calls or Calls()
    def train(x, y, folder, seed, meta):
        f = x.flatten(1).float()
        g = torch.Generator().manual_seed(seed)
        means = torch.stack([f[y == c].mean(0) if (y == c).any() else torch.zeros(f.shape[1]) for c in range(C)])
        return means + 0.5 * torch.randn(means.shape, generator=g)
    def predict(m, x): return (-torch.cdist(x.flatten(1).float(), m) / 50).softmax(1)
    def features(m, x): return torch.nn.functional.avg_pool2d(x.float(), 4).flatten(1)
    def save(m, path): atomic_torch_save(m, path)
    def load(path): return torch.load(path, weights_only=True)
    def generate(px, py, seed):
        calls.n += 1
        if calls.fail_at is not None and calls.n == calls.fail_at: raise KeyboardInterrupt("killed")
        g = torch.Generator().manual_seed(seed)
        sigma = 20 + 60 * torch.rand(len(px), 1, 1, 1, generator=g)                  # some variants are near-copies
        return (px.float() + sigma * torch.randn(px.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)
    def sample(y, seed):
        g = torch.Generator().manual_seed(seed)
        return (120 + 60 * torch.randn(len(y), 3, S, S, generator=g)).clamp(0, 255).round().to(torch.uint8)
    return Backend(list(classes), train, predict, features, save, load, generate, sample,
                   dict(classes=list(generator_classes), checkpoint="tiny.pt", checkpoint_sha256="0" * 64))

CFG = dict(rounds=2, k=2, t0=0.5, w=1.0, nfe=10, max_parents=12, image_size=S, input_size=S, train_steps=1, eval_every=1)

# --- splits ---
def test_loop_split_is_lesion_grouped_and_keeps_chapter_14s_held_out_sets(split_table):
    base = lesion_split(make_table())
    t = split_table
    assert set(t["split"]) == {"train", "mine", "select", "test"}
    assert (t.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(t.loc[t["split"] == "select", "image_id"]) == set(base.loc[base["split"] == "val", "image_id"])
    assert set(t.loc[t["split"] == "test", "image_id"]) == set(base.loc[base["split"] == "test", "image_id"])
    assert set(t.loc[t["split"].isin(["train", "mine"]), "image_id"]) == set(base.loc[base["split"] == "train", "image_id"])
    frac = (t["split"] == "mine").sum() / t["split"].isin(["train", "mine"]).sum()
    assert 0.2 < frac < 0.3
    for c in SKIN_CLASSES: assert ((t["split"] == "mine") & (t["label"] == c)).any()      # stratified: every class mined

def test_a_lesion_in_two_splits_is_refused(split_table):
    t = split_table.copy()
    i = t.index[t["split"] == "train"][0]
    j = t.index[(t["split"] == "test")][0]
    t.loc[i, "lesion_id"] = t.loc[j, "lesion_id"]
    with pytest.raises(LeakageError, match="two splits"): check_loop_split(t)

def test_sources_from_select_or_test_are_refused(split_table):
    t = split_table
    ok = t[t["split"].isin(["train", "mine"])].head(5)
    check_training_sources(pd.DataFrame(dict(image_id=ok["image_id"], kind="real", source_id=ok["image_id"])), t)
    for s in ("select", "test"):
        bad = t[t["split"] == s].head(1)["image_id"].tolist()
        src = pd.DataFrame(dict(image_id=["syn-x"], kind=["sdedit"], source_id=bad))
        with pytest.raises(LeakageError, match=s):
            check_training_sources(pd.concat([pd.DataFrame(dict(image_id=ok["image_id"], kind="real", source_id=ok["image_id"])), src]), t)
    with pytest.raises(LeakageError, match="not real test"):
        check_eval_set(t.loc[t["split"] == "test", "image_id"].tolist() + ["syn-s0-r0-img-v0"], t, "test")

# --- bad input ---
@pytest.mark.parametrize("kw,match", [(dict(w=-0.5), "w \\(guidance scale\\)"), (dict(t0=0.0), "t0"), (dict(t0=1.5), "t0"),
                                      (dict(k=0), "k \\(variants"), (dict(k=-2), "k \\(variants"), (dict(copy_quantile=1.0), "copy_quantile")])
def test_bad_loop_settings(kw, match):
    with pytest.raises(ConfigError, match=match): LoopConfig(**kw)

def test_diffusion_classes_must_be_the_classifiers(split_table, tmp_path):
    with pytest.raises(ConfigError, match="diffusion checkpoint has classes"): check_classes(["nv", "mel"], SKIN_CLASSES)
    data = loop_data(split_table); data.pop("test")
    swapped = list(SKIN_CLASSES[::-1])
    with pytest.raises(ConfigError, match="diffusion checkpoint has classes"):
        run_loop(LoopConfig(**CFG), data, split_table, tiny_backend(generator_classes=swapped), tmp_path, 0, log=lambda s: None)
    assert not any(tmp_path.iterdir())                                              # refused before writing anything

def test_the_loop_never_takes_the_test_split(split_table, tmp_path):
    with pytest.raises(ConfigError, match="never sees the test split"):
        run_loop(LoopConfig(**CFG), loop_data(split_table), split_table, tiny_backend(), tmp_path, 0, log=lambda s: None)

# --- the loop ---
def run_all(table, out, backend, seed=0, **kw):
    data = loop_data(table); data.pop("test")
    cfg = LoopConfig(**dict(CFG, **kw))
    rounds = run_loop(cfg, data, table, backend, out, seed, gen_batch=8, log=lambda s: None)
    controls = run_controls(cfg, data, table, backend, out, seed, log=lambda s: None)
    return cfg, rounds, controls

def test_loop_metadata_leakage_and_equal_sized_controls(split_table, tmp_path):
    cfg, rounds, controls = run_all(split_table, tmp_path, tiny_backend())
    assert list(rounds["round"]) == [0, 1, 2]
    folder = tmp_path/"seed0"
    kept = pd.concat([pd.read_csv(folder/f"round{r}"/"kept.csv") for r in range(2)])
    audit = pd.concat([pd.read_csv(folder/f"round{r}"/"audit.csv") for r in range(2)])
    assert len(kept) > 0 and len(kept) == (~audit["near_copy"]).sum()
    for col in ("parent_id", "t0", "w", "seed", "checkpoint_sha256", "variant", "nn_pixel", "nn_feature"):
        assert kept[col].notna().all(), col
    assert (kept["t0"] == 0.5).all() and (kept["w"] == 1.0).all()
    mine_ids = set(split_table.loc[split_table["split"] == "mine", "image_id"])
    assert set(kept["parent_id"]) <= mine_ids                                        # parents are mine images only
    hard = pd.read_csv(folder/"round0"/"hard.csv")
    assert len(hard) <= cfg.max_parents and (hard["label_idx"] != hard["predicted"]).all()
    # near-copy rule: kept variants are at least as far as the thresholds, flagged ones are closer
    thr = json.loads((folder/"near_copy_thresholds.json").read_text())
    assert (kept["nn_pixel"] >= thr["pixel"]).all() and (kept["nn_feature"] >= thr["feature"]).all()
    flagged = audit[audit["near_copy"]]
    assert ((flagged["nn_pixel"] < thr["pixel"]) | (flagged["nn_feature"] < thr["feature"])).all()
    # every training set of every arm is training-side only, and the controls add as many images per class
    assert (controls["added"] == len(kept)).all()
    assert (controls[list(SKIN_CLASSES)].nunique() == 1).all()
    for arm, path in arm_model_paths(tmp_path, 0, cfg.rounds).items():
        src = pd.read_csv(path.parent/"train_sources.csv", keep_default_na=False)
        check_training_sources(src, split_table)
        held = set(split_table.loc[split_table["split"].isin(["select", "test"]), "image_id"])
        assert not set(src["source_id"]) & held and not set(src["image_id"]) & held, arm
    assert len(pd.read_csv(folder/"round2"/"train_sources.csv")) == (split_table["split"] == "train").sum() + len(kept)
    data = loop_data(split_table)
    p = predict_arms(tmp_path, [0], cfg.rounds, tiny_backend(), data["test"].x)
    assert set(p) == {"before", "real", "augment", "untargeted", "targeted"} and p["targeted"].shape == (1, len(data["test"].y), C)

def _outputs(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file() and f.suffix in (".csv", ".npz", ".json")}

@pytest.mark.parametrize("fail_at", [2, 5])      # round 0 has chunks 1-3, round 1 chunks 4-6
def test_an_interrupted_loop_resumes_to_the_same_result(split_table, tmp_path, fail_at):
    run_all(split_table, tmp_path/"clean", tiny_backend())
    calls = Calls(fail_at=fail_at)                          # the generator is 'killed' at its fail_at-th chunk
    with pytest.raises(KeyboardInterrupt): run_all(split_table, tmp_path/"killed", tiny_backend(calls))
    run_all(split_table, tmp_path/"killed", tiny_backend())
    clean, resumed = _outputs(tmp_path/"clean"), _outputs(tmp_path/"killed")
    assert clean.keys() == resumed.keys() and all(clean[k] == resumed[k] for k in clean), \
        [k for k in clean if clean[k] != resumed.get(k)]

def test_a_folder_of_another_loop_is_refused(split_table, tmp_path):
    run_all(split_table, tmp_path, tiny_backend())
    with pytest.raises(ConfigError, match="holds a loop started with other parameters.*k"):
        run_all(split_table, tmp_path, tiny_backend(), k=3)
    with pytest.raises(ConfigError, match="other parameters.*t0"):
        run_all(split_table, tmp_path, tiny_backend(), t0=0.7)
    run_all(split_table, tmp_path, tiny_backend())                                   # the same parameters resume

# --- pieces ---
def test_mine_hard_cases_caps_and_balances():
    y = np.array([0] * 50 + [1] * 5 + [2] * 5)
    p = np.eye(C)[np.r_[np.full(50, 5), np.full(5, 5), np.full(5, 2)]]               # class 0 and 1 all wrong, 2 right
    idx = mine_hard_cases(p, y, 8, seed=1)
    assert len(idx) == 8 and (y[idx] != 2).all() and (y[idx] == 1).sum() == 4       # in turns: 4 of each wrong class
    assert len(mine_hard_cases(p, y, 1000)) == 55

def test_nearest_neighbours_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(13, 6, generator=g), torch.randn(20, 6, generator=g)
    d, i = nearest_neighbours(q, r, "rms", batch=4)
    full = torch.cdist(q.double(), r.double()) / math.sqrt(6)
    assert torch.equal(i, full.argmin(1)) and torch.allclose(d, full.min(1).values)
    d, i = nearest_neighbours(q, r, "cosine")
    cos = torch.nn.functional.cosine_similarity(q[:, None].double(), r[None].double(), dim=-1)
    assert torch.equal(i, cos.argmax(1)) and torch.allclose(d, 1 - cos.max(1).values)
    thr = near_copy_thresholds(torch.arange(100.0), torch.arange(100.0) / 100, 0.05)
    assert thr["pixel"] == pytest.approx(4.95) and thr["feature"] == pytest.approx(0.0495)
    assert flag_near_copies(torch.tensor([1.0, 10.0, 10.0]), torch.tensor([0.5, 0.01, 0.5]), thr).tolist() == [True, True, False]

# --- statistics: oracles ---
def test_mcnemar_against_a_hand_computed_table():
    ca = np.r_[np.ones(10), np.zeros(2), np.ones(30), np.zeros(8)].astype(bool)     # b = 10 (a right, b wrong), c = 2
    cb = np.r_[np.zeros(10), np.ones(2), np.ones(30), np.zeros(8)].astype(bool)
    r = mcnemar(ca, cb)
    assert (r["b"], r["c"]) == (10, 2)
    assert r["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)       # 2·P(X ≤ 2), X ~ Bin(12, 1/2)
    r = mcnemar(ca, cb, exact=False)
    assert r["statistic"] == pytest.approx(49 / 12) and r["p_value"] == pytest.approx(0.043308, abs=1e-5)
    from scipy import stats
    assert r["p_value"] == pytest.approx(stats.chi2.sf(49 / 12, 1), rel=1e-9)
    assert mcnemar(cb, ca)["p_value"] == pytest.approx(mcnemar(ca, cb)["p_value"])
    assert mcnemar(ca, ca)["p_value"] == 1.0 and mcnemar(ca, ca)["n_discordant"] == 0
    b, c = 31, 14
    x = np.r_[np.ones(b), np.zeros(c)].astype(bool)
    assert mcnemar(x, ~x)["p_value"] == pytest.approx(stats.binomtest(c, b + c, 0.5).pvalue, rel=1e-9)

def test_balanced_accuracy_and_sensitivity():
    from sklearn.metrics import balanced_accuracy_score
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, C, 300), rng.integers(0, C, 300)
    assert balanced_accuracy(y, p, C) == pytest.approx(balanced_accuracy_score(y, p))
    sens = per_class_sensitivity(y, p, SKIN_CLASSES)
    assert np.mean(list(sens.values())) == pytest.approx(balanced_accuracy(y, p, C))
    assert mean_sd([1, 2, 3]) == (2.0, 1.0)

def test_paired_bootstrap_point_estimate_sign_and_degenerate_cases():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = np.array([0, 0, 1, 1, 1, 1, 0, 0])         # BA 0.5
    b = np.array([0, 0, 0, 1, 1, 1, 1, 0])         # BA 0.75
    r = paired_bootstrap_diff(y, a, b, 2, n_boot=300, seed=0)
    assert r["diff"] == pytest.approx(0.25)
    assert r["ci"][0] <= 0.25 <= r["ci"][1]
    r2 = paired_bootstrap_diff(y, b, a, 2, n_boot=300, seed=0)
    assert r2["diff"] == pytest.approx(-0.25) and r2["ci"] == pytest.approx([-r["ci"][1], -r["ci"][0]])
    assert paired_bootstrap_diff(y, a, a, 2, n_boot=50)["ci"] == [0.0, 0.0]
    two = paired_bootstrap_diff(y, np.stack([a, a]), np.stack([b, a]), 2, n_boot=10)   # mean over two seeds
    assert two["diff"] == pytest.approx(0.125)

def test_paired_bootstrap_covers_a_known_difference():
    """Simulated test sets with a known population difference: arm b is right with probability 0.85, arm a with 0.70,
    on every class, so ΔBA = 0.15. The 95 % CI should cover 0.15 in about 95 % of the data sets and exclude 0."""
    rng = np.random.default_rng(1)
    cover, exclude0, n_sets = 0, 0, 60
    for s in range(n_sets):
        y = rng.integers(0, 3, 300)
        a = np.where(rng.random(300) < 0.70, y, (y + 1) % 3)
        b = np.where(rng.random(300) < 0.85, y, (y + 2) % 3)
        lo, hi = paired_bootstrap_diff(y, a, b, 3, n_boot=200, seed=s)["ci"]
        cover += lo <= 0.15 <= hi; exclude0 += lo > 0
    assert cover / n_sets >= 0.85, cover
    assert exclude0 / n_sets >= 0.9, exclude0

def test_paired_bootstrap_resamples_whole_groups():
    # two images per group that always agree: grouped resampling keeps them together, so the CI is wider than per image
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, 60), 4)
    a = np.repeat(np.where(rng.random(60) < 0.6, y[::4], 1 - y[::4]), 4)
    b = np.repeat(np.where(rng.random(60) < 0.8, y[::4], 1 - y[::4]), 4)
    g = np.repeat(np.arange(60), 4)
    w_img = np.diff(paired_bootstrap_diff(y, a, b, 2, n_boot=400, seed=0)["ci"])[0]
    w_grp = np.diff(paired_bootstrap_diff(y, a, b, 2, groups=g, n_boot=400, seed=0)["ci"])[0]
    assert w_grp > 1.5 * w_img

def test_mel_vs_nv_score():
    p = np.zeros((2, C)); mel, nv = SKIN_CLASSES.index("mel"), SKIN_CLASSES.index("nv")
    p[0, mel], p[0, nv], p[1, mel], p[1, nv] = 0.3, 0.1, 0.1, 0.3
    assert mel_vs_nv(p) == pytest.approx([0.75, 0.25])

# --- the untargeted control tops up what the near-copy rule drops, or says why it cannot ---
def copying_backend(train_x, p_copy):
    "tiny_backend whose class-conditional samples are exact training images with probability p_copy."
    b = tiny_backend()
    def sample(y, seed):
        g = torch.Generator().manual_seed(seed)
        x = (120 + 60 * torch.randn(len(y), 3, S, S, generator=g)).clamp(0, 255).round().to(torch.uint8)
        copy = torch.rand(len(y), generator=g) < p_copy
        x[copy] = train_x[torch.randint(0, len(train_x), (int(copy.sum()),), generator=g)]
        return x
    b.sample = sample
    return b

def test_untargeted_control_matches_the_class_counts_despite_near_copies(split_table, tmp_path):
    train_x = loop_data(split_table)["train"].x
    cfg, rounds, controls = run_all(split_table, tmp_path, copying_backend(train_x, 0.6))
    assert (controls["added"] == controls["added"].iloc[0]).all() and controls["added"].iloc[0] > 0
    assert (controls[list(SKIN_CLASSES)].nunique() == 1).all()
    added = pd.read_csv(tmp_path/"seed0"/"arm_untargeted"/"added.csv") if (tmp_path/"seed0"/"arm_untargeted"/"added.csv").is_file() else None
    assert added is None or len(added) == controls["added"].iloc[0]

def test_untargeted_control_refuses_a_generator_that_only_copies(split_table, tmp_path):
    train_x = loop_data(split_table)["train"].x
    data = loop_data(split_table); data.pop("test")
    cfg = LoopConfig(**CFG)
    run_loop(cfg, data, split_table, tiny_backend(), tmp_path, 0, gen_batch=8, log=lambda s: None)
    with pytest.raises(SkindiffError, match="near-copy rule"):
        run_controls(cfg, data, split_table, copying_backend(train_x, 1.0), tmp_path, 0, log=lambda s: None)

def test_a_control_folder_with_other_counts_is_refused(split_table, tmp_path):
    cfg, rounds, controls = run_all(split_table, tmp_path, tiny_backend())
    data = loop_data(split_table); data.pop("test")
    r = next(r for r in range(cfg.rounds) if len(pd.read_csv(tmp_path/"seed0"/f"round{r}"/"kept.csv")))
    kept = tmp_path/"seed0"/f"round{r}"/"kept"
    k = pd.read_csv(kept.with_suffix(".csv"), keep_default_na=False)
    with np.load(kept.with_suffix(".npz")) as z: imgs = z["images"]
    atomic_savez(kept.with_suffix(".npz"), images=imgs[1:])                         # the loop now claims one image fewer
    k.iloc[1:].to_csv(kept.with_suffix(".csv"), index=False)
    with pytest.raises(ConfigError, match="remove .* to rebuild this control"):
        run_controls(cfg, data, split_table, tiny_backend(), tmp_path, 0, log=lambda s: None)
