"""Which step should a DDPM ε-network be asked about at continuous time t? Chapter 13's two index maps, compared by the
denoising error that the score inherits.

`score_fn_from_eps_fn` turns chapter 08's ε-network into the score of the VP SDE, s(x, t) = −ε(x, i(t))/σ(t). With
`index_map='score_sde'` (score_sde_pytorch's convention, the chapter's default) i(t) = t (N−1); with 'alpha_bar' i(t) is
the step whose ᾱ equals s(t)², the network's own noise level. For held-out MNIST digits x₀ and fresh noise ε this script
draws x_t = s(t) x₀ + σ(t) ε from the SDE's marginal at a grid of t, and prints E‖ε̂ − ε‖²/D under each map: the
denoising loss at t, and the score's squared error times σ(t)² (the DSM loss of eq 2.8 in ε units). Both maps see the
same x₀, ε and network, so the paired difference has a small standard error.

    python benchmarks/sde_index_map.py runs/cpu_mnist          # the folder of a run that has chapter 08's checkpoint
"""
from __future__ import annotations
import argparse, json, math, sys, time
from pathlib import Path

import torch

from skindiff.data import load_mnist, seeded_subset, pad_images, to_model_range
from skindiff.mnist_ddpm import MnistDDPMConfig
from skindiff.schedules import get_schedule
from skindiff.train import checkpoint_step, list_checkpoints, load_weights
from skindiff.unet import UNet
from skindiff.samplers import eps_fn_from_model
from skindiff.sde import VPSDE, INDEX_MAPS, eps_model_steps, likelihood_bpd, score_fn_from_eps_fn
from skindiff.study import PROFILES

TIMES = (1e-5, 1e-4, 1e-3, 2e-3, 5e-3, 1e-2, 3e-2, 0.1, 0.3, 0.6, 0.9, 1.0)   # 1e-5: the likelihood's start; 1e-3: sampling's end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="run folder whose checkpoints/08_ddpm_mnist/ddpm holds the finished DDPM")
    ap.add_argument("--profile", default="cpu", help="study profile the checkpoint was trained with (default: cpu)")
    ap.add_argument("--n", type=int, default=512, help="MNIST test images (default 512)")
    ap.add_argument("--draws", type=int, default=4, help="noise draws per image and time (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="data root (default: the usual search)")
    ap.add_argument("--bpd", type=int, default=0, help="also bits/dim of this many test images under each map (chapter 13's "
                    "probability-flow ODE, rtol 1e-5, the same dequantisation and Hutchinson probes for both; default 0)")
    ap.add_argument("--n-hutchinson", type=int, default=2)
    a = ap.parse_args()
    ckpts = list_checkpoints(a.run/"checkpoints"/"08_ddpm_mnist"/"ddpm")
    if not ckpts:
        sys.exit(f"{a.run}/checkpoints/08_ddpm_mnist/ddpm has no checkpoint: run `skindiff study --profile {a.profile} "
                 f"--out {a.run} --only 08_ddpm_mnist` first")
    keys = MnistDDPMConfig.__dataclass_fields__
    p = PROFILES[a.profile].get("08_ddpm_mnist", {})
    cfg = MnistDDPMConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in p.items() if k in keys}, seed=a.seed)
    model = load_weights(UNet(cfg.unet_config()), ckpts[-1], meta=cfg.meta()).eval()      # the EMA weights
    step = checkpoint_step(ckpts[-1])
    if step != cfg.train_steps: print(f"note: {ckpts[-1]} is step {step} of the profile's {cfg.train_steps}")
    schedule = get_schedule(cfg.schedule, T=cfg.T)
    torch.set_grad_enabled(False)
    eps_fn = eps_fn_from_model(model, precision="float32")
    sde = VPSDE.from_schedule(schedule)
    x_test, _ = load_mnist("test", data=a.data)
    x0 = pad_images(to_model_range(x_test[seeded_subset(len(x_test), a.n, seed=a.seed)]), cfg.pad, value=-1.0)
    g = torch.Generator().manual_seed(a.seed + 1)
    rows, t0 = [], time.time()
    print(f"{a.n} MNIST test images × {a.draws} noise draws, chapter 08's {a.profile} DDPM (step {step}); "
          f"E‖ε̂ − ε‖²/D under each step map (paired: same x₀, ε)")
    print(f"{'t':>8} {'σ(t)':>8} | {'step, score_sde':>15} {'step, alpha_bar':>15} | {'score_sde':>10} {'alpha_bar':>10} "
          f"{'ratio':>6} {'difference ± SE':>20}")
    for t in TIMES:
        per_image = {m: torch.zeros(a.n, dtype=torch.float64) for m in INDEX_MAPS}
        tt = torch.full((a.n,), t)
        s_t, sigma_t = (c.view(-1, 1, 1, 1).float() for c in sde.marginal_coefs(tt))
        for _ in range(a.draws):
            eps = torch.randn(x0.shape, generator=g)
            x_t = s_t * x0 + sigma_t * eps
            for m in INDEX_MAPS:
                err = (eps_fn(x_t, eps_model_steps(sde, tt, m)) - eps).double().pow(2).flatten(1).mean(1)
                per_image[m] += err / a.draws
        d = per_image["alpha_bar"] - per_image["score_sde"]
        r = dict(t=t, sigma=float(sigma_t[0]), **{f"step_{m}": float(eps_model_steps(sde, tt[:1], m)) for m in INDEX_MAPS},
                 **{f"mse_{m}": float(v.mean()) for m, v in per_image.items()},
                 diff=float(d.mean()), diff_se=float(d.std() / math.sqrt(a.n)))
        r["ratio"] = r["mse_alpha_bar"] / r["mse_score_sde"]
        rows.append(r)
        print(f"{t:8.0e} {r['sigma']:8.4f} | {r['step_score_sde']:15.2f} {r['step_alpha_bar']:15.2f} | "
              f"{r['mse_score_sde']:10.5f} {r['mse_alpha_bar']:10.5f} {r['ratio']:6.3f} "
              f"{r['diff']:+10.5f} ± {r['diff_se']:.5f}")
    print(f"({time.time() - t0:.0f} s; ratio < 1: 'alpha_bar' denoises better at that t)")
    bpd = {}
    if a.bpd:
        imgs = pad_images(x_test[seeded_subset(len(x_test), a.bpd, seed=a.seed)], cfg.pad, value=0)   # chapter 13's images
        torch.set_grad_enabled(True)
        for m in INDEX_MAPS:
            t0 = time.time()
            score = score_fn_from_eps_fn(eps_fn, sde, index_map=m)
            r = likelihood_bpd(score, sde, imgs, generator=torch.Generator().manual_seed(a.seed + 3), n_hutchinson=a.n_hutchinson,
                               rtol=1e-5, atol=1e-5)
            bpd[m] = r.bpd.mean(0).double()                                  # per image, the mean of the probes
            print(f"bits/dim, {m:>9}: {float(bpd[m].mean()):.4f} ± {float(bpd[m].std() / math.sqrt(a.bpd)):.4f} "
                  f"({a.bpd} images, {a.n_hutchinson} probes; {time.time() - t0:.0f} s)")
        d = bpd["alpha_bar"] - bpd["score_sde"]
        print(f"paired difference alpha_bar − score_sde: {float(d.mean()):+.4f} ± {float(d.std() / math.sqrt(a.bpd)):.4f} bits/dim")
    print(json.dumps(dict(n=a.n, draws=a.draws, seed=a.seed, profile=a.profile, rows=rows,
                          bpd={m: v.tolist() for m, v in bpd.items()})))


if __name__ == "__main__":
    main()
