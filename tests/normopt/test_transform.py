"""norm_decay, the batched transformation: equal to the per-layer closed form and to the oracle, compilable."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import pickle

import numpy as np
import pytest
import torch
from helpers import assert_close, conv_layers, explicit_matrix, graph_recorder, rings_everywhere
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normopt
from normopt import norm_decay, norm_subgradient, paper_update, reference_update
from normopt.lines import line_plan
from normopt.recent_slices import DENSE, RING_MAX_LENGTH, covered, horizon

# h is kept in the weight's dtype; the per-layer rule and the scaled buffer round differently.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
MODES = ("zeros", "zeros", "circular", "reflect", "replicate")


@st.composite
def layer_sets(draw):
    """One to three convolutions (transposed ones too), maybe a linear layer and a batch norm,
    as ``({name: layer}, {name: spec}, {key: tensor})``, with keys ``"<name>.weight"``."""
    layers, specs = {}, {}
    for i in range(draw(st.integers(1, 3))):
        transposed = i > 0 and draw(st.booleans())
        layer, spec, _ = draw(conv_layers(transposed=True) if transposed else conv_layers(modes=MODES))
        name = f"c{i}"
        layers[name], specs[name] = layer, dataclasses.replace(spec, name=name, weight=f"{name}.weight")
    if draw(st.booleans()):
        layers["fc"] = nn.Linear(draw(st.integers(1, 6)), draw(st.integers(1, 6))).to(
            draw(st.sampled_from([torch.float32, torch.float64]))
        )
        specs["fc"] = normopt.module_spec(layers["fc"], "fc")
    if draw(st.booleans()):
        bn = nn.BatchNorm1d(draw(st.integers(1, 5)))
        with torch.no_grad():
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.1, 3)
        layers["bn"], specs["bn"] = bn, normopt.module_spec(bn, "bn")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.weight"] = layer.weight.detach().clone()
        if isinstance(layer, nn.BatchNorm1d):
            tensors[f"{name}.running_var"] = layer.running_var.clone()
    return layers, specs, tensors


def _step_per_layer(tensors, specs, h, ord, rule, beta, gamma):
    """The per-layer closed form: subgradient, buffer rule, and the gradient it adds."""
    added, norms = {}, {}
    for name, spec in specs.items():
        sub = norm_subgradient(tensors, spec, ord)
        update = paper_update if rule == "paper" else reference_update
        h[name] = update(h[name], sub, gamma)
        added[name] = (beta / len(specs) if rule == "paper" else beta) * h[name]
        norms[name] = sub.norm
    return added, norms


@settings(max_examples=80, deadline=None)
@given(
    layer_sets(),
    st.sampled_from([1, math.inf]),
    st.sampled_from(["paper", "reference"]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_batched_update_equals_the_per_layer_closed_form(case, ord, rule, gamma, seed, ring):
    _, specs, tensors = case
    with rings_everywhere() if ring else contextlib.nullcontext():
        transform = norm_decay(specs, ord=ord, rule=rule, max_gamma=max(gamma, 0.5))
        state = transform.init(tensors)
    if ring and rule == "paper" and gamma <= 0.9:
        assert set(state.recent) == set(_ring_eligible(specs, ord))
    elif not ring or rule == "reference":
        assert not state.recent
    _check_against_the_closed_form(transform, state, specs, tensors, ord, rule, [gamma] * 3, seed)


def _ring_eligible(specs, ord) -> list[str]:
    """The layers a ring can serve: rows of any layer but batch norms."""
    plans = {name: line_plan(spec, ord) for name, spec in specs.items()}
    return [name for name, p in plans.items() if not p.batchnorm and p.kind == "rows"]


def _check_against_the_closed_form(transform, state, specs, tensors, ord, rule, gammas, seed, beta=0.3):
    """Step ``transform`` once per gamma beside the per-layer closed form, moving the weights between steps."""
    h = {name: torch.zeros_like(tensors[spec.weight]) for name, spec in specs.items()}
    generator = torch.Generator().manual_seed(seed)
    for gamma in gammas:
        grads = {spec.weight: torch.zeros_like(tensors[spec.weight]) for spec in specs.values()}
        expected, norms = _step_per_layer(tensors, specs, h, ord, rule, beta, gamma)
        grads, state, found = transform.update(grads, state, tensors, beta=beta, gamma=gamma)
        for name, spec in specs.items():
            rtol = TOLERANCE[tensors[spec.weight].dtype]
            assert_close(found[name], norms[name], rtol=1e-6, msg=f"norm of {name}")
            assert_close(state.decay_buffer(name), h[name], rtol=rtol, atol=rtol, msg=f"h of {name}")
            assert_close(grads[spec.weight], expected[name], rtol=rtol, atol=rtol * beta, msg=f"gradient of {name}")
        for key, tensor in tensors.items():  # move the weights so that the arg-max lines change
            if key.endswith(".weight"):
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
                tensor.add_(noise)
    return state


@settings(max_examples=25, deadline=None)
@given(layer_sets(), st.sampled_from([1, math.inf]), st.sampled_from([0.0, 0.3, 0.5]), st.integers(0, 2**31 - 1))
def test_rings_of_recent_slices_add_what_the_dense_buffer_holds_past_their_length(case, ord, gamma, seed):
    """60 steps: past the rings' length (24 steps in float32, 53 in float64), slices leave them."""
    _, specs, tensors = case
    with rings_everywhere():
        transform = norm_decay(specs, ord=ord, rule="paper")
        state = transform.init(tensors)
    assert set(state.recent) == set(_ring_eligible(specs, ord))
    state = _check_against_the_closed_form(transform, state, specs, tensors, ord, "paper", [gamma] * 60, seed)
    assert all(sparse for sparse, ring in zip(state.sparse, state.rings) if ring is not None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 2, 3, 8, 24, 25, 53, 75, 158, RING_MAX_LENGTH])
def test_covered_is_the_largest_gamma_whose_horizon_is_the_rings_length(dtype, length):
    gamma = covered(length, dtype)
    assert horizon(gamma, dtype) == length
    assert (horizon(math.nextafter(gamma, 1.0), dtype) or math.inf) > length


@pytest.mark.parametrize("length", [0, RING_MAX_LENGTH + 1])
def test_covered_refuses_a_length_no_ring_has(length):
    with pytest.raises(ValueError, match=rf"a ring's length must be in \[1, {RING_MAX_LENGTH}\], got {length}"):
        covered(length, torch.float32)


def test_a_gamma_above_the_rings_makes_this_and_every_later_step_dense():
    torch.manual_seed(0)
    layers = {"c": nn.Conv2d(3, 5, 3, padding=1), "fc": nn.Linear(4, 6)}
    specs = {"c": normopt.module_spec(layers["c"], "c", (6, 6)), "fc": normopt.module_spec(layers["fc"], "fc")}
    specs = {name: dataclasses.replace(spec, weight=f"{name}.weight") for name, spec in specs.items()}
    tensors = {f"{name}.weight": layer.weight.detach().clone() for name, layer in layers.items()}
    with rings_everywhere():
        transform = norm_decay(specs, ord=math.inf, rule="paper", max_gamma=0.5)
        state = transform.init(tensors)
    assert set(state.recent) == {"c", "fc"}
    # At 0.9 a slice 24 steps old still weighs 0.9**24 = 8%: a ring sized for 0.5 would drop it.
    gammas = [0.5] * 5 + [0.9] * 40 + [0.2] * 5
    state = _check_against_the_closed_form(transform, state, specs, tensors, math.inf, "paper", gammas, 3)
    assert state.sparse == (False,)
    assert all(bool((ring == DENSE).all()) for ring in state.recent.values())


def test_rings_stay_sparse_up_to_the_largest_gamma_their_length_covers():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, padding=1)
    specs = {"c": dataclasses.replace(normopt.module_spec(layer, "c", (6, 6)), weight="c.weight")}
    tensors = {"c.weight": layer.weight.detach().clone()}
    with rings_everywhere():
        transform = norm_decay(specs, ord=math.inf, rule="paper", max_gamma=0.8)
        state = transform.init(tensors)
    assert state.recent["c"].shape == (75,)
    limit = covered(75, torch.float32)  # a little above 0.8: 75 steps still bring it under half an ulp
    assert 0.8 < limit
    state = _check_against_the_closed_form(transform, state, specs, tensors, math.inf, "paper", [limit] * 90, 4)
    assert state.sparse == (True,)
    gammas = [limit] * 3 + [math.nextafter(limit, 1.0)] * 2
    state = _check_against_the_closed_form(transform, transform.init(tensors), specs, tensors, math.inf, "paper", gammas, 5)
    assert state.sparse == (False,)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.one_of(conv_layers(transposed=False, modes=MODES), conv_layers(transposed=True)), min_size=1, max_size=3),
    st.sampled_from([1, math.inf]),
)
def test_first_reference_step_is_the_oracle_gradient_of_the_argmax_line(cases, ord):
    """With gamma = 0 the reference rule's buffer is the subgradient itself: for every layer of a
    batch (convs and transposed convs computed together), the gradient of its explicit matrix's
    arg-max line, and its norm the matrix's largest line sum."""
    layers = {f"layer{i}": layer.double() for i, (layer, _, _) in enumerate(cases)}
    specs = {
        f"layer{i}": dataclasses.replace(spec, name=f"layer{i}", weight=f"layer{i}.weight")
        for i, (_, spec, _) in enumerate(cases)
    }
    tensors = {f"{name}.weight": layer.weight.detach() for name, layer in layers.items()}
    transform = norm_decay(specs, ord=ord, rule="reference")
    state = transform.init(tensors)
    _, state, norms = transform.update({}, state, tensors, beta=1.0, gamma=0.0)
    for (name, layer), (_, spec, input_shape) in zip(layers.items(), cases):
        weight = layer.weight.detach().clone().requires_grad_()
        line_sums = explicit_matrix(layer, input_shape, weight).abs().sum(1 if ord == math.inf else 0)
        assert_close(norms[name], line_sums.max(), rtol=1e-10, msg=name)
        found = normopt.layer_argmax(tensors, specs[name], ord)
        sizes = spec.output_size if ord == math.inf else spec.input_size
        index = int(found.channel)
        for p, n in zip(found.position.tolist(), sizes):
            index = index * n + p
        (oracle,) = torch.autograd.grad(line_sums[index], weight)
        assert_close(line_sums[index], line_sums.max(), rtol=1e-10, msg=name)
        assert_close(state.decay_buffer(name), oracle, rtol=1e-10, msg=name)


def _eager_and_compiled(transform, specs, tensors, compile, *, ring: bool, steps: int):
    """``steps`` updates from the same start, eager then through ``compile(transform.update)``:
    per run, ``(grads, norms, decay buffers, state)``."""
    results = []
    for update in (transform.update, compile(transform.update)):
        with rings_everywhere() if ring else contextlib.nullcontext():
            state = transform.init(tensors)
        torch.manual_seed(1)
        grads = {spec.weight: torch.randn_like(tensors[spec.weight]) for spec in specs.values()}
        with torch.no_grad():
            for _ in range(steps):
                grads, state, norms = update(grads, state, tensors, beta=0.1, gamma=0.5)
        results.append((grads, norms, {name: state.decay_buffer(name) for name in specs}, state))
    return results


def _assert_runs_equal(eager, compiled):
    for a, b in zip(eager[:3], compiled[:3]):
        for key in a:
            assert_close(b[key], a[key], rtol=1e-6, msg=key)


def _aot_eager(update):
    return torch.compile(update, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize(("ord", "ring"), [(1, False), (math.inf, False), (math.inf, True)], ids=["l1", "linf", "linf-ring"])
def test_compiled_update_equals_eager(ord, rule, ring):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.Flatten(), nn.Linear(36, 5)
    )
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 8, 8))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    transform = norm_decay(specs, ord=ord, rule=rule)
    eager, compiled = _eager_and_compiled(transform, specs, tensors, _aot_eager, ring=ring, steps=2)
    assert bool(eager[3].recent) == bool(compiled[3].recent) == (ring and rule == "paper")
    _assert_runs_equal(eager, compiled)


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_an_update_called_with_grad_mode_on_keeps_no_autograd_history(ord):
    """With the model's parameters as the weights, as the README builds them, and grad mode on."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh graph, not a recompile with dynamic shapes after the tests before
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 10))
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 8, 8))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    transform = norm_decay(specs, ord=ord)
    runs = []
    for update in (transform.update, _aot_eager(transform.update)):  # fullgraph failed to compile
        state = transform.init(tensors)
        grads = {spec.weight: torch.ones_like(tensors[spec.weight]) for spec in specs.values()}
        for _ in range(3):
            grads, state, norms = update(grads, state, tensors, beta=0.1, gamma=0.5)
            requiring_grad = tensors["3.weight"] * 0.0 + state.decay_buffer("3")
            state = transform.load(state, "3", requiring_grad)  # loads without its history too
        held = [*state.buffers, *state.scales, *grads.values(), *norms.values()]
        assert not any(t.requires_grad for t in held)
        runs.append((grads, {name: state.decay_buffer(name) for name in specs}))
    for a, b in zip(*runs):
        for key in a:
            assert_close(b[key], a[key], rtol=1e-6, msg=key)


def _filled(specs, tensors, value: float) -> dict:
    return {spec.weight: torch.full_like(tensors[spec.weight], float(value)) for spec in specs.values()}


@pytest.mark.parametrize("per_layer", ["beta", "gamma"])
def test_a_compiled_update_given_per_layer_floats_compiles_once_for_the_same_values(per_layer):
    """A schedule builds ``{layer: value}`` anew each step: new float objects, the same values."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 3))
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 8, 8))
    tensors = {name: p.detach() for name, p in model.named_parameters()}
    transform = norm_decay(specs, ord=1)
    graphs, backend = graph_recorder(then="aot_eager")
    update = torch.compile(transform.update, fullgraph=True, backend=backend)
    state, twin = transform.init(tensors), transform.init(tensors)
    for step in range(torch._dynamo.config.recompile_limit + 2):
        values = {name: float(f"0.{i + 2}") for i, name in enumerate(specs)}  # new objects every call
        hyper = {"beta": 0.1, "gamma": 0.5, per_layer: values}
        grads, state, _ = update(_filled(specs, tensors, step), state, tensors, **hyper)
        expected, twin, _ = transform.update(_filled(specs, tensors, step), twin, tensors, **hyper)  # eager
        for key in grads:
            assert_close(grads[key], expected[key], rtol=1e-6, msg=key)
    assert len(graphs) == 1


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_compiled_update_takes_each_buffer_once_as_an_input(ord):
    # Views of a buffer entering the graph beside it, as inputs aliasing a mutated one, made
    # AOTAutograd copy every buffer and copy it back: 3x the eager step under inductor.
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 8, 8))
    tensors = dict(model.named_parameters())
    transform = norm_decay(specs, ord=ord)
    with rings_everywhere():
        state = transform.init(tensors)
    inputs = []

    def backend(graph, example_inputs):
        inputs.extend(t for t in example_inputs if isinstance(t, torch.Tensor))
        return graph.forward

    grads = {spec.weight: torch.randn_like(tensors[spec.weight]) for spec in specs.values()}
    with torch.no_grad():
        torch.compile(transform.update, fullgraph=True, backend=backend)(grads, state, tensors, beta=0.1, gamma=0.5)
    storages = [t.untyped_storage().data_ptr() for t in inputs]
    for flat in (*state.buffers, *state.scales):
        assert storages.count(flat.untyped_storage().data_ptr()) == 1


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_compiled_update_equals_eager_where_rows_are_summed_pattern_by_pattern(rule):
    """3x3 kernels on 2x2 maps: every row reads one corner of its kernel, four patterns, which a
    compiled update sums one masked reduction each (normopt.lines._masked_row_sums)."""
    import torch._dynamo

    torch._dynamo.reset()  # a fresh graph, not a recompile with dynamic shapes after the tests before
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(16, 5))
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 2, 2))
    assert [line_plan(specs[n], math.inf).patterns for n in ("0", "1")] == [4, 4]
    tensors = dict(model.named_parameters())
    transform = norm_decay(specs, ord=math.inf, rule=rule)
    _assert_runs_equal(*_eager_and_compiled(transform, specs, tensors, _aot_eager, ring=True, steps=3))


def test_compiled_ring_adds_go_through_one_opaque_operator_per_layer():
    """Inductor lowers ``index_add_`` to an atomic add per element (3.7 ms a step for the ring layers
    of torchvision's ResNet-18, 0.9 eager): compiled, each ring layer's rows are added by the custom
    operator normopt::add_recent_rows, which runs torch's own kernel, and the result is eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(144, 5))
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 8, 8))
    tensors = dict(model.named_parameters())
    transform = norm_decay(specs, ord=math.inf)
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile = lambda update: torch.compile(update, fullgraph=True, backend=backend)
    eager, compiled = _eager_and_compiled(transform, specs, tensors, compile, ring=True, steps=3)
    (graph,) = graphs
    calls = [node for node in graph.graph.nodes if node.op in ("call_function", "call_method")]
    assert sum(node.target is torch.ops.normopt.add_recent_rows.default for node in calls) == len(compiled[3].recent) == 3
    assert not any(node.target in ("index_add_", torch.Tensor.index_add_) for node in calls)
    _assert_runs_equal(eager, compiled)


def test_channels_last_weights_give_the_same_update():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    spec = normopt.module_spec(conv, "c", (9, 9))
    plain = {"c.weight": conv.weight.detach().clone()}
    last = {"c.weight": plain["c.weight"].to(memory_format=torch.channels_last)}
    assert not last["c.weight"].is_contiguous()
    for ord in (1, math.inf):
        results = []
        for tensors in (plain, last):
            transform = norm_decay({"c": spec}, ord=ord)
            grads = {"c.weight": torch.ones_like(tensors["c.weight"])}
            grads, _, norms = transform.update(grads, transform.init(tensors), tensors, beta=1.0, gamma=0.5)
            results.append((grads["c.weight"], norms["c"]))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_non_finite_weights_add_no_new_subgradient():
    layer = nn.Linear(3, 2)
    spec = normopt.module_spec(layer, "fc")
    tensors = {"fc.weight": layer.weight.detach().clone()}
    transform = norm_decay({"fc": spec}, ord=1, rule="paper")
    state = transform.init(tensors)
    _, state, _ = transform.update({}, state, tensors, beta=1.0, gamma=0.5)
    before = state.decay_buffer("fc")
    tensors["fc.weight"][0, 0] = float("nan")
    grads = {"fc.weight": torch.zeros(2, 3)}
    grads, state, norms = transform.update(grads, state, tensors, beta=1.0, gamma=0.5)
    assert torch.isnan(norms["fc"])
    assert_close(state.decay_buffer("fc"), 0.5 * before)  # decayed, nothing added
    assert torch.isfinite(grads["fc.weight"]).all()


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_non_finite_weights_that_no_line_reads_leave_the_decay_buffer_finite(ord):
    """On 1x1 maps only the centre tap of a 3x3 kernel enters the matrix: a NaN elsewhere leaves the
    norm exact and finite (the line sums leave that tap out), and h finite there (no line has it)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    spec = normopt.module_spec(conv, "c", (1, 1))
    tensors = {"c.weight": conv.weight.detach().clone()}
    tensors["c.weight"][:, :, 0, 0] = float("nan")
    transform = norm_decay({"c": spec}, ord=ord)
    grads = {"c.weight": torch.zeros_like(tensors["c.weight"])}
    grads, state, norms = transform.update(grads, transform.init(tensors), tensors, beta=1.0, gamma=0.5)
    assert_close(norms["c"], tensors["c.weight"][:, :, 1, 1].abs().sum(1 if ord == math.inf else 0).max())
    h = state.decay_buffer("c")
    assert torch.isfinite(h).all() and torch.isfinite(grads["c.weight"]).all()
    assert h[:, :, 1, 1].abs().sum() > 0 and h[:, :, 0, 0].abs().sum() == 0


@pytest.mark.parametrize(
    ("specs", "kwargs", "match"),
    [
        ({}, {}, "specs is empty"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"ord": 2}, "supports ord 1"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"rule": "adam"}, "unknown rule"),
        ({"bn": normopt.BatchNormSpec("bn", None, "v", 2, 1e-5)}, {}, "nothing to regularize"),
        ([normopt.LinearSpec("fc", "w", 2, 2)], {}, "specs must be a mapping"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"sparse": "no"}, "sparse must be True or False"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"layer_count": 0}, "layer_count must be an int of at least the 1"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"layer_count": 2.0}, "layer_count must be an int"),
        ({"fc": normopt.LinearSpec("fc", "w", 2, 2)}, {"layer_count": True}, "layer_count must be an int"),
    ],
)
def test_bad_arguments_are_refused(specs, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        norm_decay(specs, **kwargs)


def _small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(256, 10))
    specs = normopt.layer_specs(model, torch.zeros(1, 1, 8, 8))
    return model, specs, {key: value.clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."], ids=["ddp", "compiled", "compiled-ddp"])
@pytest.mark.parametrize("grads_prefixed", [True, False], ids=["grads-prefixed", "grads-plain"])
def test_a_wrapped_models_mapping_gets_the_decay_in_its_gradients(ord, prefix, grads_prefixed):
    _, specs, tensors = _small_model()
    transform = norm_decay(specs, ord=ord)
    grads = {specs[n].weight: torch.zeros_like(tensors[specs[n].weight]) for n in specs}
    expected, _, _ = transform.update(copy.deepcopy(grads), transform.init(tensors), tensors, beta=0.1, gamma=0.5)
    wrapped = {prefix + key: value for key, value in tensors.items()}
    given = {(prefix if grads_prefixed else "") + key: value for key, value in grads.items()}
    got, _, _ = transform.update(given, transform.init(wrapped), wrapped, beta=0.1, gamma=0.5)
    for key, value in expected.items():
        assert value.abs().sum() > 0 and torch.equal(got[(prefix if grads_prefixed else "") + key], value), key


def test_update_refuses_by_layer_weights_and_gradients_that_do_not_fit_its_state():
    _, specs, tensors = _small_model()
    transform = norm_decay(specs)
    state = transform.init(tensors)
    grads = {"0.weight": torch.zeros(4, 1, 3, 3)}
    for changed, match in (
        ({"0.weight": torch.zeros(4, 1, 3, 4)}, r"layer '0': weight of shape \(4, 1, 3, 4\)"),
        ({"3.weight": torch.zeros(10, 256, dtype=torch.float64)}, r"layer '3': weight .*torch.float64.*made for"),
        ({"3.weight": 0.5}, r"layer '3': its weight is a float"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            transform.update(grads, state, {**tensors, **changed}, beta=0.1, gamma=0.5)
    for grad, match in (
        (torch.zeros(36), r"gradient of shape \(36,\)"),
        (torch.zeros(4, 1, 3, 3, dtype=torch.int64), r"gradient .*torch.int64"),
    ):
        with pytest.raises(ValueError, match=rf"layer '0': {match}"):
            transform.update({"0.weight": grad}, state, tensors, beta=0.1, gamma=0.5)
    other = norm_decay({"3": specs["3"]})
    other.init(tensors)
    with pytest.raises(ValueError, match="not made by this transformation's init"):
        other.update(grads, state, tensors, beta=0.1, gamma=0.5)
    assert not grads["0.weight"].any()  # nothing was added before the refusals


def test_a_refusal_in_any_batch_changes_no_other_batch():
    """Batches (one per device and dtype) are all checked before any is decayed."""
    _, specs, tensors = _small_model()
    tensors["0.weight"] = tensors["0.weight"].double()  # a batch of its own, decayed first
    transform = norm_decay(specs)
    state = transform.init(tensors)
    grads = {"0.weight": torch.zeros(4, 1, 3, 3, dtype=torch.float64), "3.weight": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"layer '3': gradient of shape \(7,\)"):
        transform.update(grads, state, tensors, beta=0.1, gamma=0.5)
    assert not grads["0.weight"].any() and not state.decay_buffer("0").any()


@pytest.mark.parametrize(
    "other",
    [
        lambda specs: norm_decay({"3": specs["3"], "0": specs["0"], "1": specs["1"]}),  # the same layers in another order
        lambda specs: norm_decay(specs, ord=math.inf),  # the other norm
    ],
    ids=["order", "ord"],
)
def test_a_state_made_by_another_transformation_is_refused(other):
    """Buffers of the same sizes are not the same layout: each layer would be decayed with another's h."""
    _, specs, tensors = _small_model()
    transform, foreign = norm_decay(specs), other(specs)
    state = foreign.init(tensors)
    transform.init(tensors)
    with pytest.raises(ValueError, match="not made by this transformation's init"):
        transform.update({}, state, tensors, beta=0.1, gamma=0.5)


@pytest.mark.parametrize("ring", [False, True], ids=["dense", "ring"])
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_float32_gradients_of_bfloat16_weights_and_numpy_hyperparameters_are_taken(ord, ring):
    """Through a ring too: its index_add_ needs the gradient's dtype (a large layer's float32
    gradients of bfloat16 weights raised there, after h was written)."""
    import numpy as np

    _, specs, tensors = _small_model()
    tensors = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in tensors.items()}
    transform = norm_decay(specs, ord=ord)
    added = {}
    for dtype in (torch.bfloat16, torch.float32):  # float32 accumulation buffers of bfloat16 weights
        grads = {specs[n].weight: torch.zeros(tensors[specs[n].weight].shape, dtype=dtype) for n in specs}
        with rings_everywhere() if ring else contextlib.nullcontext():
            state = transform.init(tensors)
        assert any(r is not None for r in state.rings) == (ring and ord == math.inf)
        grads, _, _ = transform.update(grads, state, tensors, beta=np.float32(0.1), gamma=np.float32(0.5))
        added[dtype] = grads
    for key, value in added[torch.float32].items():
        assert value.dtype == torch.float32 and value.abs().sum() > 0
        assert_close(value, added[torch.bfloat16][key].float(), rtol=1e-2, atol=1e-3, msg=key)


@pytest.mark.parametrize(
    ("beta", "gamma", "match"),
    [
        (0.1, 2.0, r"gamma must be a finite number in \[0, 1\], got 2.0"),
        (0.1, -1, "gamma must be"),
        (0.1, float("nan"), "gamma must be"),
        (0.1, "0.5", "gamma must be"),
        (0.1, None, "gamma must be"),
        (float("nan"), 0.5, "beta must be a finite number"),
        (float("inf"), 0.5, "beta must be"),
        (True, 0.5, "beta must be"),
        ("0.1", 0.5, "beta must be"),
        ({"0": 0.1, "1": 0.1, "3": float("nan")}, 0.5, "beta of layer '3' must be"),
    ],
)
def test_update_refuses_a_beta_or_gamma_that_is_not_a_finite_number_in_its_range(beta, gamma, match):
    _, specs, tensors = _small_model()
    transform = norm_decay(specs)
    with pytest.raises(ValueError, match=match):
        transform.update({}, transform.init(tensors), tensors, beta=beta, gamma=gamma)


def test_load_refuses_by_layer_what_does_not_fit():
    _, specs, tensors = _small_model()
    transform = norm_decay(specs)
    state = transform.init(tensors)
    for args, error, match in (
        (("conv0", torch.zeros(4, 1, 3, 3)), KeyError, r"no layer 'conv0' here; the layers are \['0', '1', '3'\]"),
        (("0", torch.zeros(1)), ValueError, r"layer '0': decay buffer of shape \(1,\), expected \(4, 1, 3, 3\)"),
        (("0", torch.zeros(4, 1, 3, 3, dtype=torch.complex64)), TypeError, "layer '0': the decay buffer must be a real"),
        (("0", torch.zeros(4, 1, 3, 3), torch.ones(2)), ValueError, r"layer '0': decay scale of shape \(2,\)"),
        (("0", torch.full((4, 1, 3, 3), float("nan"))), ValueError, "layer '0': the decay buffer has values that are not finite"),
        # finite in float64, not in the float32 state
        (("0", torch.full((4, 1, 3, 3), 1e300, dtype=torch.float64)), ValueError, r"not finite in torch.float32"),
    ):
        with pytest.raises(error, match=match):
            transform.load(state, *args)
    assert all(not state.decay_buffer(name).any() for name in specs)


def test_a_state_copied_leaf_by_leaf_is_refused_before_it_decays_with_a_stale_h():
    """A NamedTuple is a pytree: tree_map(clone) gave the views storage of their own, and the update
    wrote h into the buffers but added the stale views to the gradients (h frozen, silently)."""
    from torch.utils import _pytree as pytree

    _, specs, tensors = _small_model()
    transform = norm_decay(specs)
    state = transform.init(tensors)
    grads = {specs[n].weight: torch.zeros_like(tensors[specs[n].weight]) for n in specs}
    _, state, _ = transform.update(dict(grads), state, tensors, beta=0.1, gamma=0.5)
    copied = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)
    with pytest.raises(ValueError, match="views are not views of its buffers: copied leaf by leaf"):
        transform.update(dict(grads), copied, tensors, beta=0.1, gamma=0.5)
    transform.update(dict(grads), copy.deepcopy(state), tensors, beta=0.1, gamma=0.5)  # the way to copy one


@pytest.mark.parametrize("grads_none", [True, False])
def test_grads_or_weights_that_are_not_a_mapping_are_refused_by_name(grads_none):
    _, specs, tensors = _small_model()
    transform = norm_decay(specs)
    state = transform.init(tensors)
    args = (None, state, tensors) if grads_none else ({}, state, list(tensors.values()))
    what, got = ("grads", "NoneType") if grads_none else ("tensors", "list")
    with pytest.raises(TypeError, match=rf"norm_decay.update: {what} must be a mapping \{{name: tensor\}}, got {got}"):
        transform.update(*args, beta=0.1, gamma=0.5)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_a_state_that_went_through_pickle_updates_as_the_original(how):
    _, specs, tensors = _small_model()
    with rings_everywhere():
        transform = norm_decay(specs, ord=math.inf)
        state = transform.init(tensors)
    zeros = lambda: {specs[n].weight: torch.zeros_like(tensors[specs[n].weight]) for n in specs}
    for _ in range(3):
        transform.update(zeros(), state, tensors, beta=0.1, gamma=0.5)
    if how == "pickle":
        copied = pickle.loads(pickle.dumps(state))
    elif how == "deepcopy":
        copied = copy.deepcopy(state)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    for name, (b, scale) in copied.views.items():  # views of the copy's buffers, as the original's
        assert any(b._base is flat for flat in copied.buffers) and any(scale._base is flat for flat in copied.scales), name
    assert copied.recent and all(any(row._base is ring for ring in copied.rings) for row in copied.recent.values())
    expected, state, _ = transform.update(zeros(), state, tensors, beta=0.1, gamma=0.5)
    got, copied, _ = transform.update(zeros(), copied, tensors, beta=0.1, gamma=0.5)
    for key, value in expected.items():
        assert value.abs().sum() > 0 and torch.equal(got[key], value), key
    for name in specs:
        assert torch.equal(copied.decay_buffer(name), state.decay_buffer(name)), name


def test_an_empty_weight_is_refused_by_name():
    transform = norm_decay({"fc": normopt.LinearSpec("fc", "w", 0, 3)})
    with pytest.raises(ValueError, match=r"layer 'fc' has an empty weight \(3, 0\)"):
        transform.init({"w": torch.zeros(3, 0)})


def test_complex_weights_are_refused_by_name():
    transform = norm_decay({"fc": normopt.LinearSpec("fc", "w", 2, 2)})
    with pytest.raises(TypeError, match=r"layer 'fc'.*(real floating-point|norms are of real weights)"):
        transform.init({"w": torch.zeros(2, 2, dtype=torch.complex64)})


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize(("ord", "ring"), [(1, False), (math.inf, True)], ids=["l1", "linf-ring"])
@pytest.mark.parametrize(("per_layer", "dtype"), [(False, torch.float64), (True, torch.float64), (False, torch.bfloat16)])
def test_a_tensor_beta_gives_the_float_betas_update(ord, ring, rule, per_layer, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 5))
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 8, 8))
    tensors = dict(model.named_parameters())
    transform = norm_decay(specs, ord=ord, rule=rule)
    as_tensors = {name: torch.tensor(0.1 * (i + 1) if per_layer else 0.1, dtype=dtype) for i, name in enumerate(specs)}
    floats = {name: float(value) for name, value in as_tensors.items()}  # a bfloat16 beta is divided in float32 as a float is
    if not per_layer:
        as_tensors = dict.fromkeys(specs, as_tensors[next(iter(specs))])  # one tensor shared by every layer
    runs = []
    for beta in (floats, as_tensors):
        with rings_everywhere() if ring else contextlib.nullcontext():
            state = transform.init(tensors)
        torch.manual_seed(1)
        grads = {spec.weight: torch.randn_like(tensors[spec.weight]) for spec in specs.values()}
        with torch.no_grad():
            for _ in range(3):
                grads, state, _ = transform.update(grads, state, tensors, beta=beta, gamma=0.5)
        runs.append(grads)
    assert bool(state.recent) == (ring and rule == "paper")
    for key, value in runs[0].items():
        assert value.dtype == torch.float32
        assert_close(runs[1][key], value, rtol=1e-6, msg=key)


def _rebuilt(value):
    """``value`` (a number, a tensor, or ``{layer: value}``) with the same values as new objects of
    another type (NumPy floats, which an update takes as Python's)."""
    if isinstance(value, dict):
        return {name: _rebuilt(v) for name, v in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else np.float64(value)


def _set_first(mapping: dict, value) -> None:
    mapping[next(iter(mapping))] = value


# (beta, gamma, what changes them in place after the first step)
_CHANGED_IN_PLACE = {
    "beta-dict-entry": (lambda s: dict.fromkeys(s, 0.1), lambda s: 0.5, lambda beta, gamma: _set_first(beta, 0.3)),
    "gamma-dict-entry": (lambda s: 0.1, lambda s: dict.fromkeys(s, 0.5), lambda beta, gamma: _set_first(gamma, 0.25)),
    "tensor-beta": (lambda s: torch.tensor(0.1), lambda s: 0.5, lambda beta, gamma: beta.fill_(0.3)),
    "tensor-beta-entry": (
        lambda s: dict.fromkeys(s, torch.tensor(0.1)),
        lambda s: 0.5,
        lambda beta, gamma: _set_first(beta, torch.tensor(0.3)),
    ),
    "beta-zero-to-negative-zero": (lambda s: dict.fromkeys(s, 0.0), lambda s: 0.5, lambda beta, gamma: _set_first(beta, -0.0)),
}


@pytest.mark.parametrize("change", list(_CHANGED_IN_PLACE))
@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_hyperparameters_changed_in_place_between_updates_are_read_anew(change, ord):
    # A per-step cache of the resolved values (keyed on the objects handed in) must not miss a
    # mapping changed in place, a tensor filled, or 0.0 turned -0.0: each update reads them anew,
    # as it reads new objects of the same values.
    _, specs, tensors = _small_model()
    make_beta, make_gamma, mutate = _CHANGED_IN_PLACE[change]
    runs = []
    for rebuilt in (False, True):
        transform = norm_decay(specs, ord=ord)
        state = transform.init(tensors)
        given_beta, given_gamma = make_beta(specs), make_gamma(specs)
        steps = []
        for step in range(3):
            if step == 1:
                mutate(given_beta, given_gamma)
            # -0.0 gradients: a -0.0 beta leaves their sign, a 0.0 one does not
            grads = {spec.weight: torch.full_like(tensors[spec.weight], -0.0) for spec in specs.values()}
            args = (_rebuilt(given_beta), _rebuilt(given_gamma)) if rebuilt else (given_beta, given_gamma)
            grads, state, _ = transform.update(grads, state, tensors, beta=args[0], gamma=args[1])
            steps.append(grads)
        runs.append(steps)
    for step, (got, expected) in enumerate(zip(*runs)):
        for key, value in expected.items():
            assert torch.equal(got[key], value) and torch.equal(got[key].signbit(), value.signbit()), (step, key)


def test_a_tensor_gamma_or_an_unusable_tensor_beta_is_refused_by_layer_before_anything_changes():
    transform = norm_decay({"fc": normopt.LinearSpec("fc", "w", 2, 2)})
    tensors = {"w": torch.ones(2, 2)}
    state = transform.init(tensors)
    with pytest.raises(TypeError, match=r"beta of layer 'fc' as a tensor must be 0-d"):
        transform.update({"w": torch.zeros(2, 2)}, state, tensors, beta=torch.ones(1), gamma=0.5)
    with pytest.raises(TypeError, match=r"gamma of layer 'fc' must be a number, not a tensor"):
        transform.update({"w": torch.zeros(2, 2)}, state, tensors, beta=0.1, gamma=torch.tensor(0.5))
    before = state.decay_buffer("fc").clone(), state.scales[0].clone()
    with pytest.raises(ValueError, match=r"beta of layer 'fc' is a tensor on meta"):
        transform.update({"w": torch.zeros(2, 2)}, state, tensors, beta=torch.tensor(0.1, device="meta"), gamma=0.5)
    assert torch.equal(state.decay_buffer("fc"), before[0]) and torch.equal(state.scales[0], before[1])


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_layer_count_is_the_n_that_the_paper_rule_shares_beta_among(rule):
    spec = normopt.LinearSpec("fc", "w", 3, 4)
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    added = {}
    for name, count in (("default", None), ("4", 4), ("numpy 4", np.int64(4))):
        transform = normopt.norm_decay({"fc": spec}, rule=rule, layer_count=count)
        grads = {"w": torch.zeros(4, 3)}
        transform.update(grads, transform.init({"w": weight}), {"w": weight}, beta=0.5, gamma=0.0)
        added[name] = grads["w"]
    assert torch.count_nonzero(added["default"]) > 0
    # The reference rule adds beta h whatever N is.
    expected = added["default"] / 4 if rule == "paper" else added["default"]
    torch.testing.assert_close(added["4"], expected, rtol=0, atol=0)
    assert torch.equal(added["numpy 4"], added["4"])  # a NumPy integer counts as the int
