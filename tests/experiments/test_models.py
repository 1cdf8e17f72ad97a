"""Each model's forward shape, and that norm decay regularizes all of its conv layers (grouped ones too)."""

from __future__ import annotations

import pytest
import torch

import normopt
from experiments.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape(name):
    channels, size = (1, 8) if name == "small" else (3, 32)
    model = build_model(name, num_classes=10, in_channels=channels).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)


def test_regnet_grouped_convs_are_regularized():
    model = build_model("regnetx_200mf")
    optimizer = normopt.NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, example_input=torch.zeros(1, 3, 32, 32)
    )
    grouped = [name for name, spec in optimizer.norm_decay.decayed.items() if getattr(spec, "groups", 1) > 1]
    assert len(grouped) == 13  # one grouped 3x3 conv per block
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    assert set(grouped) <= set(optimizer.last_norms)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        build_model("lenet")
