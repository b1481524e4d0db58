"""Depthwise convolutions on a CPU: the forward pass, PyTorch's weight gradient and skindiff's compiled one (eq 15.9,
`classifier.DepthwiseConv2d`, chapter 15), for every trainable depthwise layer shape of an EfficientNet-Lite above a
frozen trunk; then the whole cached-trunk training step (`cached_trunk_loss_fn`, AdamW, EMA) with and without the
kernel, alternating, in one run. Times are medians; the ratios are what to read on a noisy machine. Not a test:

    python benchmarks/bench_depthwise.py --arch tf_efficientnet_lite2 --size 128 --freeze 2 --batch 64
"""
from __future__ import annotations
import argparse, copy, statistics, time


def median_ms(fn, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return 1e3*statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tf_efficientnet_lite2")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--freeze", type=int, default=2, help="stem + this many stages frozen and cached (the cpu profile's 2)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    import torch
    from torch import nn
    from skindiff import classifier as clf
    from skindiff.train import EMA
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    if clf.depthwise_extension() is None: raise SystemExit("the compiled kernel could not be built here (see the warning)")
    model = clf.freeze_stages(clf.create_classifier(7, a.arch), a.freeze).to(memory_format=torch.channels_last)
    mean, std = clf.normalisation(a.arch)
    x = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8)
    with torch.no_grad():
        h = clf.trunk_forward(model.eval(), clf.normalise(x.float()/255, mean, std).contiguous(memory_format=torch.channels_last), a.freeze)
    fast = copy.deepcopy(model)
    n_swapped = clf.use_depthwise_kernel(fast)

    # 1. every trainable depthwise layer shape, as the head sees it
    shapes, hooks = {}, []
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 and m.weight.requires_grad:
            hooks.append(m.register_forward_hook(lambda m, i, o: shapes.setdefault(
                (tuple(i[0].shape), m.kernel_size[0], m.stride[0], type(m).__name__), []).append(m)))
    with torch.no_grad(): clf.head_forward(model.train(), h, a.freeze)
    for hk in hooks: hk.remove()
    print(f"{a.arch} at {a.size} px, freeze {a.freeze}, batch {a.batch}, {a.threads} threads: {sum(map(len, shapes.values()))} trainable "
          f"depthwise layers, of which training swaps {n_swapped} (k in {clf.SLOW_DEPTHWISE_SIZES}) for the compiled gradient")
    print(f"{'input N×C×H×W':>20} {'k':>2} {'s':>2} {'layers':>6} {'forward ms':>11} {'PyTorch dW ms':>14} {'compiled dW ms':>15} {'× faster':>9}")
    tot_ref = tot_new = 0.0
    for (shape, k, s, kind), ms in shapes.items():
        m = ms[0]
        xi = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        if kind == "Conv2dSame":
            from timm.layers import pad_same
            xi, pad = pad_same(xi, m.kernel_size, m.stride, m.dilation).contiguous(memory_format=torch.channels_last), (0, 0)
        else: pad = m.padding
        w = m.weight.detach()
        fwd = lambda: torch.nn.functional.conv2d(xi, w, None, m.stride, pad, 1, m.groups)
        g = torch.randn_like(fwd())
        ref = lambda: torch.ops.aten.convolution_backward(g, xi, w, None, list(m.stride), list(pad), [1, 1], False, [0, 0], m.groups,
                                                          [False, True, False])[1]
        new = lambda: clf.depthwise_extension().depthwise_weight_grad(xi, g, k, s, s, pad[0], pad[1])
        err = float((ref() - new()).abs().max()/ref().abs().max())
        assert err < 1e-4, f"{shape}: relative error {err}"
        t_f, t_r, t_n = median_ms(fwd, a.iters), median_ms(ref, a.iters), median_ms(new, a.iters)
        tot_ref += t_r*len(ms); tot_new += t_n*len(ms)
        print(f"{'×'.join(map(str, shape)):>20} {k:2d} {s:2d} {len(ms):6d} {t_f:11.2f} {t_r:14.2f} {t_n:15.2f} {t_r/t_n:9.1f}")
    print(f"{'all layers of one step':>20} {'':>2} {'':>2} {sum(map(len, shapes.values())):6d} {'':>11} {tot_ref:14.1f} {tot_new:15.1f} {tot_ref/tot_new:9.1f}")

    # 2. the whole training step, alternating the two models so that both see the same machine
    y = torch.arange(a.batch) % 7
    loss_fn = clf.cached_trunk_loss_fn(a.freeze, torch.ones(7), 0.1)
    data = (h.unsqueeze(1), y)                     # one cached view per image
    def stepper(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        ema, gen = EMA(m, 0.995), torch.Generator().manual_seed(0)
        def step():
            m.train(); loss = loss_fn(m, data, gen)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); ema.update(m, 100)
        return step
    steps = {"PyTorch": stepper(model), "compiled dW": stepper(fast)}
    ts = {k: [] for k in steps}
    for st in steps.values(): st()
    for _ in range(a.iters):
        for k, st in steps.items():
            t0 = time.perf_counter(); st(); ts[k].append(time.perf_counter() - t0)
    ips = {k: a.batch/statistics.median(v) for k, v in ts.items()}
    print(f"\ncached training step, images/s: PyTorch {ips['PyTorch']:.1f}, compiled dW {ips['compiled dW']:.1f}, "
          f"× {ips['compiled dW']/ips['PyTorch']:.2f}")


if __name__ == "__main__":
    main()
