"The SAM step of benchmarks/skin_sam.py (chapter 16's appendix) against SAM written out by hand."
import copy

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

from skindiff import classifier as clf
from _bench import load_benchmark


def _swap() -> str: return load_benchmark("skin_sam").SWAP


def test_sam_step_matches_hand_written_sam(monkeypatch):
    rho, n = 0.05, 2
    torch.manual_seed(0)
    model = clf.freeze_stages(clf.create_classifier(7, arch=clf.LITE0_ARCH, pretrained=False), n)
    x = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8)
    y = torch.arange(6)
    h = clf.trunk_features(model, x, [0.5]*3, [0.5]*3, n, clf.Augment(), seed=0)
    plain = clf.cached_trunk_loss_fn(n, None, 0.1)
    monkeypatch.setattr(clf, "cached_trunk_loss_fn", clf.cached_trunk_loss_fn)   # the swap replaces it: undo after
    ns = {"torch": torch}
    exec(_swap().format(rho=rho, steps=450, every=150), ns)
    try:
        sam = clf.cached_trunk_loss_fn(n, None, 0.1)
        assert sam is not plain and ns["train_steps"] == 450 and ns["eval_every"] == 150
        model.train()
        ref = copy.deepcopy(model)
        w0 = [p.detach().clone() for p in model.parameters()]

        # by hand: ε = ρ g/‖g‖ at w (running statistics held), the gradient at w + ε, back to w, AdamW
        bns = [m for m in ref.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        g = torch.Generator().manual_seed(1); gen_state = g.get_state(); torch.manual_seed(5); rng = torch.get_rng_state()
        params = [p for p in ref.parameters() if p.requires_grad]
        for m in bns: m.momentum = 0.0
        grads = torch.autograd.grad(plain(ref, (h, y), g), params)
        for m in bns: m.momentum = 0.1
        scale = rho/torch.stack([q.norm() for q in grads]).norm()
        with torch.no_grad():
            for p, q in zip(params, grads): p.add_(q*scale)
        g.set_state(gen_state); torch.set_rng_state(rng)
        loss_ref = plain(ref, (h, y), g); loss_ref.backward()
        with torch.no_grad():
            for p, q in zip(params, grads): p.sub_(q*scale)
        torch.optim.AdamW(params, lr=1e-3).step()

        # through the swapped loss and the pre-step hook, as train() calls them
        g = torch.Generator().manual_seed(1); torch.manual_seed(5)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss = sam(model, (h, y), g)
        opt.zero_grad(); loss.backward(); opt.step()
    finally:
        ns["_sam_hook"].remove()

    assert torch.equal(loss, loss_ref)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()): assert torch.equal(a, b)
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), w0))
    assert 0 < moved < 2e-3          # one AdamW step of lr 1e-3 from w, not from w + ε
