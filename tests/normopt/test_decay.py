"""Subgradients of layer norms against the explicit-matrix oracle and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, conv_layers, deterministic_algorithms, explicit_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normopt
from normopt import Subgradient, autodiff_subgradient, layer_argmax, layer_norm, norm_subgradient, paper_update, reference_update


def _line_index(layer, spec, ord):
    """Row (l_inf) or column (l1) of the explicit matrix that the library says attains the norm."""
    found = layer_argmax({"layer.weight": layer.weight}, spec, ord)
    sizes = spec.output_size if ord == math.inf else spec.input_size  # rows index outputs, columns inputs
    flat = int(found.channel)
    for p, n in zip(found.position.tolist(), sizes):
        flat = flat * n + p
    return flat


@settings(max_examples=150)
@given(conv_layers(transposed=False, modes=("zeros", "circular", "reflect", "replicate")), st.sampled_from([1, math.inf]))
def test_subgradient_is_the_oracle_gradient_of_the_argmax_line(case, ord):
    layer, spec, input_shape = case
    layer = layer.double()
    weight = layer.weight.detach().clone().requires_grad_()
    matrix = explicit_matrix(layer, input_shape, weight)
    line_sums = matrix.abs().sum(1 if ord == math.inf else 0)
    index = _line_index(layer, spec, ord)
    (oracle,) = torch.autograd.grad(line_sums[index], weight)
    sub = norm_subgradient({"layer.weight": layer.weight}, spec, ord)
    assert_close(line_sums[index], line_sums.max(), rtol=1e-10)
    assert_close(sub.norm, line_sums.max(), rtol=1e-10)
    assert_close(sub.dense(layer.weight), oracle, rtol=1e-10)
    assert not (oracle.ne(0) & ~sub.support(layer.weight)).any(), "the subgradient leaves the arg-max line"


@settings(max_examples=200)
@given(conv_layers(transposed=False, modes=("zeros", "circular", "reflect", "replicate")), st.sampled_from([1, math.inf]))
def test_closed_form_agrees_with_autodiff(case, ord):
    """The sparse closed form and the vjp of the line sums give the same subgradient and line."""
    layer, spec, _ = case
    tensors = {"layer.weight": layer.weight.detach()}
    sub = norm_subgradient(tensors, spec, ord)
    grad, counts = autodiff_subgradient(tensors, spec, ord)
    assert_close(sub.dense(layer.weight), grad, rtol=1e-6)
    assert torch.equal(sub.support(layer.weight), counts > 0)
    assert sub.index.unique().numel() == sub.index.numel()


@settings(max_examples=60)
@given(conv_layers(transposed=True), st.sampled_from([1, math.inf]))
def test_transposed_subgradient_is_the_oracle_gradient(case, ord):
    layer, spec, input_shape = case
    layer = layer.double()
    weight = layer.weight.detach().clone().requires_grad_()
    line_sums = explicit_matrix(layer, input_shape, weight).abs().sum(1 if ord == math.inf else 0)
    (oracle,) = torch.autograd.grad(line_sums[_line_index(layer, spec, ord)], weight)
    assert_close(norm_subgradient({"layer.weight": layer.weight}, spec, ord).dense(layer.weight), oracle, rtol=1e-10)


@settings(max_examples=60)
@given(conv_layers(), st.sampled_from([1, math.inf]), st.integers(0, 2**31 - 1))
def test_subgradient_inequality_holds_for_random_directions(case, ord, seed):
    """Convexity: N(W + D) >= N(W) + <p, D> for every direction D."""
    layer, spec, _ = case
    weight = layer.weight.detach().double()
    sub = norm_subgradient({"layer.weight": weight}, spec, ord)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(5):
        direction = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        moved = layer_norm({"layer.weight": weight + direction}, spec, ord)
        assert moved >= sub.norm + (sub.dense(weight) * direction).sum() - 1e-9


@pytest.mark.parametrize("ord", [1, math.inf])
def test_subgradient_matches_central_finite_differences(ord):
    """At a point where the arg-max line is unique and has no zero weight, the norm is differentiable."""
    torch.manual_seed(3)
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    spec = normopt.module_spec(layer, "", (6, 6))
    weight = layer.weight.detach()
    sub = norm_subgradient({"weight": weight}, spec, ord)
    eps = 1e-6
    for _ in range(5):
        direction = torch.randn_like(weight)
        plus = layer_norm({"weight": weight + eps * direction}, spec, ord)
        minus = layer_norm({"weight": weight - eps * direction}, spec, ord)
        assert_close((plus - minus) / (2 * eps), (sub.dense(weight) * direction).sum(), rtol=1e-6, atol=1e-9)


def test_subgradient_agrees_with_autograd_of_the_norm_without_ties():
    torch.manual_seed(0)
    layer = nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=2, bias=False).double()
    spec = normopt.module_spec(layer, "", (9,))
    weight = layer.weight.detach().clone().requires_grad_()
    for ord in (1, math.inf):
        (autograd,) = torch.autograd.grad(layer_norm({"weight": weight}, spec, ord), weight)
        assert_close(norm_subgradient({"weight": weight}, spec, ord).dense(weight), autograd, rtol=1e-12)


def test_ties_go_to_the_first_line():
    spec = normopt.LinearSpec("fc", "w", in_features=2, out_features=2)
    weight = torch.tensor([[1.0, -1.0], [-2.0, 0.0]])  # both rows sum to 2
    sub = norm_subgradient({"w": weight}, spec, math.inf)
    assert torch.equal(sub.dense(weight), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    assert torch.equal(sub.support(weight), torch.tensor([[True, True], [False, False]]))


def test_batchnorm_subgradient_changes_gamma():
    layer = nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -3.0, 1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    spec = normopt.module_spec(layer)
    sub = norm_subgradient(layer.state_dict(), spec, 1)
    # |gamma| / sqrt(var): 0.5, 1.5, 2.0 (up to eps) -> channel 2, d/dgamma = sign / sqrt(var + eps)
    expected = torch.tensor([0.0, 0.0, 1 / math.sqrt(0.25 + layer.eps)])
    assert_close(sub.dense(layer.weight), expected, rtol=1e-6)
    assert torch.equal(sub.support(layer.weight), torch.tensor([False, False, True]))
    grad, _ = autodiff_subgradient(layer.state_dict(), spec, 1)
    assert_close(sub.dense(layer.weight), grad, rtol=1e-6)


def test_batchnorm_without_affine_and_spectral_order_are_refused():
    spec = normopt.module_spec(nn.BatchNorm1d(3, affine=False), "bn")
    with pytest.raises(ValueError, match=r"layer 'bn'.*nothing to regularize"):
        norm_subgradient(nn.BatchNorm1d(3, affine=False).state_dict(), spec, 1)
    linear = normopt.LinearSpec("fc", "w", 2, 2)
    with pytest.raises(ValueError, match=r"layer 'fc'.*l1 and l_inf"):
        norm_subgradient({"w": torch.ones(2, 2)}, linear, 2)


def test_buffer_rules_over_three_steps():
    def sub(index, value, on_line):
        return Subgradient(torch.tensor(1.0), torch.tensor(index), torch.tensor(value), torch.tensor(on_line))

    steps = [sub([0, 1], [1.0, 0.0], [1, 0]), sub([0, 1], [0.0, -1.0], [0, 1]), sub([0, 1], [1.0, 0.0], [1, 0])]
    h_paper, h_ref = torch.zeros(2), torch.zeros(2)
    for step in steps:
        h_paper = paper_update(h_paper, step, 0.5)
        h_ref = reference_update(h_ref, step, 0.5)
    # paper: 0.5*p1 -> 0.25*p1 + 0.5*p2 -> 0.125*p1 + 0.25*p2 + 0.5*p3
    assert_close(h_paper, torch.tensor([0.125 + 0.5, -0.25]))
    # reference: (1, 0) -> (0.5, -1) -> (1, -0.5)
    assert_close(h_ref, torch.tensor([1.0, -0.5]))


@pytest.mark.parametrize(
    ("weights", "buffer"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float32, torch.bfloat16)],
)
@pytest.mark.parametrize("update", [paper_update, reference_update])
def test_both_rules_keep_the_buffers_dtype_whatever_the_weights(update, weights, buffer):
    """A float32 h of bfloat16 weights (an accumulation buffer) stays float32 and equals the float64
    computation rounded once; paper_update refused it, reference_update some of the pairs."""
    torch.manual_seed(0)
    spec = normopt.LinearSpec("fc", "w", 4, 3)
    w = torch.randn(3, 4).to(weights)
    h = torch.randn(3, 4).to(buffer)
    got = update(h, norm_subgradient({"w": w}, spec, 1), 0.5)
    exact = update(h.double(), norm_subgradient({"w": w.double()}, spec, 1), 0.5)
    assert got.dtype == buffer
    assert_close(got, exact, rtol=torch.finfo(buffer).eps, atol=0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_reference_rule_gives_the_same_buffer_under_deterministic_algorithms(memory_format):
    torch.manual_seed(0)
    h = torch.randn(3, 2, 2, 2).to(memory_format=memory_format)
    sub = Subgradient(torch.tensor(1.0), torch.tensor([1, 9, 22]), torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1, 0, 1]))
    expected = reference_update(h, sub, 0.5)
    with deterministic_algorithms():  # where torch refuses put_
        assert torch.equal(reference_update(h, sub, 0.5), expected)
    assert expected.flatten()[22] == 3.0 and expected.flatten()[9] == h.flatten()[9] * 0.5


def test_masked_subgradient_changes_nothing():
    h = torch.tensor([1.0, 2.0, 3.0])
    bad = Subgradient(torch.tensor(float("nan")), torch.tensor([0, 1]), torch.tensor([float("nan"), 1.0]), torch.tensor([1, 1]))
    skip = bad.masked(torch.tensor(False))
    for update in (paper_update, reference_update):
        assert torch.equal(update(h, skip, torch.tensor(1.0)), h)


def test_subgradients_of_a_model_cover_every_layer():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    specs = normopt.layer_specs(model, torch.zeros(1, 2, 4, 4))
    subs = normopt.norm_subgradients(model.state_dict(), specs, 1)
    assert subs.keys() == specs.keys()
    norms = normopt.layer_norms(model.state_dict(), specs, 1)
    for name in specs:
        assert_close(subs[name].norm, norms[name])
