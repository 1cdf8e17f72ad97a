"""SENet-18 for 32x32 inputs: pre-activation ResNet-18 blocks with squeeze-and-excitation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from experiments.models.resnet import stage


class SEPreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        # Squeeze-and-excitation: 1x1 convs on the globally pooled features.
        self.fc1 = nn.Conv2d(planes, planes // 16, 1)
        self.fc2 = nn.Conv2d(planes // 16, planes, 1)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        weight = F.adaptive_avg_pool2d(out, 1)
        weight = self.fc2(F.relu(self.fc1(weight))).sigmoid()
        return out * weight + shortcut


class SENet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = stage(SEPreActBlock, 64, 64, blocks[0], 1)
        self.layer2 = stage(SEPreActBlock, 64, 128, blocks[1], 2)
        self.layer3 = stage(SEPreActBlock, 128, 256, blocks[2], 2)
        self.layer4 = stage(SEPreActBlock, 256, 512, blocks[3], 2)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def senet18(num_classes: int = 10, in_channels: int = 3) -> SENet:
    """SENet-18 for CIFAR."""
    return SENet((2, 2, 2, 2), num_classes, in_channels)
