"""Sampling time per image against NFE, and peak memory, for the mnist-preset U-Net with skindiff's samplers.

For each sampler and NFE it draws `--n` images in batches of `--batch` from the same x_T and reports seconds per
image, with the network in float32 and (with --bf16) under bfloat16 autocast. The per-step overhead of the sampler
itself (everything but the network) is measured with a zero ε-function. Not a test: run it by hand, e.g.

    python benchmarks/bench_sampling.py --device cpu --n 64 --batch 64 --nfes 10 20 50 100
"""
from __future__ import annotations
import argparse, time

from _common import peak_mib

import torch

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=64, help="images per measurement")
    ap.add_argument("--batch", type=int, default=64, help="images per sampler call")
    ap.add_argument("--nfes", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time bfloat16 autocast inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from skindiff.unet import UNet, unet_preset, count_parameters
    from skindiff.schedules import get_schedule
    from skindiff.samplers import sample, eps_fn_from_model

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = UNet(unet_preset("mnist")).to(dev).eval()
    if dev.type == "cpu": model = model.to(memory_format=torch.channels_last)
    schedule = get_schedule("linear", T=1000)
    shape = (1, 32, 32)
    print(f"device {dev}, mnist U-Net {count_parameters(model):,} params, {args.n} images in batches of {args.batch}, {args.threads} threads")
    if dev.type == "cpu":
        from skindiff.core import cpu_bf16_native
        from skindiff.samplers import resolve_precision
        print(f"CPU bfloat16 units (amx_bf16 / avx512_bf16): {'yes' if cpu_bf16_native() else 'no'}; "
              f"precision='auto' samples in {resolve_precision('auto', dev)} here")

    def run(eps_fn, name, nfe, autocast=False):
        g = torch.Generator(device=dev).manual_seed(0)
        if dev.type == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, args.n, args.batch):
                b = min(args.batch, args.n - i)
                sample(name, eps_fn, schedule, (b, *shape), nfe, generator=g, progress=False)
        if dev.type == "cuda": torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.n

    eps_net = eps_fn_from_model(model, schedule=schedule)
    zero = lambda x, t: torch.zeros_like(x)
    run(eps_net, "ddim", 2)                                  # warm-up
    print(f"{'sampler':8} {'NFE':>5} {'s/image fp32':>13} {'s/image bf16':>13} {'sampler-only s/image':>21}")
    for name in ("ddim", "ddpm"):
        for nfe in args.nfes:
            fp32 = run(eps_net, name, nfe)
            bf16 = run(eps_net, name, nfe, autocast=True) if args.bf16 else float("nan")
            overhead = run(zero, name, nfe)
            print(f"{name:8} {nfe:5d} {fp32:13.4f} {bf16:13.4f} {overhead:21.5f}", flush=True)
    peak, peak_kind = peak_mib(dev.type == "cuda")
    print(f"peak memory {peak:.1f} MiB ({peak_kind})")

if __name__ == "__main__": main()
