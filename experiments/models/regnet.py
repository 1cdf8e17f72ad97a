"""RegNetX-200MF for 32x32 inputs: bottleneck blocks with grouped 3x3 convolutions (group width 8)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

REGNETX_200MF = {"depths": (1, 1, 4, 7), "widths": (24, 56, 152, 368), "strides": (1, 1, 2, 2), "group_width": 8}


class XBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(w_in, w_out, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w_out)
        self.conv2 = nn.Conv2d(w_out, w_out, 3, stride=stride, padding=1, groups=w_out // group_width, bias=False)
        self.bn2 = nn.BatchNorm2d(w_out)
        self.conv3 = nn.Conv2d(w_out, w_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(w_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or w_in != w_out:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False), nn.BatchNorm2d(w_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class RegNet(nn.Module):
    def __init__(self, config=REGNETX_200MF, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, w_in = [], 64
        for depth, width, stride in zip(config["depths"], config["widths"], config["strides"]):
            blocks = []
            for s in [stride] + [1] * (depth - 1):
                blocks.append(XBlock(w_in, width, s, config["group_width"]))
                w_in = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(w_in, num_classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def regnetx_200mf(num_classes: int = 10, in_channels: int = 3) -> RegNet:
    """RegNetX-200MF for CIFAR."""
    return RegNet(REGNETX_200MF, num_classes, in_channels)
