"""A small CNN for the bundled 8x8 digits."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Sequential:
    """Three 3x3 convs with batch norm (8x8 -> 4x4), global pooling and one linear layer; named
    modules (``conv1``, ``bn1``, ..., ``fc``), so tables and figures show real layer names."""
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(in_channels, width, 3, padding=1, bias=False)),
                ("bn1", nn.BatchNorm2d(width)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)),
                ("bn2", nn.BatchNorm2d(2 * width)),
                ("relu2", nn.ReLU()),
                ("conv3", nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)),
                ("bn3", nn.BatchNorm2d(2 * width)),
                ("relu3", nn.ReLU()),
                ("pool", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("fc", nn.Linear(2 * width, num_classes)),
            ]
        )
    )
