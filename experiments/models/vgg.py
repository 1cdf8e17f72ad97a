"""VGG-11 with batch norm for 32x32 inputs (CIFAR-10)."""

from __future__ import annotations

from torch import nn

CONFIG = {"vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]}


class VGG(nn.Module):
    def __init__(self, name: str = "vgg11", num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers, channels = [], in_channels
        for item in CONFIG[name]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-11 (BN) for CIFAR: five 2x2 max pools take 32x32 to 1x1, then one linear layer."""
    return VGG("vgg11", num_classes, in_channels)
