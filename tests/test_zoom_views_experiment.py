"The 16-view trunk cache of benchmarks/skin_zoom_views.py (chapter 16's appendix) against the views built by hand."
import time

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

from skindiff import classifier as clf
from _bench import load_benchmark


def test_zoom_views_cache_is_the_dihedral_cache_then_zoomed_views(monkeypatch):
    zoom, n, seed = 0.5, 2, 3
    monkeypatch.setattr(clf, "trunk_features", clf.trunk_features)          # the swap replaces it: undo after
    torch.manual_seed(0)
    model = clf.freeze_stages(clf.create_classifier(7, arch=clf.LITE0_ARCH, pretrained=False), n).eval()
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    mean = std = [0.5]*3
    plain = clf.trunk_features(model, x, mean, std, n, clf.Augment(), seed=seed)
    calls = []
    ns = {"torch": torch, "time": time, "train_classifier": lambda *a, **kw: calls.append(kw)}
    exec(load_benchmark("skin_zoom_views").SWAP.format(zoom=zoom), ns)
    h = clf.trunk_features(model, x, mean, std, n, clf.Augment(), seed=seed)
    assert h.shape == (5, 16, *plain.shape[2:])
    assert torch.equal(h[:, :8], plain)                                         # the chapter's 8 dihedral views first

    # by hand: view 8 + k is dihedral view k of each image zoomed by its own z, with its own colour jitter
    gen = torch.Generator().manual_seed(seed + 8)
    for k in range(8):
        z = clf.dihedral_view(clf.random_zoom(x.float()/255, zoom, gen), k)
        zk = (z*255).round().clamp(0, 255).to(torch.uint8)
        colour = clf.Augment(dihedral=False)
        v = clf.augment_batch(zk.float()/255, torch.Generator().manual_seed(seed + 8 + k), colour)
        want = clf.trunk_forward(model, clf.normalise(v, mean, std).contiguous(memory_format=torch.channels_last), n)
        assert torch.allclose(h[:, 8 + k].float(), want.half().float(), atol=1e-2), k
    assert not torch.equal(h[:, 8], h[:, 0])

    # built once: the second member gets the same tensor, and its own trunk_cache (the 8-view check's) is dropped
    assert clf.trunk_features(model, x, mean, std, n, clf.Augment(), seed=seed + 1) is h
    ns["train_classifier"]("model", trunk_cache=h, cache_trunk=n)
    assert calls == [{"trunk_cache": None, "cache_trunk": n}]
