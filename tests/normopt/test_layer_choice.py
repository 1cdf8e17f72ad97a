"""Which layers a norm decay takes: each reason a layer is left alone, and refusals by layer."""

from __future__ import annotations

import pytest
import torch
from helpers import batches, digits
from torch import nn
from torch.nn.utils import parametrizations

import normopt
from normopt import layer_specs
from normopt.layer_choice import choose_layers
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec

CONV_LINEAR = (ConvSpec, LinearSpec)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3)
    )


def _choose(model, params=None, example=None, **options):
    params = list(model.parameters()) if params is None else params
    options.setdefault("kinds", CONV_LINEAR)
    return choose_layers(layer_specs(model, example), dict(model.named_modules()), [{"params": params}], **options)


def test_every_trainable_layer_of_the_kinds_is_chosen_and_the_batch_norm_skipped_with_its_reason():
    choice = _choose(_model())
    assert list(choice.decayed) == ["0", "2", "4"]
    assert choice.bn_projected == choice.frozen == choice.shared == {}
    assert choice.skipped == {}  # a batch norm is not of the kinds: nothing to say about it


@pytest.mark.parametrize(
    ("change", "layer", "reason", "where"),
    [
        (lambda m: m[2].weight.requires_grad_(False), "2", "weight is frozen", "frozen"),
        (lambda m: parametrizations.weight_norm(m[2]), "2", "weight is parametrized", None),
        (lambda m: None, "4", "not a parameter of the optimizer", None),
    ],
)
def test_a_layer_left_alone_says_why(change, layer, reason, where):
    model = _model()
    change(model)
    params = [p for name, p in model.named_parameters() if not name.startswith("4.")] if layer == "4" else None
    choice = _choose(model, params)
    assert layer not in choice.decayed and reason in choice.skipped[layer]
    assert (layer in choice.frozen) == (where == "frozen")


def test_excluded_layers_and_those_another_decay_took_are_left_with_what_each_needs():
    model = _model()
    choice = _choose(model, exclude=frozenset({"0"}), taken={id(model[4].weight)})
    assert list(choice.decayed) == ["2"]
    assert "0" not in choice.skipped  # excluded: the user knows why
    assert choice.shared == {"4": model[4].weight} and "another norm decay" in choice.skipped["4"]


def test_batch_norms_are_capped_with_bn_max_norm_and_regularized_when_asked_for():
    model = _model()
    assert list(_choose(model, bn_max_norm=5.0).bn_projected) == ["1"]
    with_bn = _choose(model, kinds=(*CONV_LINEAR, BatchNormSpec))
    assert list(with_bn.decayed) == ["0", "1", "2", "4"] and with_bn.bn_projected == {}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning", "ignore:Complex modules:UserWarning")
@pytest.mark.parametrize(
    ("make_model", "options", "error", "match"),
    [
        (lambda: nn.Sequential(nn.Linear(0, 3)), {}, ValueError, r"layer '0' has an empty weight"),
        (lambda: nn.Sequential(nn.Linear(3, 2).to(torch.complex64)), {}, TypeError, r"layer '0' has complex weights"),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 1, 3, padding_mode="circular", padding=1)),
            {"max_norm": 1.0, "example": torch.zeros(1, 1, 2, 2)},
            ValueError,
            r"layer '0': l1-ball projection needs every tap to enter a line at most once",
        ),
    ],
)
def test_a_layer_that_cannot_be_regularized_is_refused_by_name(make_model, options, error, match):
    with pytest.raises(error, match=match):
        _choose(make_model(), **options)


def test_layers_that_tie_one_weight_to_different_maps_are_refused_unless_excluded():
    conv = nn.Conv2d(1, 1, 3, padding=1)
    model = nn.Sequential(conv, nn.Conv2d(1, 1, 3, padding=2, dilation=2))
    model[1].weight = conv.weight
    with pytest.raises(ValueError, match=r"layers \['0', '1'\] share one weight but are different maps"):
        _choose(model)
    assert list(_choose(model, exclude=frozenset({"1"})).decayed) == ["0"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
def test_a_refused_choice_changes_nothing_and_is_refused_again_at_the_next_step():
    x, y = digits()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, beta=0.1)
    (xb, yb), *_ = batches(x, y, steps=1, size=16)
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    optimizer.step()
    decayed, norms = dict(optimizer.norm_decay.decayed), dict(optimizer.last_norms)
    model.append(nn.Linear(10, 0))  # an empty layer: no norm to regularize
    with pytest.raises(ValueError, match=r"layer '2' has an empty weight"):
        optimizer.add_param_group({"params": list(model[2].parameters())})
    assert optimizer.norm_decay.decayed == decayed and optimizer.last_norms.keys() == norms.keys()
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"layer '2' has an empty weight"):
        optimizer.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
