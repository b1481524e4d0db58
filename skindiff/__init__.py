"""Skin disease diagnosis with adversarial training and diffusion models: a literate nbdev course and a reproducible study

Modules:

- `skindiff.study`: `skindiff study --profile ci|cpu|gpu --out runs/NAME`: every chapter, executed with papermill, every number with its provenance.
- `skindiff.train`: One loop for every model in the course: seeded, EMA, gradient clipping, AMP on CUDA, atomic checkpoints, exact resume."""

__version__ = "0.0.1"
