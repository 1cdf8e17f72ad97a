"""Line plans: the Kronecker pattern tables, the slice layout, the released summation order."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import assert_close, conv_layers, explicit_matrix
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normopt
from normopt.lines import flat_line_sums, line_plan, line_sums, line_tables


@settings(max_examples=80, deadline=None)
@given(conv_layers(modes=("zeros", "circular", "reflect", "replicate")), st.sampled_from([1, math.inf]))
def test_each_channel_slice_holds_exactly_the_entries_of_its_lines(case, ord):
    """The slice of channel c, built from slice_base and slice_offsets, is the set of kernel entries
    whose line-sum gradient is non-zero for some line of that channel (with all weights 1)."""
    _, spec, _ = case
    plan = line_plan(spec, ord)
    weight = torch.ones(plan.shape, dtype=torch.float64, requires_grad=True)
    sums = line_sums(weight, plan, line_tables(plan, weight.device, weight.dtype))
    for channel in range(plan.channels):
        (grad,) = torch.autograd.grad(sums[channel].sum(), weight, retain_graph=True)
        touched = set(grad.reshape(-1).nonzero().flatten().tolist())
        index = set(plan.slice_index(torch.tensor(channel)).tolist())
        assert touched <= index and len(index) == plan.slice_size


def test_released_order_gathers_a_patterns_taps_column_by_column():
    spec = normopt.module_spec(nn.Conv2d(2, 3, 3, stride=2, padding=1), "c", (8, 8))
    plan = line_plan(spec, 1, released_order=True)
    assert {frozenset(t) for t in plan.released_taps} == {frozenset(i for i, c in enumerate(r) if c) for r in plan.counts}
    assert (0, 6, 2, 8) in plan.released_taps  # corners: column 0 (taps 0, 6), then column 2 (2, 8)
    assert line_plan(spec, math.inf, released_order=True).released_taps is None  # rows need no reordering
    weight = torch.randn(plan.shape, dtype=torch.float64)
    fast, released = line_plan(spec, 1), plan
    for p in (fast, released):
        assert p.lines == 2 * 4  # two input channels, four residue patterns
    torch.testing.assert_close(
        line_sums(weight, released, line_tables(released, weight.device, weight.dtype)),
        line_sums(weight, fast, line_tables(fast, weight.device, weight.dtype)),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_summed_in_float32(dtype):
    spec = normopt.LinearSpec("fc", "w", 4096, 1)
    weight = torch.full((1, 4096), 0.1, dtype=dtype)
    plan = line_plan(spec, math.inf)
    sums = line_sums(weight, plan, line_tables(plan, weight.device, weight.dtype))
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, torch.tensor([[4096 * float(weight[0, 0])]]))


@settings(max_examples=60, deadline=None)
@given(st.one_of(conv_layers(), conv_layers(transposed=True)), st.sampled_from([1, math.inf]))
def test_line_sums_through_scratch_equal_the_explicit_matrix(case, ord):
    """The step writes ``|W|`` into a scratch buffer instead of a fresh tensor: every line sum
    still equals the abs-sum of its row or column of the explicit matrix."""
    module, spec, input_shape = case
    plan = line_plan(spec, ord)
    weight = module.weight.detach().to(torch.float64)
    tables = line_tables(plan, weight.device, weight.dtype)
    whole = flat_line_sums(weight, plan, tables)
    through_scratch = flat_line_sums(weight, plan, tables, torch.empty_like(weight))
    assert_close(through_scratch, whole, rtol=1e-12)
    matrix = explicit_matrix(module.double(), input_shape)
    brute = matrix.abs().sum(1 if ord == math.inf else 0).max()
    assert_close(through_scratch.max(), brute, rtol=1e-10)


UNREAD = {  # a layer with taps no line reads, its input size, the norm, the taps read, their box
    "3x3 on 1x1, rows": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (1, 1), math.inf, (4,), (1, 2)),
    "stride 2 on 2x2, rows": (lambda: nn.Conv2d(3, 4, 3, 2, 1, bias=False), (2, 2), math.inf, (4, 5, 7, 8), (1, 3)),
    "taps 0 and 4, rows": (lambda: nn.Conv1d(2, 2, 5, stride=4, padding=4, bias=False), (1,), math.inf, (0, 4), None),
    "3x3 on 1x1, columns": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (1, 1), 1, (4,), None),
    "transposed, columns": (lambda: nn.ConvTranspose1d(2, 2, 3, padding=1, bias=False), (1,), math.inf, (1,), None),
    "every tap read": (lambda: nn.Conv2d(3, 4, 3, 2, 1, bias=False), (3, 3), math.inf, (), None),
}


@pytest.mark.parametrize("case", list(UNREAD))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_line_sums_leave_out_the_taps_no_line_reads(case, compiled):
    """A kernel larger than its input has taps no line reads: the sums leave them out (poisoned with
    NaN here), eager and compiled, and equal the explicit matrix's, whose entries never involve
    them. Where the rows read a box of taps, that box is all they read (LinePlan.read_taps)."""
    import torch._dynamo

    make, size, ord, read, box = UNREAD[case]
    torch.manual_seed(0)
    layer = make().double()
    plan = line_plan(normopt.module_spec(layer, "c", size), ord)
    assert plan.read == read
    assert plan.read_taps == (None if box is None else (slice(None), slice(None), *[slice(*box)] * len(size)))
    weight = layer.weight.detach().clone()
    if read:
        unread = [t for t in range(plan.taps) if t not in read]
        weight.view(*weight.shape[:2], -1)[:, :, unread] = float("nan")
    matrix = explicit_matrix(layer, (layer.in_channels, *size), torch.nan_to_num(weight, nan=0.0))
    expected = matrix.abs().sum(1 if ord == math.inf else 0).max()
    tables = line_tables(plan, weight.device, weight.dtype)
    sums = flat_line_sums
    if compiled:
        torch._dynamo.reset()
        sums = torch.compile(flat_line_sums, backend="aot_eager", fullgraph=True)
    last = weight.to(memory_format=torch.channels_last) if weight.dim() == 4 else weight
    for w, scratch in ((weight, None), (weight, torch.empty_like(weight)), (last, torch.empty(last.shape, dtype=last.dtype))):
        lines_ = sums(w, plan, tables, scratch)
        assert lines_.shape == (plan.lines,) and torch.isfinite(lines_).all()
        assert_close(lines_.max(), expected, rtol=1e-12)


MASKED = {  # rows of a few patterns, none reading the whole kernel: (layer, input size, ord, patterns, masked)
    "3x3 on 2x2": (lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False), (2, 2), math.inf, 4, True),
    "grouped, 3x3 on 2x3": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (2, 3), math.inf, 2, True),
    "kernel 5 on 3": (lambda: nn.Conv1d(2, 2, 5, padding=2, bias=False), (3,), math.inf, 3, True),
    "taps 0 and 4 (unread taps)": (lambda: nn.Conv1d(2, 2, 5, stride=4, padding=4, bias=False), (1,), math.inf, 2, True),
    "transposed, l1": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, padding=1, bias=False), (2,), 1, 2, True),
    "3x3x3 on 2x2x2 (taps kept apart)": (lambda: nn.Conv3d(2, 2, 3, padding=1, bias=False), (2, 2, 2), math.inf, 8, False),
}


@pytest.mark.parametrize("case", list(MASKED))
def test_compiled_rows_of_few_patterns_are_summed_pattern_by_pattern(case):
    """Compiled, rows of at most MASKED_PATTERNS patterns are summed one masked reduction per
    pattern (inductor vectorises those; a sum keeping the taps apart it does not): the graph holds
    one ``where`` per pattern, and the sums equal the eager ones and the explicit matrix's, with
    the taps no row reads poisoned with NaN."""
    import torch._dynamo

    make, size, ord, patterns, masked = MASKED[case]
    torch.manual_seed(0)
    layer = make().double()
    plan = line_plan(normopt.module_spec(layer, "c", size), ord)
    assert (plan.kind, plan.patterns) == ("rows", patterns)
    weight = layer.weight.detach().clone()
    if plan.read:
        unread = [t for t in range(plan.taps) if t not in plan.read]
        weight.view(*weight.shape[:2], -1)[:, :, unread] = float("nan")
    tables = line_tables(plan, weight.device, weight.dtype)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(flat_line_sums, backend=backend, fullgraph=True)(weight, plan, tables)
    wheres = sum(node.op == "call_function" and node.target is torch.where for node in graphs[0].graph.nodes)
    assert wheres == (patterns if masked else 0)
    assert torch.isfinite(compiled).all()
    assert_close(compiled, flat_line_sums(weight, plan, tables), rtol=1e-12)
    matrix = explicit_matrix(layer, (layer.in_channels, *size), torch.nan_to_num(weight, nan=0.0))
    assert_close(compiled.max(), matrix.abs().sum(1 if ord == math.inf else 0).max(), rtol=1e-12)


def test_a_new_plan_compiles_whole():
    """A plan's derived sizes are filled when it is made: read first inside a compiled region,
    cached_property's lock broke the graph (Python < 3.12)."""
    import torch._dynamo

    spec = normopt.module_spec(nn.Conv2d(3, 4, 3, padding=1), "c", (5, 5))
    plan = dataclasses.replace(line_plan(spec, 1), name="new")  # no size of it read yet
    tables = line_tables(plan, torch.device("cpu"), torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(line_sums, backend="eager", fullgraph=True)(weight, plan, tables)
    assert_close(compiled, line_sums(weight, plan, tables), rtol=1e-12)


@settings(max_examples=40, deadline=None)  # about one geometry in thirteen has unread taps
@given(st.one_of(conv_layers(), conv_layers(transposed=True)), st.sampled_from([1, math.inf]))
def test_compiled_line_sums_equal_eager_and_the_explicit_matrix(case, ord):
    """Compiled, row sums read only the box of taps some row reads (LinePlan.read_taps): over
    generated geometries, small inputs included, they equal the eager sums and the oracle's."""
    import torch._dynamo

    module, spec, input_shape = case
    plan = line_plan(spec, ord)
    weight = module.weight.detach().to(torch.float64)
    tables = line_tables(plan, weight.device, weight.dtype)
    torch._dynamo.reset()  # a fresh graph per geometry, not an eager fallback past the recompile limit
    compiled = torch.compile(flat_line_sums, backend="aot_eager", fullgraph=True)(weight, plan, tables)
    assert_close(compiled, flat_line_sums(weight, plan, tables), rtol=1e-12)
    matrix = explicit_matrix(module.double(), input_shape)
    assert_close(compiled.max(), matrix.abs().sum(1 if ord == math.inf else 0).max(), rtol=1e-10)
