"""Chapter 16 with class-balanced sampling in place of eq 15.1's class weights, the experiment behind its note.

Eq 15.1 weights each image's loss by w_y ∝ n_y^(-1/2) (square-root weights) and draws batches uniformly. This script
draws each batch instead with replacement from p(i) ∝ w_{y_i} and leaves the loss unweighted: in expectation the same
class mix (Σ_i p(i) ℓ_i ∝ Σ_i w_{y_i} ℓ_i), but a rare-class image is seen more often, each time in a fresh
dihedral view and colour jitter, rather than counted more when seen (`--power 1`: fully balanced classes). It writes
a copy of `nbs/16_skin_classifier.ipynb` with one cell that swaps `skindiff.train.batch_indices` for the lesion
model's training set (the DermaMNIST part keeps its uniform batches) and runs it through papermill with the `cpu`
profile (`SKIN_CLASSIFIER_CPU`; the DermaMNIST part at its `ci` size). Everything else, validation selection
included, is the chapter's.

    python benchmarks/skin_balanced_sampler.py --seed 2 --out runs/s2_sampler
"""
from __future__ import annotations
from _common import chapter16_args, run_chapter16_with

SWAP = '''
SAMPLER_POWER = {power}   # p(i) ∝ n_(y_i)^(-power): 0.5 matches eq 15.1's square-root weights, 1 balances the classes
import skindiff.train as _st
_uniform_batches, _y_train = _st.batch_indices, data["train"][1].long()
_n_c = torch.bincount(_y_train, minlength=len(CLASSES)).double()
_p_sample = _n_c[_y_train].pow(-SAMPLER_POWER); _p_sample /= _p_sample.sum()
def _balanced_batches(n, batch_size, step, seed):   # batch_indices for the lesion model: with replacement from p
    if n != len(_y_train): return _uniform_batches(n, batch_size, step, seed)
    g = torch.Generator().manual_seed(1_000_003*seed + step)
    return torch.multinomial(_p_sample, batch_size, replacement=True, generator=g)
_st.batch_indices = _balanced_batches
imbalance = "none"        # the sampler does eq 15.1's work: no class weights in the loss
print("class mix of the batches:", dict(zip(CLASSES, (torch.zeros(len(CLASSES), dtype=torch.float64)
      .index_add_(0, _y_train, _p_sample)).round(decimals=3).tolist())))
'''


def main() -> None:
    args = chapter16_args(__doc__, "--power", 0.5, "p(i) ∝ n_(y_i)^(-power) (0.5: the square-root weights' mix)")
    run_chapter16_with([("def make_config", SWAP.format(power=args.power))], args.out, args.seed)


if __name__ == "__main__":
    main()
