"""Models of the paper's experiments, selectable by name."""

from experiments.models.resnet import resnet18

MODELS = {"resnet18": resnet18}

__all__ = ["MODELS", "resnet18"]
