"""MNIST DDPM recipe: a checkpoint of another architecture or dataset is refused, naming both."""
import pytest, torch
from skindiff.mnist_ddpm import MnistDDPMConfig, train_mnist_ddpm
from skindiff.train import CheckpointError, load_weights
from skindiff.unet import UNet, unet_preset

def test_other_architecture_is_refused_naming_both(tmp_path):
    small = MnistDDPMConfig(train_steps=1, batch_size=4, warmup_steps=0, base_channels=16)
    res, _ = train_mnist_ddpm(small, ckpt_dir=tmp_path, progress=False)
    assert res.step == 1
    with pytest.raises(CheckpointError, match=r"unet.base_channels: 16 in the checkpoint, 32 here"):
        train_mnist_ddpm(MnistDDPMConfig(train_steps=1, batch_size=4, warmup_steps=0, base_channels=32), ckpt_dir=tmp_path, progress=False)
    # loading the weights into a CIFAR-10 U-Net: the dataset and the architecture both differ
    cifar_meta = dict(small.meta(), dataset="cifar10", unet=unet_preset("cifar10").to_dict())
    with pytest.raises(CheckpointError, match=r"dataset: 'mnist' in the checkpoint, 'cifar10' here"):
        load_weights(UNet(unet_preset("cifar10")), res.checkpoint, meta=cifar_meta)
    with pytest.raises(CheckpointError, match="does not fit UNet"):
        load_weights(UNet(unet_preset("cifar10")), res.checkpoint)
