"""Chapter 16 with LP-FT (linear probe, then fine-tune; Kumar et al. 2022), the experiment behind its note.

The chapter's members start from the ImageNet network with a random 7-class layer, so the first steps of fine-tuning
push the gradients of a random head into the pretrained features. LP-FT first fits the last layer alone, as a
class-weighted multinomial logistic regression (eq 15.1's square-root weights, L2 penalty λ picked on validation
balanced accuracy) on the pooled features of the frozen network, and then fine-tunes the whole recipe from there.
The features are the network's own at the start of fine-tuning: cached trunk maps of every training image (view 0,
the identity) through the upper stages in evaluation mode, after their BatchNorm statistics are re-estimated on those
maps (AdaBN, as the chapter does for the trunk: the ImageNet statistics make evaluation-mode features far from the
batch-statistics features the first steps see), no dropout. The members share the cache, so they share one probe. It writes a copy of
`nbs/16_skin_classifier.ipynb` with one cell that wraps `skindiff.classifier.train` and runs it through papermill with
the `cpu` profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size). Everything else is the chapter's.

    python benchmarks/skin_lp_ft.py --seed 2 --out runs/s2_lpft
"""
from __future__ import annotations
from _common import chapter16_args, run_chapter16_with

WRAP = '''
LP_VIEWS = {views}        # cached dihedral views of each training image that the probe sees (1: view 0, the identity … 8: all)
import copy as _copy, time as _time
import torch.nn.functional as _F
import skindiff.classifier as _sc
_train_inner, _lp_memo = _sc.train, {{}}

@torch.no_grad()
def _pooled(model, h, n, bs=64):
    "Pooled features N×D of cached trunk maps h N×C×h×w through stages n…, head conv and pooling (evaluation mode: no dropout)."
    model.eval()
    return torch.cat([model.forward_head(model.bn2(model.conv_head(model.blocks[n:](h[i:i + bs].float().contiguous(memory_format=torch.channels_last)))),
                                         pre_logits=True) for i in range(0, len(h), bs)])

@torch.no_grad()
def _adapt_upper_batchnorm(model, h, n, bs=64):
    "AdaBN above the trunk: the running statistics of stages n… and the head, averaged over the batches of cached maps h."
    bns = [m for part in (*model.blocks[n:], model.conv_head, model.bn2) for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns: bn.reset_running_stats(); bn.momentum = None; bn.train()
    try:
        for i in range(0, len(h), bs): model.bn2(model.conv_head(model.blocks[n:](h[i:i + bs].float().contiguous(memory_format=torch.channels_last))))
    finally:
        for bn, mom in zip(bns, momenta): bn.momentum = mom
    model.eval()

def _fit_probe(f, y, w, lam, iters=200):
    "Class-weighted multinomial logistic regression with L2 penalty lam/2·|W|² (features standardised inside)."
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu)/sd
    W = torch.zeros(len(w), f.shape[1], requires_grad=True); b = torch.zeros(len(w), requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss = _F.cross_entropy(z @ W.T + b, y, weight=w) + lam/2*W.pow(2).sum()
        loss.backward(); return loss
    opt.step(closure)
    W, b = W.detach()/sd, b.detach() - (W.detach()/sd) @ mu      # back to the raw features
    return W, b

def _lp_ft_train(model, loss_fn, data, cfg, ckpt_dir=None, **kw):
    h = data[0]
    if ckpt_dir is not None and not _sc.list_checkpoints(ckpt_dir) and isinstance(h, torch.Tensor) and h.dim() == 5:
        key = (id(h), len(model.blocks))
        if key not in _lp_memo:
            t0 = _time.time()
            n, yt = freeze, data[1].long()
            views = min(max(1, LP_VIEWS), h.shape[1])
            _adapt_upper_batchnorm(model, h[:, 0], n)
            ft = torch.cat([_pooled(model, h[:, k], n) for k in range(views)]); yt = yt.repeat(views)
            xv, yv = _lp_val
            fv = _pooled(model, _sc.trunk_features(model, xv, *normalisation(member_archs[0]), n, augment=None)[:, 0], n)
            w = _sc.class_weights(data[1].long(), len(CLASSES), imbalance)
            best = None
            for lam in (1e-4, 1e-3, 1e-2, 1e-1):
                W, b = _fit_probe(ft, yt, w, lam)
                pv = torch.softmax(fv @ W.T + b, 1)
                ba = classification_metrics(yv.numpy(), pv.numpy().astype("float64"), CLASSES, None)["balanced_accuracy"]
                print(f"LP λ={{lam:g}}: validation balanced accuracy {{ba:.3f}}")
                if best is None or ba > best[0]: best = (ba, lam, W, b)
            _lp_memo[key] = best + ({{k: v.clone() for k, v in model.state_dict().items() if "running_" in k}},)
            print(f"LP-FT: probe λ={{best[1]:g}}, validation balanced accuracy {{best[0]:.3f}}, {{_time.time() - t0:.0f}} s")
        _, lam, W, b, stats = _lp_memo[key]
        clf = model.get_classifier()
        with torch.no_grad(): clf.weight.copy_(W); clf.bias.copy_(b)
        model.load_state_dict(stats, strict=False)       # a later member: the same adapted statistics
    return _train_inner(model, loss_fn, data, cfg, ckpt_dir=ckpt_dir, **kw)

_lp_val = data["val"]
_sc.train = _lp_ft_train
'''


def main() -> None:
    args = chapter16_args(__doc__, "--views", 1, "cached dihedral views per training image for the probe (1 to 8)")
    run_chapter16_with([("def make_config", WRAP.format(views=int(args.views)))], args.out, args.seed)


if __name__ == "__main__":
    main()
