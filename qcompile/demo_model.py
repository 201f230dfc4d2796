"""A tiny image classifier for ``qcompile demo`` and for trying the CLI without a model of your own:

    qcompile compile qcompile.demo_model:tiny_cnn --calibration qcompile.demo_model:calibration -o tiny.qc
    qcompile evaluate tiny.qc --model qcompile.demo_model:tiny_cnn --data qcompile.demo_model:evaluation
"""
from __future__ import annotations

import torch
from torch import nn

RES = 16


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, RES, RES, generator=g)


def tiny_cnn(seed: int = 0):
    """(model in eval mode, example inputs): a factory in the ``module:factory`` form the CLI takes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCNN()
        model.train()
        with torch.no_grad():  # batch-norm statistics from data, so the folded ranges are realistic
            for i in range(4):
                model(_images(32, 100 + i))
    return model.eval(), (_images(4, 1),)


def calibration() -> list:
    """16 calibration batches of 4 images."""
    return [_images(4, 10 + i) for i in range(16)]


def evaluation() -> dict:
    """64 evaluation images with a ``brightness`` slice label per image."""
    x = _images(64, 7)
    x[32:] *= 0.5
    return {"inputs": x, "brightness": ["bright"] * 32 + ["dim"] * 32}
