"""Projections: the l1-ball projection is Euclidean, layer caps hold against the oracle norms."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_close, brute_norms, conv_layers, explicit_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normopt
from normopt import project_batchnorm, project_batchnorm_argmax, project_l1_ball, project_layer


@settings(max_examples=200)
@given(st.integers(1, 8), st.floats(0.05, 5.0), st.integers(0, 2**31 - 1))
def test_l1_ball_projection_is_the_nearest_point_of_the_ball(length, radius, seed):
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(3, length, generator=generator, dtype=torch.float64) * 3
    w = project_l1_ball(v, radius)
    assert (w.abs().sum(-1) <= radius * (1 + 1e-12) + 1e-12).all()
    inside = v.abs().sum(-1) <= radius
    assert torch.equal(w[inside], v[inside])
    # No point of the ball is nearer: compare with random feasible points and the radial shrink.
    for _ in range(20):
        z = torch.randn(3, length, generator=generator, dtype=torch.float64)
        z = (
            z
            * torch.clamp(radius / z.abs().sum(-1, keepdim=True), max=1)
            * torch.rand(3, 1, generator=generator, dtype=torch.float64)
        )
        assert ((w - v).norm(dim=-1) <= (z - v).norm(dim=-1) + 1e-12).all()
    shrink = v * torch.clamp(radius / v.abs().sum(-1, keepdim=True), max=1)
    assert ((w - v).norm(dim=-1) <= (shrink - v).norm(dim=-1) + 1e-12).all()


@settings(max_examples=150)
@given(conv_layers(transposed=False), st.sampled_from([1, math.inf]), st.floats(0.05, 1.0))
def test_projected_conv_norm_is_at_most_the_radius(case, ord, fraction):
    layer, spec, input_shape = case
    layer = layer.double()
    radius = float(normopt.layer_norm({"layer.weight": layer.weight.detach()}, spec, ord)) * fraction + 1e-3
    with torch.no_grad():
        layer.weight.copy_(project_layer(layer.weight, spec, ord, radius))
    oracle = brute_norms(explicit_matrix(layer, input_shape))[ord]
    assert oracle <= radius * (1 + 1e-9)


@settings(max_examples=60)
@given(conv_layers(transposed=True), st.sampled_from([1, math.inf]))
def test_projected_transposed_conv_norm_is_at_most_the_radius(case, ord):
    layer, spec, input_shape = case
    layer = layer.double()
    radius = 0.5
    with torch.no_grad():
        layer.weight.copy_(project_layer(layer.weight, spec, ord, radius))
    assert brute_norms(explicit_matrix(layer, input_shape))[ord] <= radius * (1 + 1e-9)


@settings(max_examples=80)
@given(conv_layers(transposed=False), st.sampled_from([1, math.inf]), st.sampled_from([torch.bfloat16, torch.float16]))
def test_a_low_precision_kernel_is_projected_inside_the_ball(case, ord, dtype):
    """Projected in float32 and rounded towards zero: the low-precision kernel's exact norm (its
    explicit matrix in float64) is inside the ball to float32's round-off, not to its own ulps."""
    layer, spec, input_shape = case
    weight = (layer.weight.detach() * 4).to(dtype)
    radius = 0.25
    projected = project_layer(weight, spec, ord, radius)
    assert projected.dtype == dtype
    with torch.no_grad():
        layer.weight.copy_(projected.to(layer.weight.dtype))
    assert brute_norms(explicit_matrix(layer, input_shape))[ord] <= radius * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_l1_ball_projection_is_the_float64_one_rounded_towards_zero(dtype):
    torch.manual_seed(0)
    v = torch.randn(16, 1024).to(dtype)
    projected = project_l1_ball(v, 1.0)
    exact = project_l1_ball(v.double(), 1.0)
    assert (projected.double().abs().sum(-1) <= 1.0 + 1e-6).all()
    assert (projected.double().abs() <= exact.abs() + 1e-6).all()  # no entry rounded away from zero
    assert_close(projected, exact, rtol=0, atol=2 * torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_projection_compiled_by_inductor_rounds_as_eager(dtype):
    """Inductor keeps low-precision intermediates in float32: a cast and a step back where it
    rounded up moved nothing there, and rows came out 0.2% outside the ball."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor needs a C++ compiler")
    torch._dynamo.reset()
    torch.manual_seed(0)
    v = torch.randn(64, 1024).to(dtype)
    eager = project_l1_ball(v, 1.0)
    compiled = torch.compile(project_l1_ball, backend="inductor", fullgraph=True)(v, 1.0)
    assert torch.equal(compiled, eager)
    assert (compiled.double().abs().sum(-1) <= 1.0 + 1e-6).all()


def test_a_nonfinite_tap_that_no_line_reads_does_not_stop_the_projection():
    """A 3x3 kernel on a 1x1 map reads its centre tap only: a NaN in a corner leaves the norm finite,
    so the projection caps it, and leaves the corner as it is."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False).double()
    spec = normopt.module_spec(conv, "c", (1, 1))
    weight = conv.weight.detach() * 10
    weight[0, 0, 0, 0] = float("nan")
    projected = project_layer(weight, spec, math.inf, 1.0)
    assert projected[0, 0, 0, 0].isnan()
    with torch.no_grad():
        conv.weight.copy_(projected.nan_to_num())  # the tap is never read: any value gives the same matrix
    assert_close(brute_norms(explicit_matrix(conv, (4, 1, 1)))[math.inf], 1.0, rtol=1e-12)
    read = weight.clone()
    read[0, 0, 1, 1] = float("nan")  # the centre tap: read by every row, so nothing is changed
    assert torch.equal(project_layer(read, spec, math.inf, 1.0).nan_to_num(), read.nan_to_num())


def test_projection_is_the_exact_projection_of_a_single_pattern_layer():
    """With one interior pattern per channel each row slice is projected as a whole."""
    torch.manual_seed(1)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    spec = normopt.module_spec(nn.Conv2d(3, 4, 3, padding=1), "", (8, 8))
    projected = project_layer(weight, spec, math.inf, 1.0)
    assert_close(projected.reshape(4, -1), project_l1_ball(weight.reshape(4, -1), 1.0))


def test_layers_inside_the_ball_are_unchanged():
    weight = torch.full((2, 2, 3), 0.01)
    spec = normopt.module_spec(nn.Conv1d(2, 2, 3), "", (5,))
    assert torch.equal(project_layer(weight, spec, 1, 10.0), weight)


def test_folded_padding_is_refused_by_name():
    spec = normopt.module_spec(nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect"), "odd", (4,))
    with pytest.raises(ValueError, match=r"layer 'odd'.*reflect"):
        project_layer(torch.ones(1, 1, 3), spec, 1, 1.0)


def test_batchnorm_projection_caps_every_channel():
    layer = nn.BatchNorm1d(4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([10.0, -10.0, 0.1, 3.0]))
        layer.running_var.copy_(torch.tensor([1.0, 4.0, 1.0, 0.01]))
    spec = normopt.module_spec(layer)
    with torch.no_grad():
        layer.weight.copy_(project_batchnorm(layer.weight, layer.running_var, spec, 5.0))
    assert normopt.layer_norm(layer.state_dict(), spec, 1) <= 5.0 * (1 + 1e-6)
    assert layer.weight[2].item() == pytest.approx(0.1)  # inside: untouched
    assert layer.weight[1] < 0  # the sign is kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("project", [project_batchnorm, project_batchnorm_argmax])
def test_a_low_precision_batchnorm_is_capped_inside_the_radius(dtype, project):
    """The cap in float32, rounded towards zero: in gamma's own dtype it rounded up as often as
    down (10 on a variance of 3 capped at 1 came out 1.0013 in bfloat16)."""
    torch.manual_seed(0)
    gamma = (torch.randn(64) * 10).to(dtype)
    gamma[0] = 10.0
    running_var = torch.rand(64) * 4 + 0.01
    running_var[0] = 3.0
    spec = normopt.BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=64, eps=1e-5)
    radius = 1.0
    projected = project(gamma, running_var, spec, radius)
    assert projected.dtype == dtype
    scale = torch.sqrt(running_var.double() + spec.eps)
    norms = projected.double().abs() / scale
    before = gamma.double().abs() / scale
    touched = projected != gamma
    assert touched.any() and (norms[touched] <= radius * (1 + 1e-6)).all()
    assert (norms[touched] >= radius * (1 - 2 * torch.finfo(dtype).eps)).all()  # rounded by one ulp at most
    assert torch.equal(projected[before <= radius], gamma[before <= radius])  # inside: untouched
    assert torch.equal(projected.sign(), gamma.sign())
    if project is project_batchnorm:
        assert (norms <= radius * (1 + 1e-6)).all()
    # One channel, 10 on a variance of 3: the arg-max cap alone (1.734375 before, in bfloat16).
    one = normopt.BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=1, eps=0.0)
    single = project(torch.tensor([-10.0], dtype=dtype), torch.tensor([3.0]), one, radius)
    assert -radius * 3**0.5 <= single.double().item() < 0
    two = normopt.BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=2, eps=0.0)
    zero = project(torch.tensor([-0.0, 20.0], dtype=dtype), torch.ones(2), two, radius)
    assert torch.signbit(zero[0])  # -0.0 stays -0.0


@pytest.mark.parametrize("radius", [-1.0, -1e-30, float("nan")])
def test_a_tensor_radius_below_zero_or_nan_leaves_every_projection_unchanged(radius):
    """A 0-d tensor radius is never read on the host (no sync), so it cannot be refused: one that a
    schedule took below zero turned whole kernels into NaN, and capped batch-norm gammas to a
    wrong sign. With no ball to project onto, the input comes back as it is."""
    torch.manual_seed(0)
    radius = torch.tensor(radius)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    spec = normopt.module_spec(conv, "c", (5, 5))
    for ord in (1, math.inf):
        assert torch.equal(project_layer(conv.weight.detach(), spec, ord, radius), conv.weight)
    rows = torch.tensor([[2.0, -1.0], [0.5, 0.25]])
    assert torch.equal(project_l1_ball(rows, radius), rows)
    bn, gamma = normopt.module_spec(nn.BatchNorm2d(3), "bn"), torch.tensor([2.0, -3.0, 0.5])
    for project in (project_batchnorm, project_batchnorm_argmax):
        assert torch.equal(project(gamma, torch.ones(3), bn, radius), gamma)
    # Compiled, the radius stays a tensor (a CPU one is read otherwise; an accelerator's never is).
    torch._dynamo.reset()
    compiled = torch.compile(project_l1_ball, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(rows, radius), rows)
    assert torch.equal(compiled(rows, torch.tensor(2.0)), project_l1_ball(rows, 2.0))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_rows_that_are_not_real_floating_point_are_refused_naming_their_dtype(dtype):
    with pytest.raises(TypeError, match=rf"project_l1_ball projects real floating-point rows, got {dtype}"):
        project_l1_ball(torch.ones(2, 3, dtype=dtype), 1.0)


def test_a_tensor_radius_of_zero_projects_onto_the_zero_map():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    spec, zero = normopt.module_spec(conv, "c", (5, 5)), torch.tensor(0.0)
    for ord in (1, math.inf):
        assert not project_layer(conv.weight.detach(), spec, ord, zero).any()
    assert not project_l1_ball(torch.tensor([[2.0, -1.0]]), zero).any()
    bn = normopt.module_spec(nn.BatchNorm2d(2), "bn")
    assert not project_batchnorm(torch.tensor([2.0, -3.0]), torch.ones(2), bn, zero).any()


@pytest.mark.parametrize("radius", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_radius_that_is_not_a_positive_finite_number_is_refused(radius):
    with pytest.raises(ValueError, match="radius must be a positive finite number"):
        project_l1_ball(torch.ones(2), radius)
    conv = nn.Conv2d(2, 3, 3)
    with pytest.raises(ValueError, match=r"layer 'c': radius must be a positive finite number"):
        project_layer(conv.weight, normopt.module_spec(conv, "c", (5, 5)), 1, radius)
    bn = normopt.module_spec(nn.BatchNorm2d(3), "bn")
    for project in (project_batchnorm, project_batchnorm_argmax):
        with pytest.raises(ValueError, match=r"layer 'bn': radius must be a positive finite number"):
            project(torch.ones(3), torch.ones(3), bn, radius)


def test_a_projection_refuses_by_layer_what_does_not_fit_its_spec():
    conv = nn.Conv2d(2, 3, 3)
    spec = normopt.module_spec(conv, "c", (5, 5))
    with pytest.raises(ValueError, match=r"layer 'c': weight of shape \(3, 2, 3, 4\), its spec's is \(3, 2, 3, 3\)"):
        project_layer(torch.ones(3, 2, 3, 4), spec, "linf", 1.0)  # one tap was left above the radius
    bn = normopt.module_spec(nn.BatchNorm2d(3), "bn")
    with pytest.raises(TypeError, match=r"layer 'bn' is described by a BatchNormSpec: project_layer caps linear and conv"):
        project_layer(torch.ones(3), bn, 1, 1.0)
    for project in (project_batchnorm, project_batchnorm_argmax):
        with pytest.raises(ValueError, match=r"layer 'bn': gamma of shape \(1,\), expected \(3,\)"):
            project(torch.ones(1), torch.ones(3), bn, 1.0)  # it was broadcast
    with pytest.raises(ValueError, match="v is 0-d"):
        project_l1_ball(torch.tensor(2.0), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("row", "radius"), [([3e4, 0.5], 1e-3), ([1.0, 0.5], 1e-8), ([1.0, 0.5, 0.25], 1e-30)])
def test_a_radius_below_half_an_ulp_of_the_largest_entry_is_projected_not_raised(row, radius, dtype):
    """u_1 - radius rounded to u_1, no entry counted, and gather(-1) raised inside the step."""
    v = torch.tensor([row], dtype=dtype)
    if not torch.isfinite(v).all() or (v == 0).any():
        pytest.skip("not representable in this dtype")
    projected = project_l1_ball(v, radius)
    assert projected.dtype == dtype and torch.isfinite(projected).all()
    assert projected.double().abs().sum() <= radius * (1 + 1e-6)
    assert (projected.sign() * v.sign() >= 0).all()
    if radius < torch.finfo(dtype).tiny:
        return  # the radius itself is below the dtype's normal numbers
    # The exact projection keeps the largest entry alone, at the radius (all zero before).
    exact = torch.zeros(len(row), dtype=torch.float64)
    exact[0] = radius
    assert_close(projected.double()[0], exact, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_a_max_norm_far_below_a_weight_caps_it_in_the_step():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(torch.bfloat16)
    with torch.no_grad():
        model[0].weight[0, 0, 1, 1] = 3e7
    optimizer = normopt.NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        max_norm=1.0,
        example_input=torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16),
    )
    model(torch.zeros(2, 1, 4, 4, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()  # raised: index -1 is out of bounds
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16))
    norms = normopt.layer_norms(model.state_dict(), specs, 1)
    assert all(float(n) <= 1.0 * (1 + 1e-6) for n in norms.values())


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("ord", ["l1", "linf"])
@pytest.mark.parametrize(
    ("make", "size"),
    [(lambda: nn.Linear(4, 0), None), (lambda: nn.Linear(0, 3), None), (lambda: nn.Conv2d(2, 0, 3, padding=1), (5, 5))],
    ids=["no outputs", "no inputs", "conv"],
)
def test_an_empty_layer_is_the_zero_map_and_comes_back_as_it_is(make, size, ord):
    """layer_norms gives an empty layer norm 0; project_layer crashed in a reshape, naming nothing (review)."""
    layer = make()
    spec = normopt.module_spec(layer, "empty", size)
    weight = layer.weight.detach()
    projected = project_layer(weight, spec, ord, 1.0)
    assert projected.shape == weight.shape and projected is not weight


@pytest.mark.parametrize("radius", [np.float32(0.5), np.float64(0.5)])
def test_a_numpy_radius_is_a_radius(radius):
    """np.float32 was refused with "radius must be a positive finite number, got np.float32(0.5)" (review)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    spec = normopt.module_spec(conv, "c", (4, 4))
    weight = conv.weight.detach()
    assert torch.equal(project_layer(weight, spec, "l1", radius), project_layer(weight, spec, "l1", 0.5))
    assert torch.equal(project_l1_ball(weight.flatten(1), radius), project_l1_ball(weight.flatten(1), 0.5))
