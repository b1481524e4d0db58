"""The training loop: SIGKILL resume equality, corrupt checkpoints, NaN loss, settings mismatch."""
import os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from torch import nn

from skindiff.train import (TrainConfig, train, list_checkpoints, load_checkpoint, load_weights,
                            CheckpointError, NonFiniteLossError, checkpoint_path)
from skindiff.core import ConfigError

WORKER = Path(__file__).with_name("_train_worker.py")
STEPS = 40

def _run(ckpt_dir, out, steps=STEPS, sleep=0.0, **kw):
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt_dir), str(out), str(steps), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_sigkill_resume_is_bitwise_identical(tmp_path):
    # the uninterrupted reference run
    ref = _run("-", tmp_path/"ref.pt"); assert ref.wait(120) == 0, ref.stderr.read()
    # the same run, killed with a real SIGKILL after about half of the steps
    ck = tmp_path/"ckpts"
    p = _run(ck, tmp_path/"never.pt", sleep=0.05)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = [c for c in list_checkpoints(ck)]
        if done and int(done[-1].stem.split("_")[1]) >= STEPS // 2: break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL); p.wait(30)
    assert p.returncode == -signal.SIGKILL
    killed_at = int(list_checkpoints(ck)[-1].stem.split("_")[1])
    assert 0 < killed_at < STEPS, "the kill must land mid-run"
    assert not (tmp_path/"never.pt").exists()
    # resume to the end in a new process
    r = _run(ck, tmp_path/"resumed.pt"); out, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    assert f"resumed_from {killed_at}" in out
    a, b = torch.load(tmp_path/"ref.pt", weights_only=True), torch.load(tmp_path/"resumed.pt", weights_only=True)
    assert _same(a["model"], b["model"]), "model weights differ after resume"
    assert _same(a["ema"], b["ema"]), "EMA weights differ after resume"
    assert torch.equal(a["losses"], b["losses"])

def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 1)

def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(64, 4, generator=g), torch.randn(64, generator=g))

def _mse(model, batch, gen):
    x, y = batch
    return nn.functional.mse_loss(model(x).squeeze(1), y)

def test_truncated_checkpoint_is_named_and_kept(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=16, ckpt_every=2)
    train(_tiny(), _mse, _data(), cfg, ckpt_dir=tmp_path, progress=False)
    last = list_checkpoints(tmp_path)[-1]
    data = last.read_bytes(); last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(last.name)) as e:
        train(_tiny(), _mse, _data(), TrainConfig(steps=8, batch_size=16, ckpt_every=2), ckpt_dir=tmp_path, progress=False)
    assert "truncated or corrupt" in str(e.value)
    assert last.read_bytes() == data[: len(data) // 2], "the corrupt checkpoint must not be overwritten"
    assert list_checkpoints(tmp_path)[-1] == last

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = []
    def nan_after_3(model, batch, gen):
        calls.append(1)
        loss = _mse(model, batch, gen)
        return loss * float("nan") if len(calls) > 3 else loss
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3") as e:
        train(_tiny(), nan_after_3, _data(), TrainConfig(steps=10, batch_size=16, ckpt_every=2), ckpt_dir=tmp_path, progress=False)
    good = checkpoint_path(tmp_path, 2)
    assert str(good) in str(e.value)
    assert list_checkpoints(tmp_path) == [good]
    assert load_checkpoint(good)["step"] == 2

def test_resume_with_other_settings_is_refused(tmp_path):
    train(_tiny(), _mse, _data(), TrainConfig(steps=2, batch_size=16, lr=1e-3), ckpt_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"lr: 0.001 there, 0.01 now"):
        train(_tiny(), _mse, _data(), TrainConfig(steps=4, batch_size=16, lr=1e-2), ckpt_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"model: '<absent>' in the checkpoint, 'other' here"):
        train(_tiny(), _mse, _data(), TrainConfig(steps=4, batch_size=16, lr=1e-3), ckpt_dir=tmp_path, progress=False, meta=dict(model="other"))

def test_load_weights_checks_model_and_meta(tmp_path):
    res = train(_tiny(), _mse, _data(), TrainConfig(steps=2, batch_size=16), ckpt_dir=tmp_path, progress=False,
                meta=dict(model="linear", dataset="synthetic"))
    m = load_weights(_tiny(1), res.checkpoint, meta=dict(model="linear"))
    assert torch.equal(m.weight, res.ema.weight)
    with pytest.raises(CheckpointError, match="dataset: .synthetic. in the checkpoint, .mnist. here"):
        load_weights(_tiny(), res.checkpoint, meta=dict(dataset="mnist"))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(nn.Linear(5, 1), res.checkpoint)

def test_not_a_checkpoint(tmp_path):
    p = tmp_path/"ckpt_00000001.pt"; torch.save({"hello": 1}, p)
    with pytest.raises(CheckpointError, match="not a skindiff training checkpoint"): load_checkpoint(p)

@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0), ("ema_decay", 1.0), ("lr_schedule", "linear")])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field): TrainConfig(**{field: value})
