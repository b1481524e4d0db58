"""The study runner and the `skindiff` command: skipping, resuming after SIGKILL, failures, bad input.
These use small stand-in notebooks with the chapters' names (the real chapters run in CI's study step)."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest

from skindiff import study
from skindiff.cli import main, EXIT_USAGE, EXIT_FAILED

CHAPTER_SRC = '''
import time, matplotlib.pyplot as plt
from skindiff.study import ChapterRun
run = ChapterRun(NAME, out_dir=out_dir, profile=profile, seed=seed, device=device)
time.sleep(sleep_s)
if fail: raise RuntimeError("boom in " + NAME)
run.record("twice_seed", 2 * seed, unit="")
import tqdm.std, skindiff.core
print("text progress bars:", skindiff.core.tqdm is tqdm.std.tqdm)
fig, ax = plt.subplots(); ax.plot([0, 1]); ax.set_xlabel("x"); ax.set_ylabel("y")
run.save_figure(fig, NAME + "_line")
'''

# the runner is exercised on the first three chapters (stand-ins), to keep kernel start-ups few
NAMES = [c.name for c in study.CHAPTERS[:3]]
ONLY = [a for n in NAMES for a in ("--only", n)]

def make_nbs(d: Path, sleep_s=0.0, fail=()):
    d.mkdir(parents=True, exist_ok=True)
    for c in study.CHAPTERS:
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(f'profile = "ci"\nout_dir = None\ndata_root = None\ndevice = None\nseed = 0\n'
                                           f'sleep_s = {sleep_s}\nfail = {c.name in fail}')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(f"NAME = {c.name!r}" + CHAPTER_SRC)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, d/f"{c.name}.ipynb")
    return d

SKINDIFF = str(Path(sys.executable).parent/"skindiff")       # the console script installed beside this Python

def cli(*args, **kw):
    return subprocess.run([SKINDIFF, *args], capture_output=True, text=True, timeout=600, **kw)

def test_unknown_profile_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path/"run"
    assert main(["study", "--profile", "laptop", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["skindiff: error: --profile 'laptop': expected one of ci, cpu, gpu"]
    assert not out.exists()

def test_missing_data_root(tmp_path, capsys):
    out = tmp_path/"run"
    assert main(["study", "--profile", "ci", "--out", str(out), "--data", str(tmp_path/"nowhere")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err
    assert not out.exists()

def test_out_dir_not_writable(tmp_path, capsys):
    f = tmp_path/"a_file"; f.write_text("x")
    assert main(["study", "--profile", "ci", "--out", str(f/"run")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err
    assert main(["study", "--profile", "ci", "--out", str(f)]) == EXIT_USAGE
    assert "not a directory" in capsys.readouterr().err

def test_unknown_chapter(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path/"r"), "--only", "99_nope"]) == EXIT_USAGE
    assert "--only '99_nope'" in capsys.readouterr().err

def test_run_skip_and_rerun_on_new_parameters(tmp_path):
    nbs = make_nbs(tmp_path/"nbs")
    out = tmp_path/"run"
    r = cli("study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), "--seed", "3", *ONLY)
    assert r.returncode == 0, r.stderr
    assert "Kernel is running over TCP" not in r.stderr        # ipykernel 7's start-up warning, once per chapter, is kept out
    names = NAMES
    for n in names:
        assert (out/"notebooks"/f"{n}.ipynb").exists()
        assert (out/"figures"/f"{n}_line.png").exists() and (out/"figures"/f"{n}_line.pdf").exists()
    results = json.loads((out/"results.json").read_text())
    assert [r_["chapter"] for r_ in results] == names
    for rec in results:
        assert rec["value"] == 6 and rec["seed"] == 3 and rec["profile"] == "ci" and rec["device"] == "cpu"
        assert {"git_commit", "wall_s"} <= rec.keys()
    assert (out/"README.md").read_text().count("| done |") == len(names)
    # the kernels ran with text progress bars: a saved notebook would keep only a widget's first frame
    assert "text progress bars: True" in (out/"notebooks"/f"{names[0]}.ipynb").read_text()
    mtimes = {n: (out/"notebooks"/f"{n}.ipynb").stat().st_mtime_ns for n in names}
    r = cli("study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), "--seed", "3", *ONLY)
    assert r.returncode == 0 and r.stdout.count("[skip]") == len(names), r.stdout
    assert mtimes == {n: (out/"notebooks"/f"{n}.ipynb").stat().st_mtime_ns for n in names}
    r = cli("study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), "--seed", "4", *ONLY)
    assert r.returncode == 0 and r.stdout.count("[done]") == len(names), r.stdout
    assert {rec["value"] for rec in json.loads((out/"results.json").read_text())} == {8}

def test_sigkill_mid_study_then_rerun_skips_finished_chapters(tmp_path):
    nbs = make_nbs(tmp_path/"nbs", sleep_s=3.0)
    out = tmp_path/"run"
    first = study.CHAPTERS[0].name
    p = subprocess.Popen([SKINDIFF, "study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), *ONLY],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    state = out/".state"/f"{first}.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.exists() and json.loads(state.read_text()).get("status") == "done": break
        time.sleep(0.1)
    time.sleep(1.0)                                   # the second chapter is now running
    os.killpg(p.pid, signal.SIGKILL); p.wait(30)
    done_before = {n.stem for n in (out/".state").glob("*.json") if json.loads(n.read_text())["status"] == "done"}
    assert first in done_before and len(done_before) < len(NAMES), "the kill must land mid-run"
    mtime = (out/"notebooks"/f"{first}.ipynb").stat().st_mtime_ns
    r = cli("study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), *ONLY)
    assert r.returncode == 0, r.stderr
    assert f"[skip] {first}" in r.stdout
    assert (out/"notebooks"/f"{first}.ipynb").stat().st_mtime_ns == mtime
    assert not list((out/"notebooks").glob(".*running*")), "no half-written notebook is left"
    assert len(json.loads((out/"results.json").read_text())) == len(NAMES)

def test_failing_chapter_exits_nonzero_and_keeps_its_notebook(tmp_path):
    bad = study.CHAPTERS[1].name
    nbs = make_nbs(tmp_path/"nbs", fail=(bad,))
    out = tmp_path/"run"
    r = cli("study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), *ONLY)
    assert r.returncode == EXIT_FAILED
    assert f"chapter {bad} failed" in r.stderr and "boom in" in r.stderr
    nb = nbformat.read(out/"notebooks"/f"{bad}.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert json.loads((out/".state"/f"{bad}.json").read_text())["status"] == "failed"
    assert "| failed |" in (out/"README.md").read_text()


def test_profile_precisions_are_known_and_cpu_never_forces_bfloat16():
    "Every sampling precision of a profile is one eps_fn_from_model knows; the cpu profile leaves bfloat16 to 'auto'."
    from skindiff.samplers import PRECISIONS
    seen = []
    for prof, chapters in study.PROFILES.items():
        for ch, params in chapters.items():
            for k, v in params.items():
                if k.endswith("_precision"):
                    seen.append((prof, ch, k, v))
                    assert v in PRECISIONS, (prof, ch, k, v)
                    # bfloat16 is emulated on CPUs without bfloat16 units (7.2x slower there): 'auto' picks it where native
                    if prof == "cpu": assert v != "bfloat16", (ch, k)
    assert {c for p, c, _, v in seen if p == "cpu" and v == "auto"} == {"11_cifar10_ddpm", "18_lesion_diffusion", "19_adversarial"}


def test_every_profile_parameter_is_shape_or_budget():
    "A smoke run must know, for every parameter a profile sets, whether it is shape (kept) or budget (ci default)."
    assert study.SHAPE_KEYS.isdisjoint(study.BUDGET_KEYS)
    for prof, chapters in study.PROFILES.items():
        for ch, params in chapters.items():
            assert set(params) <= study.SHAPE_KEYS | study.BUDGET_KEYS, (prof, ch, set(params) - study.SHAPE_KEYS - study.BUDGET_KEYS)
    with pytest.raises(study.ConfigError, match="'bogus_steps'"):
        study.smoke_parameters({"train_steps": 5, "bogus_steps": 1})


def test_smoke_plan_keeps_the_gpu_shape_and_drops_its_budget(tmp_path):
    from skindiff.data import DataNotFoundError, find_data_root
    try: find_data_root(need="ham10000")
    except DataNotFoundError: pytest.skip("shared data ham10000 not available")
    chapters = ["16_skin_classifier", "18_lesion_diffusion", "19_adversarial"]
    plan = study.plan_study("gpu", tmp_path/"run", only=chapters, smoke=True)
    assert plan["profile"] == "gpu-smoke" and not (tmp_path/"run").exists()
    for name, params in plan["chapters"]:
        gpu = study.PROFILES["gpu"][name]
        assert params["profile"] == "gpu-smoke"
        kept = {k for k in gpu if k in params}
        assert kept == set(gpu) & study.SHAPE_KEYS and kept, name
        assert all(params[k] == gpu[k] for k in kept)
        assert not set(params) & study.BUDGET_KEYS, name
    p = dict(plan["chapters"])
    assert p["18_lesion_diffusion"]["channel_mults"] == [1, 2, 3, 4] and p["16_skin_classifier"]["image_size"] == 150
    # chapter 19 reuses chapter 18's DDPM, so the two must still agree on its recipe (shape fields kept, budget dropped)
    assert {k: p["19_adversarial"].get(k) for k in study.LESION_DDPM_RECIPE} == {k: p["18_lesion_diffusion"].get(k) for k in study.LESION_DDPM_RECIPE}
    over = dict(study.plan_study("gpu", tmp_path/"run", only=chapters, smoke=True, overrides={"18_lesion_diffusion": {"nfe": 4}})["chapters"])
    assert over["18_lesion_diffusion"] == p["18_lesion_diffusion"] | {"nfe": 4} and over["19_adversarial"] == p["19_adversarial"]
    with pytest.raises(study.ConfigError, match="overrides for \\['13_sde'\\]"):
        study.plan_study("gpu", tmp_path/"run", only=chapters, overrides={"13_sde": {"n_bpd": 1}})
    full = dict(study.plan_study("gpu", tmp_path/"run", only=chapters)["chapters"])
    assert full["18_lesion_diffusion"]["train_steps"] == 30000 and full["18_lesion_diffusion"]["profile"] == "gpu"


def test_smoke_cli_records_the_smoke_profile(tmp_path):
    "`--smoke` reaches the chapters: their records and study.json say `gpu-smoke`, and no budget key is injected."
    nbs = make_nbs(tmp_path/"nbs")
    out = tmp_path/"run"
    third = NAMES[2]                                        # 03_train: the gpu profile sets only its budget (steps)
    assert set(study.PROFILES["gpu"][third]) <= study.BUDGET_KEYS and study.PROFILES["gpu"][third]
    r = cli("study", "--profile", "gpu", "--smoke", "--out", str(out), "--nbs", str(nbs), "--only", third)
    assert r.returncode == 0, r.stderr
    assert json.loads((out/"study.json").read_text())["profile"] == "gpu-smoke"
    assert [rec["profile"] for rec in json.loads((out/"results.json").read_text())] == ["gpu-smoke"]
    nb = nbformat.read(out/"notebooks"/f"{third}.ipynb", as_version=4)
    injected = [c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "gpu-smoke" in injected[0]
    assert not any(f"{k} = " in injected[0] for k in study.PROFILES["gpu"][third])


def test_lesion_shape_smoke_script_sets_only_known_parameters():
    "scripts/smoke_lesion_shapes.py: its overrides are parameters of chapters 18 and 19, and they agree on chapter 18's recipe."
    import importlib.util
    from test_notebooks import parameter_names
    spec = importlib.util.spec_from_file_location("smoke_lesion_shapes", Path(__file__).parents[1]/"scripts"/"smoke_lesion_shapes.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert mod.OVERRIDES == {"18_lesion_diffusion": mod.FEWER_18, "19_adversarial": mod.FEWER_19}
    for ch, fewer in mod.OVERRIDES.items():
        nb = nbformat.read(study.notebooks_dir()/f"{ch}.ipynb", as_version=4)
        names = parameter_names(next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source)
        assert set(fewer) <= names, (ch, set(fewer) - names)
    shared = set(mod.FEWER_18) & set(study.LESION_DDPM_RECIPE)
    assert shared and all(mod.FEWER_19[k] == mod.FEWER_18[k] for k in shared)
    assert set(mod.FEWER_19) & set(study.LESION_DDPM_RECIPE) == shared


def test_out_folder_of_another_profile_is_refused(tmp_path, capsys):
    "A run folder holds one profile: a smoke run (or another profile) into it is refused before anything is written."
    nbs = make_nbs(tmp_path/"nbs")
    out, first = tmp_path/"run", NAMES[0]
    assert main(["study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), "--only", first]) == 0
    before = (out/"study.json").read_text()
    capsys.readouterr()
    assert main(["study", "--profile", "ci", "--smoke", "--out", str(out), "--nbs", str(nbs), "--only", first]) == EXIT_USAGE
    assert "holds a run of profile 'ci', not 'ci-smoke'" in capsys.readouterr().err
    assert (out/"study.json").read_text() == before
    assert main(["study", "--profile", "ci", "--out", str(out), "--nbs", str(nbs), "--only", first]) == 0

def test_each_chapter_reads_its_data_from_where_it_was_found(tmp_path, monkeypatch, capsys):
    "MNIST and CIFAR-10 in one folder, the lesions in another (e.g. `skindiff download ham10000` into the cache)."
    import skindiff.data
    a, b = tmp_path/"a", tmp_path/"b"
    for need in ("MNIST/raw", "cifar10/cifar10-jpg.tar.gz"): (a/need).parent.mkdir(parents=True, exist_ok=True); (a/need).mkdir()
    for need in ("ham10000", "ph2"): (b/need).mkdir(parents=True)
    monkeypatch.delenv("SKINDIFF_DATA", raising=False)
    monkeypatch.setattr(skindiff.data, "_default_data_candidates", lambda: [(a, "a"), (b, "b")])
    nbs = make_nbs(tmp_path/"nbs")
    plan = dict(study.plan_study("ci", tmp_path/"run", only=["02_forward_process", "14_skin_data", "16_skin_classifier"], nbs=nbs)["chapters"])
    assert plan["02_forward_process"]["data_root"] == str(a)
    assert plan["14_skin_data"]["data_root"] == plan["16_skin_classifier"]["data_root"] == str(b)
    # chapter 15 reads CIFAR-10 and HAM10000 from one folder: refused before anything runs, naming both places
    assert main(["study", "--out", str(tmp_path/"run2"), "--only", "15_classifier", "--nbs", str(nbs)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{a} (cifar10/cifar10-jpg.tar.gz)" in err and f"{b} (ham10000)" in err
    assert not (tmp_path/"run2").exists()

def test_missing_lesion_data_points_to_its_own_download(tmp_path, monkeypatch):
    from skindiff.data import DataNotFoundError, find_data_root
    monkeypatch.delenv("SKINDIFF_DATA", raising=False)
    with pytest.raises(DataNotFoundError, match="skindiff download ham10000") as e: find_data_root(tmp_path, need="ham10000")
    assert "load_mnist" not in str(e.value)
    with pytest.raises(DataNotFoundError, match="PH2 has no download.*metadata.csv"): find_data_root(tmp_path, need="ph2")
    with pytest.raises(DataNotFoundError, match="load_mnist"): find_data_root(tmp_path, need="MNIST/raw")
