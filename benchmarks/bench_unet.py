"""Training throughput and peak memory of skindiff's mnist-preset U-Net vs diffusers' `UNet2DModel`.

Both models get the same input (batch × 1 × H × W), the same AdamW step and a similar parameter count;
each is measured in its own subprocess so that peak memory (max RSS on CPU, `max_memory_allocated` on CUDA)
belongs to that model alone. Not a test: run it by hand, e.g.

    python benchmarks/bench_unet.py --device cpu --batch 128 --iters 5
    python benchmarks/bench_unet.py --shape cpu --batch 64 --iters 10   # the cpu profile's MNIST U-Net (chapter 08)

Shapes: `preset` is the mnist preset (32/64/64 channels at 32 px, attention at 8 px); `cpu` is the MNIST DDPM of the
study's cpu profile (`MnistDDPMConfig()`: 16/32/96 channels at 28 px, attention at 7 px).
"""
from __future__ import annotations
import argparse, json, statistics, time

from _common import peak_mib, run_worker

MODELS = ("skindiff", "diffusers")
CHANNELS, T = 1, 1000
WARMUP_ITERS = 2
SHAPES = ("preset", "cpu")


def image_size(shape: str) -> int: return 32 if shape == "preset" else 28


def build(name: str, shape: str = "preset"):
    "The model `name` at `shape` (module docstring); the diffusers model mirrors ours level by level."
    if shape == "preset":
        widths, size = (32, 64, 64), 32
        ours = lambda: __import__("skindiff.unet", fromlist=["unet_preset"]).unet_preset("mnist")
    else:
        from skindiff.mnist_ddpm import MnistDDPMConfig
        cfg = MnistDDPMConfig()
        widths, size = tuple(cfg.base_channels * m for m in cfg.channel_mults), cfg.image_size
        ours = cfg.unet_config
    if name == "skindiff":
        from skindiff.unet import UNet
        return UNet(ours()), lambda m, x, t: m(x, t)
    from diffusers import UNet2DModel
    m = UNet2DModel(sample_size=size, in_channels=CHANNELS, out_channels=CHANNELS, layers_per_block=1,
                    block_out_channels=widths, norm_num_groups=8, attention_head_dim=widths[-1] // 4,
                    resnet_time_scale_shift="scale_shift",
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    return m, lambda m, x, t: m(x, t).sample


def measure(name: str, device: str, batch: int, iters: int, threads: int, channels_last: bool, shape: str = "preset") -> dict:
    "Median seconds of a forward + backward + AdamW step after warm-up, and peak memory."
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, fwd = build(name, shape)
    model = model.to(device)
    if channels_last: model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    x = torch.randn(batch, CHANNELS, image_size(shape), image_size(shape), device=device)
    t = torch.randint(0, T, (batch,), device=device)
    eps = torch.randn_like(x)
    if device.startswith("cuda"): torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(WARMUP_ITERS + iters):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(fwd(model, x, t), eps)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if device.startswith("cuda"): torch.cuda.synchronize()
        if i >= WARMUP_ITERS: times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak, peak_kind = peak_mib(device.startswith("cuda"))
    return dict(model=name, params=sum(p.numel() for p in model.parameters()), step_s=step_s,
                images_per_s=batch / step_s, peak_mib=peak, peak_kind=peak_kind, times=times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per model (after 2 warm-up ones)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the course targets 2 CPU cores)")
    ap.add_argument("--no-channels-last", action="store_true", help="keep NCHW (channels-last is used on CPU by default)")
    ap.add_argument("--shape", choices=SHAPES, default="preset", help="preset: the mnist preset; cpu: the cpu profile's MNIST U-Net")
    ap.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    cl = a.device == "cpu" and not a.no_channels_last
    if a.worker:
        print(json.dumps(measure(a.worker, a.device, a.batch, a.iters, a.threads, cl, a.shape))); return
    # The two models run one after the other: on a shared machine, check the load (uptime) and repeat.
    res = {}
    for name in MODELS:
        res[name] = run_worker(__file__, ["--worker", name, "--device", a.device, "--batch", str(a.batch), "--iters", str(a.iters),
                                          "--threads", str(a.threads), "--shape", a.shape] + (["--no-channels-last"] if a.no_channels_last else []), name)
    hw = image_size(a.shape)
    print(f"shape {a.shape}, device {a.device}, batch {a.batch}×{CHANNELS}×{hw}×{hw}, {a.iters} timed iterations "
          f"after {WARMUP_ITERS} warm-up, {a.threads} threads, channels_last={cl}")
    for r in res.values():
        print(f"{r['model']:10s} params {r['params']:>10,d}  step {r['step_s']*1e3:8.1f} ms median, {min(r['times'])*1e3:8.1f} min  "
              f"{r['images_per_s']:8.1f} images/s  peak {r['peak_mib']:8.1f} MiB ({r['peak_kind']})")
    s, d = res["skindiff"], res["diffusers"]
    print(f"ratio skindiff/diffusers: throughput {s['images_per_s']/d['images_per_s']:.2f}×, "
          f"peak memory {s['peak_mib']/d['peak_mib']:.2f}×, params {s['params']/d['params']:.2f}×")


if __name__ == "__main__":
    main()
