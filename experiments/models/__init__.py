"""Models of the paper's experiments, selectable by name."""

from __future__ import annotations

from torch import nn

from experiments.models.regnet import regnetx_200mf
from experiments.models.resnet import resnet18
from experiments.models.senet import senet18
from experiments.models.small import small_cnn
from experiments.models.vgg import vgg11

MODELS = {"vgg11": vgg11, "resnet18": resnet18, "senet18": senet18, "regnetx_200mf": regnetx_200mf, "small": small_cnn}


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A model by name; ``ValueError`` naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


__all__ = ["MODELS", "build_model", "regnetx_200mf", "resnet18", "senet18", "small_cnn", "vgg11"]
