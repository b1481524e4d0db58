"""Chapter 16 with zoomed views in the trunk cache, the experiment behind its note.

The profile's members over-fit the cached views of each training image: the cache (eq 15.6) holds the trunk's output
for the 8 dihedral views, each with one colour jitter drawn when the cache is built, and the members' validation
macro AUC peaks at about step 300 of 900 and falls after it. A random zoom (`Augment.zoom`, chapter 15) is the
augmentation most ISIC entries lean on, and the cache rules it out: it is drawn per step. This experiment draws it
per view instead. The cache gets 8 more views: view 8 + k is the dihedral view k of the image zoomed in by its own
z ~ U[1, 1 + zoom] at a random position (`random_zoom`: a crop of 1/z of each side, resampled to the full size),
with its own colour jitter. A member draws one of the 16 views of each image at each step, so it sees 9 scales of
each lesion in place of 1. Building the cache costs twice as long; a step costs the same.

It writes a copy of `nbs/16_skin_classifier.ipynb` with one cell that swaps `skindiff.classifier.trunk_features`
for the 16-view cache (built once; the members share it, as in the chapter), and runs the copy through papermill
with the `cpu` profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size). Test-time augmentation,
validation selection and everything else are the chapter's.

    python benchmarks/skin_zoom_views.py --seed 2 --out runs/s2_zoomviews --zoom 0.5
"""
from __future__ import annotations
from _common import chapter16_args, run_chapter16_with

SWAP = '''
ZOOM_VIEWS_ZOOM = {zoom}   # the zoomed views: z ~ U[1, 1 + zoom], a crop of 1/z of each side at a random position
import dataclasses as _dc
import skindiff.classifier as _sc
_trunk_features_inner, _train_classifier_inner, _zoom_cache = _sc.trunk_features, train_classifier, {{}}

@torch.no_grad()
def _zoomed_view(x, k, gen, zoom, bs=256):
    "uint8 images N×3×H×W → dihedral view k of each image zoomed in by its own z ~ U[1, 1 + zoom] (uint8)."
    out = torch.empty_like(x)
    for i in range(0, len(x), bs):
        v = _sc.dihedral_view(_sc.random_zoom(x[i:i + bs].float()/255, zoom, gen), k)
        out[i:i + bs] = (v*255).round().clamp(0, 255).to(torch.uint8)
    return out

def _zoom_trunk_features(model, images, mean, std, n, augment=_sc.Augment(), seed=0, **kw):
    "The chapter's 8 dihedral views, then 8 zoomed ones: N×16×C×h×w, built once for these images and shared."
    key = (tuple(images.shape), int(images[::97].sum()))
    if key not in _zoom_cache:
        t = time.time()
        plain = _trunk_features_inner(model, images, mean, std, n, augment, seed=seed, **kw)
        gen, colour = torch.Generator().manual_seed(seed + 8), _dc.replace(augment, dihedral=False)
        zoomed = [_trunk_features_inner(model, _zoomed_view(images, k, gen, ZOOM_VIEWS_ZOOM), mean, std, n, colour,
                                        seed=seed + 8 + k, **kw) for k in range(_sc.DIHEDRAL_VIEWS)]
        _zoom_cache.clear()
        _zoom_cache[key] = torch.cat([plain, *zoomed], 1)
        print(f"zoom-view cache: {{tuple(_zoom_cache[key].shape)}} in {{time.time() - t:.0f}} s")
    return _zoom_cache[key]

def train_classifier(*args, trunk_cache=None, **kw):
    "The chapter's training; the shared cache comes from `_zoom_trunk_features`, which keeps it (16 views, not 8)."
    return _train_classifier_inner(*args, trunk_cache=None, **kw)

_sc.trunk_features = _zoom_trunk_features
'''


def main() -> None:
    args = chapter16_args(__doc__, "--zoom", 0.5, "the zoomed views' z ~ U[1, 1 + zoom] (0 < zoom <= 1)")
    if not 0 < args.zoom <= 1: raise SystemExit(f"--zoom {args.zoom}: expected 0 < zoom <= 1")
    run_chapter16_with([("def make_config", SWAP.format(zoom=args.zoom)),
                        ("+def make_config", "_zoom_cache.clear()   # training is done: free the 16-view cache")], args.out, args.seed)


if __name__ == "__main__":
    main()
