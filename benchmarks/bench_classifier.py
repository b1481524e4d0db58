"""Training and inference throughput (images/s) and peak memory of the skin classifier (timm tf_efficientnet_lite0,
7-class head; `--archs` adds Lite1 / Lite2) at several resolutions.

Training = one step of `skindiff.train`'s work for a classifier: augmentation (dihedral view + colour jitter),
normalisation, forward, weighted label-smoothed cross-entropy, backward, AdamW. Inference = `predict_proba`
(softmax, no TTA; TTA costs 8×). Each resolution runs in its own subprocess, so peak memory (max RSS on CPU,
`max_memory_allocated` on CUDA) belongs to that resolution alone. Not a test: run it by hand, e.g.

    nice -n 19 python benchmarks/bench_classifier.py --device cpu --sizes 64 96 128 224 --batch 32 --iters 4

`--freeze 0 2` also measures the model with its stem and first 2 stages frozen (`classifier.freeze_stages`) and prints
each training speed as a ratio to the unfrozen model at the same size, from the same run. `--cached` adds, for each
frozen count, training above the frozen trunk on cached features (`train_classifier(cache_trunk=n)`, eq 15.6): the
step runs only the head on one cached view per image; the cache itself is built once, at the `cache img/s` rate
(images × 8 views per second), which the table also prints. `--archs tf_efficientnet_lite0 tf_efficientnet_lite2`
measures both networks in one run and prints each row's training speed also as a ratio to the first arch's.
On a CPU the model uses the compiled depthwise weight gradient, as `train_classifier` does (eq 15.9, chapter 15);
`--no-dw-kernel` measures PyTorch's own (`benchmarks/bench_depthwise.py` compares the two in one run). `--cpu-bf16`
measures every training row twice, in float32 and under CPU bfloat16 autocast (`train_classifier(cpu_bf16=True)`: every
depthwise layer through the compiled float32 kernel), and prints the bfloat16 rows' speed as a ratio to float32 (× fp32).
"""
from __future__ import annotations
import argparse, json, statistics, time

from _common import peak_mib, run_worker

NUM_CLASSES = 7
WARMUP_ITERS = 1


def measure(size: int, device: str, batch: int, iters: int, threads: int, freeze: int = 0, cached: bool = False,
            arch: str = "tf_efficientnet_lite0", dw_kernel: bool = True, bf16: bool = False) -> dict:
    "Median seconds per training step and per inference batch at `size` px, and peak memory."
    import torch
    from skindiff import classifier as clf
    from skindiff.train import EMA
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = clf.freeze_stages(clf.create_classifier(NUM_CLASSES, arch), freeze).to(device).to(memory_format=torch.channels_last)
    if dw_kernel and device == "cpu":                                        # what train_classifier does on a CPU
        clf.use_depthwise_kernel(model, clf.DEPTHWISE_KERNEL_SIZES if bf16 else clf.SLOW_DEPTHWISE_SIZES)
    mean, std = clf.normalisation(arch)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    y = torch.arange(batch, device=device) % NUM_CLASSES
    loss_fn = clf.classifier_loss_fn(mean, std, torch.ones(NUM_CLASSES), 0.1, clf.Augment())
    data, cache_s = (x, y), None
    cuda = device.startswith("cuda")
    if cached:
        clf.adapt_trunk_batchnorm(model, x, mean, std, freeze, device=device)
        t0 = time.perf_counter()
        feats = clf.trunk_features(model, x, mean, std, freeze, clf.Augment(), device=device)
        cache_s = time.perf_counter() - t0
        data, loss_fn = (feats.to(device), y), clf.cached_trunk_loss_fn(freeze, torch.ones(NUM_CLASSES), 0.1)
    if bf16 and not cuda: loss_fn = clf.cpu_bf16_loss(loss_fn)              # train_classifier(cpu_bf16=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ema = EMA(model, 0.999)
    if cuda: torch.cuda.reset_peak_memory_stats()

    def timed(fn):
        ts = []
        for i in range(WARMUP_ITERS + iters):
            t0 = time.perf_counter(); fn()
            if cuda: torch.cuda.synchronize()
            if i >= WARMUP_ITERS: ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    def train_step():
        model.train()
        g = torch.Generator(device=device).manual_seed(0)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model, data, g)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); ema.update(model, 100)

    train_s = timed(train_step)
    infer_s = timed(lambda: clf.predict_proba(model, x, mean, std, batch_size=batch, device=device))
    peak, peak_kind = peak_mib(cuda)
    return dict(arch=arch, size=size, freeze=freeze, cached=cached, bf16=bf16, cache_images_per_s=None if cache_s is None else batch*clf.DIHEDRAL_VIEWS/cache_s, batch=batch, device=device, threads=threads, train_step_s=train_s, train_images_per_s=batch / train_s,
                infer_batch_s=infer_s, infer_images_per_s=batch / infer_s, peak_mib=peak,
                peak_kind=peak_kind)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=4, help="timed iterations after warm-up (median is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--freeze", type=int, nargs="+", default=[0], help="frozen early stages to measure (0 = none)")
    ap.add_argument("--archs", nargs="+", default=["tf_efficientnet_lite0"], help="EfficientNet-Lites with offline weights")
    ap.add_argument("--cached", action="store_true", help="also measure training on cached trunk features for each freeze > 0")
    ap.add_argument("--no-dw-kernel", action="store_true", help="PyTorch's depthwise weight gradient instead of the compiled one")
    ap.add_argument("--cpu-bf16", action="store_true", help="also measure each training row under CPU bfloat16 autocast (cpu_bf16)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--_one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_cached", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_bf16", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one is not None:
        print(json.dumps(measure(a._one, a.device, a.batch, a.iters, a.threads, a.freeze[0], a._cached, a.archs[0], not a.no_dw_kernel, a._bf16))); return
    from skindiff.classifier import LITE_WEIGHTS
    bad = [x for x in a.archs if x not in LITE_WEIGHTS]
    if bad: ap.error(f"--archs {bad}: expected names from {sorted(LITE_WEIGHTS)}")
    if a.cpu_bf16 and a.device != "cpu": ap.error(f"--cpu-bf16 measures CPU autocast; --device {a.device} trains under CUDA autocast already")
    rows = []
    for arch in a.archs:
        for s in a.sizes:
            for f in a.freeze:
                for c in (False, True) if a.cached and f > 0 else (False,):
                    for h in (False, True) if a.cpu_bf16 else (False,):
                        rows.append(run_worker(__file__, ["--_one", str(s), "--device", a.device, "--batch", str(a.batch), "--iters", str(a.iters),
                                                          "--threads", str(a.threads), "--freeze", str(f), "--archs", arch] + (["--_cached"] if c else [])
                                                         + (["--no-dw-kernel"] if a.no_dw_kernel else []) + (["--_bf16"] if h else []),
                                               f"{arch}, size {s}, freeze {f}{', cached' if c else ''}{', bf16' if h else ''}"))
    print(f"{NUM_CLASSES} classes, batch {a.batch}, device {a.device}, {a.threads} threads"
          + (f", {'PyTorch' if a.no_dw_kernel else 'compiled'} depthwise weight gradient" if a.device == "cpu" else ""))
    print(f"{'arch':>22} {'px':>5} {'freeze':>6} {'cached':>6} {'bf16':>5} {'train img/s':>12} {'× unfrozen':>10} {'× ' + a.archs[0][-5:]:>10} "
          f"{'× fp32':>7} {'cache img/s':>12} {'infer img/s':>12} {'peak MiB':>10}")
    key = lambda r: (r["size"], r["freeze"], bool(r.get("cached")), r["bf16"])
    base = {(r["arch"], r["size"], r["bf16"]): r["train_images_per_s"] for r in rows if r["freeze"] == 0}
    first = {key(r): r["train_images_per_s"] for r in rows if r["arch"] == a.archs[0]}
    fp32 = {(r["arch"], *key(r)[:3]): r["train_images_per_s"] for r in rows if not r["bf16"]}
    for r in rows:
        b = base.get((r["arch"], r["size"], r["bf16"]))
        ratio = f"{r['train_images_per_s'] / b:10.2f}" if b else f"{'–':>10}"
        vs = f"{r['train_images_per_s'] / first[key(r)]:10.2f}" if key(r) in first else f"{'–':>10}"
        cache = f"{r['cache_images_per_s']:12.1f}" if r.get("cache_images_per_s") else f"{'–':>12}"
        f32 = fp32.get((r["arch"], *key(r)[:3]))
        vs32 = f"{r['train_images_per_s'] / f32:7.2f}" if r["bf16"] and f32 else f"{'–':>7}"
        print(f"{r['arch']:>22} {r['size']:5d} {r['freeze']:6d} {'yes' if r.get('cached') else 'no':>6} {'yes' if r['bf16'] else 'no':>5} "
              f"{r['train_images_per_s']:12.1f} {ratio} {vs} {vs32} {cache} {r['infer_images_per_s']:12.1f} {r['peak_mib']:10.0f}")
    if a.json:
        from skindiff.core import atomic_write_json
        atomic_write_json(a.json, rows)


if __name__ == "__main__":
    main()
