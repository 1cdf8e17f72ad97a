"""ResNet-18 for 32x32 inputs (CIFAR-10), as in the paper: 3x3 stem, no max pooling."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def stage(block: type[nn.Module], in_planes: int, planes: int, count: int, stride: int) -> nn.Sequential:
    """``count`` blocks, the first with ``stride``, growing ``in_planes`` to ``planes``."""
    blocks = []
    for s in [stride] + [1] * (count - 1):
        blocks.append(block(in_planes, planes, s))
        in_planes = planes
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = stage(BasicBlock, width, width, blocks[0], 1)
        self.layer2 = stage(BasicBlock, width, 2 * width, blocks[1], 2)
        self.layer3 = stage(BasicBlock, 2 * width, 4 * width, blocks[2], 2)
        self.layer4 = stage(BasicBlock, 4 * width, 8 * width, blocks[3], 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-18 (11.2M parameters)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)
