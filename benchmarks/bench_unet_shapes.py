"""Which MNIST U-Net shape buys the most DDPM training and sampling per second on this machine.

For each shape (base channels, channel multipliers, residual blocks per level; attention at the lowest
resolution, as `MnistDDPMConfig` builds it) at the native 28 px: parameters, training images/s of the real
DDPM loss step (forward + backward + AdamW, batch 64, channels-last on CPU) and sampling images/s of one
network evaluation (batch 128) in float32 and bfloat16. Ratios are against the first shape, measured in the
same run. Not a test: run it by hand on a quiet machine, e.g.

    python benchmarks/bench_unet_shapes.py --iters 10
"""
from __future__ import annotations
import argparse, statistics, time

SHAPES = {                      # name: (base_channels, channel_mults, num_res_blocks)
    "32/64/64":   (32, (1, 2, 2), 1),   # the chapter-08 recipe before this benchmark
    "16/32/96":   (16, (1, 2, 6), 1),   # light at 28 px, wide at 7 px: the cpu profile's shape
    "16/32/64":   (16, (1, 2, 4), 1),
    "16/32/64x2": (16, (1, 2, 4), 2),
    "24/48/72":   (24, (1, 2, 3), 1),
}
TRAIN_BATCH, SAMPLE_BATCH, WARMUP = 64, 128, 3


def measure(shape, iters: int, threads: int) -> dict:
    import torch
    from skindiff.ddpm import make_ddpm_loss
    from skindiff.mnist_ddpm import MnistDDPMConfig
    from skindiff.schedules import get_schedule
    from skindiff.unet import UNet
    torch.set_num_threads(threads)
    base, mults, nrb = shape
    cfg = MnistDDPMConfig(base_channels=base, channel_mults=mults, num_res_blocks=nrb)
    torch.manual_seed(0)
    model = UNet(cfg.unet_config()).to(memory_format=torch.channels_last)
    loss_fn = make_ddpm_loss(get_schedule("linear"), min_snr_gamma=cfg.min_snr_gamma)
    opt, g = torch.optim.AdamW(model.parameters(), cfg.lr), torch.Generator().manual_seed(0)
    x0 = torch.rand(TRAIN_BATCH, 1, 28, 28) * 2 - 1
    times = []
    for i in range(WARMUP + iters):
        t0 = time.perf_counter()
        loss = loss_fn(model, (x0,), g); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if i >= WARMUP: times.append(time.perf_counter() - t0)
    out = dict(params=sum(p.numel() for p in model.parameters()), train=TRAIN_BATCH / statistics.median(times))
    model.eval()
    x, t = torch.randn(SAMPLE_BATCH, 1, 28, 28), torch.randint(0, 1000, (SAMPLE_BATCH,))
    for prec in ("float32", "bfloat16"):
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bfloat16"):
            for i in range(WARMUP + iters):
                t0 = time.perf_counter(); model(x, t)
                if i >= WARMUP: times.append(time.perf_counter() - t0)
        out[prec] = SAMPLE_BATCH / statistics.median(times)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per measurement (after 3 warm-up ones)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(f"cpu, {a.threads} threads, 28 px; train: DDPM loss step, batch {TRAIN_BATCH}; sample: one forward, batch {SAMPLE_BATCH}; "
          f"median of {a.iters}")
    print(f"{'shape':12s} {'params':>9s} {'train img/s':>12s} {'fp32 fwd img/s':>15s} {'bf16 fwd img/s':>15s}   ratios vs first")
    ref = None
    for name, shape in SHAPES.items():
        r = measure(shape, a.iters, a.threads)
        ref = ref or r
        ratios = " ".join(f"{r[k] / ref[k]:.2f}×" for k in ("train", "float32", "bfloat16"))
        print(f"{name:12s} {r['params']:>9,d} {r['train']:12.0f} {r['float32']:15.0f} {r['bfloat16']:15.0f}   {ratios}", flush=True)


if __name__ == "__main__":
    main()
