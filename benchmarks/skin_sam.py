"""Chapter 16 with sharpness-aware minimisation (SAM; Foret et al., 2021), the experiment behind its note.

The profile's members over-fit the 8 cached views of each training image: their validation macro AUC peaks at about
step 300 of 900 and falls after it. SAM looks for weights whose whole neighbourhood has a low loss, not just the
point: each step first climbs to the worst nearby weights, w + ε with ε = ρ g/‖g‖ (g = ∇L(w), over the trained
weights), and then updates w with the gradient taken there, ∇L(w + ε). That costs two forward and backward passes a
step, so for the same 25 minutes each member trains half the steps (`--steps`, default 450, validated every
`--steps`/3).

This script writes a copy of `nbs/16_skin_classifier.ipynb` with one cell that wraps the cached-trunk loss inside
`skindiff.classifier`: the wrapped loss takes the ascent step (with the BatchNorm running statistics held still, and
the same feature views, crops and dropout for both passes) and returns the loss at w + ε, whose backward pass leaves
∇L(w + ε) in the gradients; an optimizer pre-step hook moves the weights back to w before AdamW applies it. It runs
the copy through papermill with the `cpu` profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size).
Everything else, validation selection included, is the chapter's.

    python benchmarks/skin_sam.py --seed 2 --out runs/s2_sam --rho 0.05

`--time-steps N` instead times N plain and N SAM steps of one member (Lite2, 128 px, `freeze=2`, batch 64, the
profile's label smoothing) on random cached maps of the profile's shape, in turn, and prints the median seconds per
step and their ratio:

    python benchmarks/skin_sam.py --time-steps 20
"""
from __future__ import annotations
import argparse
from _common import run_chapter16_with

SWAP = '''
SAM_RHO = {rho}            # ρ: the radius of the neighbourhood SAM climbs in
train_steps, eval_every = {steps}, {every}   # each SAM step costs two: half the profile's steps
import skindiff.classifier as _sc
from torch.optim.optimizer import register_optimizer_step_pre_hook as _pre_step_hook
_plain_loss_maker, _sam_pending = _sc.cached_trunk_loss_fn, []
def _sam_loss_maker(*args, **kwargs):          # cached_trunk_loss_fn with SAM's ascent step
    inner = _plain_loss_maker(*args, **kwargs)
    def loss_fn(model, batch, generator):
        params = [p for p in model.parameters() if p.requires_grad]
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        state, rng, momenta = generator.get_state(), torch.get_rng_state(), [m.momentum for m in bns]
        for m in bns: m.momentum = 0.0         # the ascent pass leaves the running statistics alone
        loss = inner(model, batch, generator)
        for m, mo in zip(bns, momenta): m.momentum = mo
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        scale = SAM_RHO/(torch.stack([g.norm() for _, g in used]).norm() + 1e-12)
        with torch.no_grad():
            eps = [(p, g*scale) for p, g in used]
            for p, e in eps: p.add_(e)         # w + ε
        _sam_pending.append(eps)
        generator.set_state(state); torch.set_rng_state(rng)   # the same views, crops, CutMix and dropout at w + ε
        return inner(model, batch, generator)  # its backward pass leaves ∇L(w + ε) in the gradients
    return loss_fn
def _sam_restore(optimizer, args, kwargs):     # back to w before the optimizer applies ∇L(w + ε)
    while _sam_pending:
        with torch.no_grad():
            for p, e in _sam_pending.pop(): p.sub_(e)
_sam_hook = _pre_step_hook(_sam_restore)   # a handle: `_sam_hook.remove()` undoes it
_sc.cached_trunk_loss_fn = _sam_loss_maker
print(f"SAM: rho={{SAM_RHO}}, {{train_steps}} steps per member, validated every {{eval_every}}")
'''


def time_steps(n: int, rho: float) -> None:
    """Seconds per optimizer step of one profile member on random cached maps, plain and with SAM: two copies of the
    model, stepped in turn so that both see the same machine (as `bench_depthwise.py` does); medians."""
    import copy, statistics, time, torch
    import skindiff.classifier as sc
    from skindiff.study import SKIN_CLASSIFIER_CPU as P
    torch.manual_seed(0)
    model = sc.freeze_stages(sc.create_classifier(7, arch=P["arch"]), P["freeze"])
    sc.use_depthwise_kernel(model)
    with torch.no_grad(): one = sc.trunk_forward(model.eval(), torch.zeros(1, 3, P["image_size"], P["image_size"]), P["freeze"])
    h = torch.randn(4*P["batch_size"], sc.DIHEDRAL_VIEWS, *one.shape[1:]).to(one.dtype)
    y = torch.randint(0, 7, (len(h),))
    plain_loss = sc.cached_trunk_loss_fn(P["freeze"], None, 0.1)
    exec(SWAP.format(rho=rho, steps=P["train_steps"]//2, every=P["eval_every"]//2), {"torch": torch})
    sam_loss = sc.cached_trunk_loss_fn(P["freeze"], None, 0.1)
    def stepper(m, loss_fn):
        m.train()
        opt, g = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4), torch.Generator().manual_seed(0)
        def step():
            idx = torch.randint(0, len(h), (P["batch_size"],), generator=g)
            loss = loss_fn(m, (h[idx], y[idx]), g)
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return step
    steps = {"plain": stepper(model, plain_loss), "SAM": stepper(copy.deepcopy(model), sam_loss)}
    ts = {k: [] for k in steps}
    for st in steps.values(): st(); st()                            # two warm-up steps each
    for _ in range(n):
        for k, st in steps.items():
            t0 = time.perf_counter(); st(); ts[k].append(time.perf_counter() - t0)
    plain, sam = (statistics.median(ts[k]) for k in ("plain", "SAM"))
    print(f"{torch.get_num_threads()} threads, batch {P['batch_size']}, maps {tuple(h.shape[2:])}, {n} steps each, medians: "
          f"plain {plain:.3f} s/step, SAM {sam:.3f} s/step, SAM/plain {sam/plain:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="seed of the lesion split, training and the bootstrap")
    ap.add_argument("--out", help="run folder")
    ap.add_argument("--rho", type=float, default=0.05, help="ρ, the radius of SAM's ascent step")
    ap.add_argument("--steps", type=int, default=450, help="SAM steps per member (each costs two of the profile's)")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many plain and SAM steps")
    args = ap.parse_args()
    if not args.rho > 0: ap.error(f"--rho {args.rho}: expected a radius > 0")
    if args.time_steps < 0: ap.error(f"--time-steps {args.time_steps}: expected a number of steps >= 1")
    if args.time_steps: return time_steps(args.time_steps, args.rho)
    if args.out is None: ap.error("--out: the run folder is required")
    if args.steps < 3: ap.error(f"--steps {args.steps}: expected at least 3 (validated every steps/3)")
    every = args.steps//3
    run_chapter16_with([("def make_config", SWAP.format(rho=args.rho, steps=args.steps, every=every))], args.out, args.seed)


if __name__ == "__main__":
    main()
