"""Hand-built specs: what torch refuses to build is refused at construction, by layer and field."""

from __future__ import annotations

import pytest
import torch
from helpers import brute_norms, explicit_matrix
from torch import nn

import normopt
from normopt import ConvSpec

BASE = dict(
    name="c", weight="c.weight", in_channels=4, out_channels=4, kernel_size=(3,), stride=(1,), padding=((1, 1),), dilation=(1,)
)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(transposed=True), r"output_padding has 0 axes, kernel has 1"),  # the dataclass default
        (dict(stride=(0,)), r"stride must hold ints of at least 1, got \(0,\)"),
        (dict(dilation=(0,)), r"dilation must hold ints of at least 1"),
        (dict(kernel_size=(0,)), r"kernel_size must hold ints of at least 1"),
        (dict(stride=(1.5,)), r"stride must hold ints"),
        (dict(stride=(True,)), r"stride must hold ints"),
        (dict(padding=((-1, -1),)), r"padding must hold ints of at least 0"),
        (dict(padding=((1,),)), r"padding must be one \(left, right\) pair per axis"),
        (dict(groups=0), r"groups must be an int of at least 1, got 0"),
        (dict(groups=3), r"groups=3 does not divide in_channels=4 and out_channels=4"),
        (dict(in_channels=-4), r"in_channels must be an int of at least 0"),
        (dict(output_padding=(1,)), r"output_padding \(1,\) is for transposed convolutions only"),
        (dict(transposed=True, padding=((0, 0),), output_padding=(1,)), r"output_padding 1 on axis 0 must be smaller"),
        (dict(transposed=True, padding=((0, 0),), output_padding=(-1,)), r"output_padding must hold ints of at least 0"),
    ],
)
@pytest.mark.parametrize("input_size", [(8,), None], ids=["sized", "limit"])
def test_a_hand_built_conv_spec_torch_would_refuse_is_refused_naming_the_layer_and_field(change, match, input_size):
    with pytest.raises(ValueError, match=rf"layer 'c': {match}"):
        ConvSpec(**{**BASE, "input_size": input_size, **change})


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv1d(4, 6, 3, padding=1, groups=2),
        nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.ConvTranspose1d(4, 4, 3, stride=1, dilation=3, output_padding=2),  # below the dilation
    ],
)
def test_the_specs_of_layers_torch_builds_are_accepted_and_give_their_matrix_norm(layer):
    spec = normopt.module_spec(layer, "c", (5,))
    norm = normopt.layer_norm({"c.weight": layer.weight.detach()}, spec, 1)
    expected = brute_norms(explicit_matrix(layer, (layer.in_channels, 5)))[1]
    torch.testing.assert_close(norm.double(), expected.double(), rtol=1e-5, atol=1e-7)
