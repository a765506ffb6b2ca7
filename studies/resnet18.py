"""resnet18: torchvision's ResNet-18 (random weights, 10 classes) on generated 3×32×32 images.

The model is ``torchvision.models.resnet18(weights=None, num_classes=10)`` where torchvision
imports. The torchvision wheels on PyPI are built against one torch release each, and none
imports beside the CPU torch build this project pins, so where it does not the same network
is built here in plain torch: BasicBlocks, layers [2, 2, 2, 2], torchvision's module names,
shapes and initialisation, so a torchvision ``state_dict`` loads into it unchanged
(:func:`plain_resnet18`).

The data (:class:`ImageDataset`) is stored as uint8 and turned into a float tensor in
``__getitem__`` with the usual training transform: a random horizontal flip, then scaling to
[0, 1] and normalising per channel. Each class paints an 8×8 patch of its own colour at a
random place over noise (the idea of :mod:`autobatch.studies.synthetic`): a signal that
survives the flip and global pooling, which the network learns in a few hundred steps.

The optimizer is SGD with momentum 0.9 and weight decay 5e-4, the recipe ResNets are trained
with on CIFAR-10 and the one the linear scaling rule was established for (Goyal et al., 2017);
it is SGD-like, so autobatch scales its learning rate linearly with the batch. BatchNorm in
train mode cannot normalise a single sample: the PyTorch backend keeps micro-batch 1 out.

Nothing here imports torch until a model or a sample is made.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from autobatch.studies.synthetic import N_CLASSES, patch_images
from autobatch.tasks.torch_task import TorchTask

IMAGE_SHAPE = (3, 32, 32)
TRAIN_SAMPLES = 4096
VAL_SAMPLES = 512
PATCH = 8
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
#: the mean and spread of each channel of the generated images, for normalising
CHANNEL_MEAN = (0.27, 0.27, 0.27)
CHANNEL_STD = (0.195, 0.195, 0.195)


def resnet18() -> TorchTask:
    x_train, y_train, x_val, y_val = image_split()
    return TorchTask(
        model=resnet18_model,
        train_data=ImageDataset(x_train, y_train, augment=True),
        val_data=ImageDataset(x_val, y_val, augment=False),
        optimizer=sgd_momentum,
        base_batch_size=64,
        base_learning_rate=0.01,
        name="resnet18",
        description=(
            "ResNet-18 (torchvision layout, random weights, 10 classes) on generated uint8 3x32x32 images, "
            "random flip + normalise in the Dataset, SGD momentum 0.9, weight decay 5e-4"
        ),
    )


def resnet18_model() -> Any:
    """torchvision's ResNet-18 where torchvision imports, else the same network in plain torch."""
    try:
        from torchvision.models import resnet18 as torchvision_resnet18
    except Exception:  # not installed, or built against another torch release (it fails on import)
        return plain_resnet18(N_CLASSES)
    return torchvision_resnet18(weights=None, num_classes=N_CLASSES)


def sgd_momentum(parameters: Any, lr: float) -> Any:
    import torch

    return torch.optim.SGD(parameters, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


class ImageDataset:
    """uint8 images and their labels; ``__getitem__`` gives ``(float image, label)`` after the transform.

    A map-style dataset by PyTorch's ``__len__``/``__getitem__`` protocol (not a subclass of
    ``torch.utils.data.Dataset`` only so that this module imports no torch). ``augment`` flips
    the image left-right at random, as ``RandomHorizontalFlip`` does; the flip draws from
    torch's generator, which the trial seeds.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool) -> None:
        self.images = images
        self.labels = labels
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        image = torch.from_numpy(self.images[index])
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        mean = torch.tensor(CHANNEL_MEAN).view(3, 1, 1)
        std = torch.tensor(CHANNEL_STD).view(3, 1, 1)
        return (image.float() / 255.0 - mean) / std, torch.tensor(self.labels[index])


@lru_cache(maxsize=1)
def image_split(seed: int = 4321) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val): uint8 (N, 3, 32, 32) images of noise with a class-coloured patch."""
    return patch_images(TRAIN_SAMPLES, VAL_SAMPLES, IMAGE_SHAPE, PATCH, noise_below=128, seed=seed)


def plain_resnet18(num_classes: int) -> Any:
    """ResNet-18 as torchvision builds it (He et al., 2016), module for module."""
    return _resnet_classes()[1](num_classes)


@lru_cache(maxsize=1)
def _resnet_classes() -> tuple[type, type]:
    """(BasicBlock, ResNet18): defined on first use, so that importing this module imports no torch."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample: nn.Module | None = None
            if stride != 1 or in_planes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet18(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._layer(64, 64, stride=1)
            self.layer2 = self._layer(64, 128, stride=2)
            self.layer3 = self._layer(128, 256, stride=2)
            self.layer4 = self._layer(256, 512, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, num_classes)
            # torchvision's initialisation: Kaiming-normal convolutions, BatchNorm at weight 1 and bias 0.
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.constant_(module.weight, 1)
                    nn.init.constant_(module.bias, 0)

        @staticmethod
        def _layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
            return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return BasicBlock, ResNet18
