"""A tiny training run for tests/test_train.py: trains a small MLP on synthetic data with skindiff.train.
Usage: python _train_worker.py CKPT_DIR OUT_WEIGHTS STEPS [SLEEP_S]"""
import sys, time
import torch
from torch import nn
from skindiff.train import TrainConfig, train

def main():
    ckpt_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sleep_s = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(512, generator=g)
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.1), nn.GELU(), nn.Linear(32, 1))

    def loss_fn(model, batch, gen):
        if sleep_s: time.sleep(sleep_s)
        xb, yb = batch
        noise = 0.01 * torch.randn(xb.shape, generator=gen)      # uses the per-step generator
        return nn.functional.mse_loss(model(xb + noise).squeeze(1), yb)

    cfg = TrainConfig(steps=steps, batch_size=32, lr=1e-2, warmup_steps=5, lr_schedule="cosine",
                      ema_decay=0.9, ckpt_every=1, keep_ckpts=3, seed=7)
    res = train(model, loss_fn, (x, y), cfg, ckpt_dir=ckpt_dir if ckpt_dir != "-" else None, progress=False,
                meta=dict(model="mlp", dataset="synthetic"))
    torch.save(dict(model=res.model.state_dict(), ema=res.ema.state_dict(), losses=torch.tensor(res.losses, dtype=torch.float64)), out)
    print("resumed_from", res.resumed_from, flush=True)

if __name__ == "__main__": main()
