"""The norm functions against the explicit matrix of the real PyTorch layer, over generated geometries."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from helpers import DTYPES, RTOL, assert_close, brute_norms, conv_layers, explicit_matrix, graph_recorder, host_reads
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normopt
from normopt import layer_argmax, layer_norm, layer_specs


def _check_against_oracle(layer, spec, input_shape):
    dtype = layer.weight.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about 'same' with even kernels
        oracle = brute_norms(explicit_matrix(layer, input_shape))
    tensors = {"layer.weight": layer.weight}
    for ord in (1, math.inf):
        assert_close(layer_norm(tensors, spec, ord), oracle[ord], rtol=RTOL[dtype], msg=f"ord={ord} {spec}")
        argmax = layer_argmax(tensors, spec, ord)
        lines, sizes = (oracle["row_sums"], spec.output_size) if ord == math.inf else (oracle["column_sums"], spec.input_size)
        if spec.transposed:
            sizes = spec.input_size if ord == 1 else spec.output_size
        flat = argmax.channel * math.prod(sizes) + _ravel(argmax.position, sizes)
        assert_close(lines[flat], oracle[ord], rtol=RTOL[dtype], msg=f"arg-max of ord={ord} {spec}")


def _ravel(position, sizes):
    flat = 0
    for p, n in zip(position.tolist(), sizes):
        assert 0 <= p < n
        flat = flat * n + p
    return flat


@settings(max_examples=1000)
@given(conv_layers())
def test_zero_padded_conv_matches_explicit_matrix(case):
    _check_against_oracle(*case)


@settings(max_examples=400)
@given(conv_layers(transposed=True))
def test_transposed_conv_matches_explicit_matrix(case):
    _check_against_oracle(*case)


@settings(max_examples=600)
@given(conv_layers(modes=("circular", "reflect", "replicate")))
def test_circular_reflect_replicate_match_explicit_matrix(case):
    _check_against_oracle(*case)


@settings(max_examples=300)
@given(st.one_of(conv_layers(modes=("zeros", "circular", "reflect", "replicate")), conv_layers(transposed=True)))
def test_norms_inside_autocast_are_the_exact_norms(case):
    """A training step under one ``torch.autocast`` region calls the norms inside it; autocast would
    run their products with the 0/1 tap tables in bfloat16."""
    layer, spec, input_shape = case
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check_against_oracle(layer, spec, input_shape)
        tensors = {"layer.weight": layer.weight.detach()}
        inside = [normopt.norm_subgradient(tensors, spec, ord) for ord in (1, math.inf)]
        batched = [normopt.layer_norms(tensors, {"layer": spec}, ord)["layer"] for ord in (1, math.inf)]
    outside = [normopt.norm_subgradient(tensors, spec, ord) for ord in (1, math.inf)]
    for ours, theirs, norm in zip(inside, outside, batched):
        assert torch.equal(ours.norm, theirs.norm) and torch.equal(norm, theirs.norm)
        assert torch.equal(ours.values, theirs.values) and torch.equal(ours.index, theirs.index)


def _large_sizes(spec, extra):
    """Input sizes n0 + r per axis, r over one period of the stride, n0 past every edge effect."""
    n0 = [
        3 * (sum(p) + d * (k - 1) + 2 * s) + 1 + extra
        for p, d, k, s in zip(spec.padding, spec.dilation, spec.kernel_size, spec.stride)
    ]
    shifts = torch.cartesian_prod(*[torch.arange(s) for s in spec.stride]).reshape(-1, len(spec.stride))
    return [tuple(n + r for n, r in zip(n0, shift.tolist())) for shift in shifts]


@settings(max_examples=80)
@given(conv_layers(modes=("zeros", "circular", "reflect", "replicate"), dims=(1,)), st.integers(0, 3))
def test_unknown_input_size_is_the_supremum_over_large_explicit_matrices(case, extra):
    """input_size=None equals the largest norm of the explicit matrices of large 1-D inputs."""
    layer, spec, _ = case
    limit = normopt.module_spec(layer, "layer")
    oracles = [brute_norms(explicit_matrix(layer, (spec.in_channels, *size))) for size in _large_sizes(spec, extra)]
    for ord in (1, math.inf):
        largest = max(oracle[ord] for oracle in oracles)
        assert_close(
            layer_norm({"layer.weight": layer.weight}, limit, ord),
            largest,
            rtol=RTOL[layer.weight.dtype],
            msg=f"ord={ord} {spec}",
        )


@settings(max_examples=60)
@given(conv_layers(modes=("zeros", "circular", "reflect", "replicate"), dims=(2, 3)), st.integers(0, 3))
def test_unknown_input_size_pools_the_axes_of_multi_dimensional_layers(case, extra):
    """In 2-D and 3-D the limit is the largest norm over every combination of per-axis sizes."""
    layer, spec, _ = case
    tensors = {"layer.weight": layer.weight}
    limit = normopt.module_spec(layer, "layer")
    for ord in (1, math.inf):
        largest = max(layer_norm(tensors, normopt.module_spec(layer, "layer", size), ord) for size in _large_sizes(spec, extra))
        assert_close(layer_norm(tensors, limit, ord), largest, rtol=RTOL[layer.weight.dtype], msg=f"ord={ord} {spec}")


@settings(max_examples=60)
@given(conv_layers(), st.integers(0, 1))
def test_large_input_limit_bounds_every_input_size_with_zero_padding(case, _):
    layer, spec, _input_shape = case
    tensors = {"layer.weight": layer.weight}
    limit = normopt.module_spec(layer, "layer")
    for ord in (1, math.inf):
        assert layer_norm(tensors, limit, ord) >= layer_norm(tensors, spec, ord) * (1 - RTOL[layer.weight.dtype])


def test_large_input_limit_is_attained_by_a_large_explicit_matrix():
    """One direct check of the limit against a brute-force matrix on a 1-D input of 40 samples."""
    layer = nn.Conv1d(2, 3, 4, stride=3, padding=2, dilation=2, bias=False).double()
    oracle = brute_norms(explicit_matrix(layer, (2, 40)))
    for ord in (1, math.inf):
        assert_close(layer_norm(layer.state_dict(), normopt.module_spec(layer, ""), ord), oracle[ord], rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 2)])
def test_linear_matches_explicit_matrix(shape, dtype):
    layer = nn.Linear(shape[1], shape[0]).to(dtype)
    spec = normopt.module_spec(layer)
    oracle = brute_norms(explicit_matrix(layer, (shape[1],)))
    for ord in (1, math.inf, 2):
        assert_close(layer_norm(layer.state_dict(), spec, ord), oracle[ord], rtol=RTOL[dtype])


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_matches_explicit_matrix(dims, affine):
    layer = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](4, eps=1e-3, affine=affine)
    with torch.no_grad():
        layer.running_var.uniform_(0.1, 3.0)
        layer.running_mean.normal_()
        if affine:
            layer.weight.normal_()
    spec = normopt.module_spec(layer)
    oracle = brute_norms(explicit_matrix(layer, (4,) + (2,) * dims))
    for ord in (1, math.inf, 2):
        assert_close(layer_norm(layer.state_dict(), spec, ord), oracle[ord], rtol=1e-6)
    assert layer_argmax(layer.state_dict(), spec, 1).channel == oracle["column_sums"].argmax() // 2**dims


def test_norms_are_differentiable_and_return_0d_tensors():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2))
    specs = layer_specs(model, torch.zeros(1, 2, 4, 4))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    norms = normopt.layer_norms(tensors, specs, "linf")
    assert all(n.dim() == 0 for n in norms.values())
    sum(norms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("weight"))


@pytest.mark.parametrize("ord", [1, math.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
        lambda: nn.Conv2d(2, 4, 2, groups=2, dilation=2, padding=1, padding_mode="circular"),
        lambda: nn.ConvTranspose1d(2, 3, 3, stride=2),
    ],
)
def test_gradient_is_the_oracle_subgradient_of_the_argmax_line(make, ord):
    """Autograd of the norm equals the gradient of the explicit matrix's arg-max row / column sum."""
    torch.manual_seed(0)
    layer = make().double()
    spec = normopt.module_spec(layer, "", (5,) * len(layer.kernel_size))
    weight = layer.weight.detach().clone().requires_grad_()
    (ours,) = torch.autograd.grad(layer_norm({"weight": weight}, spec, ord), weight)
    matrix = explicit_matrix(layer, ((layer.in_channels, *spec.input_size)), weight)
    line_sums = matrix.abs().sum(1 if ord == math.inf else 0)
    # Rows (columns) with the same tap pattern tie and share one gradient: any arg-max line will do.
    (oracle,) = torch.autograd.grad(line_sums[line_sums.argmax()], weight)
    assert_close(ours, oracle, rtol=1e-12)
    assert not torch.equal(oracle, torch.zeros_like(oracle))


def test_nonfinite_weights_give_nonfinite_norm_for_that_layer_only():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    norms = normopt.layer_norms(model.state_dict(), layer_specs(model), 1)
    assert torch.isfinite(norms["0"]) and torch.isnan(norms["1"])
    assert normopt.nonfinite_layers(norms) == ["1"]
    with pytest.warns(UserWarning, match=r"\['1'\]"):
        normopt.model_norms(model)


def test_nonfinite_layers_takes_logged_numbers_and_tensors_of_several_values():
    """A float (a logged ``float(norm)``) raised AttributeError; a tensor of several values with a
    NaN was silently called finite."""
    norms = {"a": 1.0, "b": float("nan"), "c": torch.tensor([1.0, float("inf")]), "d": torch.ones(2), "e": np.float32(np.inf)}
    assert normopt.nonfinite_layers(norms) == ["b", "c", "e"]
    arrays = {"f": np.array(1.0), "n": np.array(np.nan), "i": np.array([1.0, -np.inf]), "k": np.array([2, 3])}
    assert normopt.nonfinite_layers(arrays) == ["n", "i"]  # a 0-d array was refused
    for bad in ("1.0", True, np.True_, np.array(True), np.array(["1.0"])):
        with pytest.raises(
            TypeError, match=r"layer 'x': a norm must be a tensor, a real NumPy array or a real number \(not a bool\)"
        ):
            normopt.nonfinite_layers({"x": bad})
    assert normopt.nonfinite_layers({"huge": 10**400}) == []  # a finite int, too large for a float


def test_infinite_weight_gives_infinite_norm():
    model = nn.Sequential(nn.Conv1d(1, 1, 3))
    with torch.no_grad():
        model[0].weight[0, 0, 1] = float("-inf")
    assert normopt.layer_norms(model.state_dict(), layer_specs(model), math.inf)["0"] == math.inf


@pytest.mark.parametrize("bad", [0, 3, "l3", None, "fro", True, np.True_])  # True == 1 was taken as l1
def test_unknown_norm_order_is_refused(bad):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown norm order"):
        normopt.layer_norms(model.state_dict(), layer_specs(model), bad)


def test_wrong_weight_shape_names_the_layer():
    specs = layer_specs(nn.Sequential(nn.Conv2d(2, 3, 3)))
    with pytest.raises(ValueError, match=r"layer '0'.*shape \(3, 2, 5, 5\), expected \(3, 2, 3, 3\)"):
        normopt.layer_norms({"0.weight": torch.zeros(3, 2, 5, 5)}, specs, 1)


def test_missing_tensor_names_the_layer_and_key():
    specs = layer_specs(nn.Sequential(nn.BatchNorm1d(3)))
    with pytest.raises(KeyError, match=r"0\.running_var"):
        normopt.layer_norms({"0.weight": torch.ones(3)}, specs, 1)


def test_spectral_norm_of_a_conv_points_to_svc():
    specs = layer_specs(nn.Sequential(nn.Conv2d(2, 3, 3)))
    with pytest.raises(NotImplementedError, match=r"layer '0'.*normopt\.svc"):
        normopt.layer_norms(nn.Sequential(nn.Conv2d(2, 3, 3)).state_dict(), specs, 2)


def test_network_norms_sum_and_product():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    summary = normopt.network_norms(model.state_dict(), layer_specs(model), 1)
    values = list(summary.norms.values())
    assert_close(summary.total, values[0] + values[1])
    assert_close(summary.product, values[0].double() * values[1].double())
    x = torch.randn(64, 3)
    # The product bounds the chain's Lipschitz constant in l1: check on random pairs.
    with torch.no_grad():
        ratio = (model(x) - model(x.roll(1, 0))).abs().sum(1) / (x - x.roll(1, 0)).abs().sum(1)
    assert ratio.max() <= summary.product


def test_wrapper_prefixes_in_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    wrapped = nn.DataParallel(model)
    specs = layer_specs(wrapped)
    assert list(specs) == ["0", "1"]
    assert normopt.layer_norms(wrapped.state_dict(), specs, 1).keys() == {"0", "1"}
    assert_close(normopt.layer_norms(wrapped.state_dict(), specs, 1)["0"], normopt.layer_norms(model.state_dict(), specs, 1)["0"])


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.parametrize("grad", [False, True], ids=["logged", "differentiated"])
def test_layer_norms_read_nothing_back_to_the_host_once_set_up(ord, grad):
    """Cheap enough to log at every step: no value the host would wait for, after the first call."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ConvTranspose2d(6, 4, 3, stride=2), nn.Linear(17, 5)
    )
    specs = layer_specs(model, torch.zeros(1, 3, 8, 8))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    normopt.layer_norms(tensors, specs, ord)  # builds the index tables
    with torch.set_grad_enabled(grad), host_reads() as reads:
        norms = normopt.layer_norms(tensors, specs, ord)
        if grad:
            sum(norms.values()).backward()
    assert reads.found == []


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_compiled_layer_norms_set_up_outside_the_graph_then_reuse_it(ord):
    # Dynamo traced the index tables' Python on the first call and stopped at its cache's lock.
    import torch._dynamo

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(36, 5)
    )
    specs = layer_specs(model, torch.zeros(1, 3, 8, 8))  # fresh: no table built yet
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    graphs, counting = graph_recorder()

    torch._dynamo.reset()
    getattr(torch._dynamo.utils, "warn_once_cache", set()).clear()  # dynamo warns once per message and process
    compiled = torch.compile(lambda: normopt.layer_norms(tensors, specs, ord), backend=counting)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = compiled()
        count = len(graphs)
        second = compiled()
    assert not caught, [str(w.message) for w in caught]  # e.g. dynamo tracing through the plans' lru_cache
    assert count > 0 and len(graphs) == count, (count, len(graphs))  # the second call reuses the first's graphs
    with torch.no_grad():
        expected = normopt.layer_norms(tensors, layer_specs(model, torch.zeros(1, 3, 8, 8)), ord)
    for name, value in expected.items():
        assert_close(first[name], value, rtol=1e-6, msg=name)
        assert_close(second[name], value, rtol=1e-6, msg=name)
    fullgraph = torch.compile(lambda: normopt.layer_norms(tensors, specs, ord), backend="aot_eager", fullgraph=True)
    with torch.no_grad():  # the tables exist now: one graph, no break
        assert_close(fullgraph()["2"], expected["2"], rtol=1e-6)
    fresh = layer_specs(model, torch.zeros(1, 3, 8, 8))
    torch._dynamo.reset()
    advice = "call it once eagerly" if "reason" in inspect.signature(torch.compiler.disable).parameters else ""
    with pytest.raises(Exception, match=advice):  # before torch 2.6 dynamo's message cannot say what to do
        torch.compile(lambda: normopt.layer_norms(tensors, fresh, ord), backend="aot_eager", fullgraph=True)()


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's own fallback for segment_reduce
def test_layer_norms_compose_with_vmap_over_a_batch_of_weights(ord):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4))
    specs = layer_specs(model, torch.zeros(1, 2, 4, 4))
    tensors = model.state_dict()
    kernels = torch.randn(5, 3, 2, 3, 3)  # five candidate first layers
    batched = torch.vmap(lambda k: normopt.layer_norms({**tensors, "0.weight": k}, specs, ord)["0"])(kernels)
    one_by_one = torch.stack([normopt.layer_norms({**tensors, "0.weight": k}, specs, ord)["0"] for k in kernels])
    assert_close(batched, one_by_one, rtol=1e-6)


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # jacrev's vmap of segment_reduce's backward
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func's own first use
def test_layer_norms_compose_with_forward_mode_ad(ord):
    """jacfwd equals jacrev, and dual tensors of forward_ad go through (segment_reduce has no
    forward-mode derivative, and a dual weight cannot be written into the |w| scratch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4))
    specs = layer_specs(model, torch.zeros(1, 2, 4, 4))
    tensors = model.state_dict()
    normopt.layer_norms(tensors, specs, ord)  # the specs keep their scratch: the cached path is the one taken next
    norms = lambda k: torch.stack(list(normopt.layer_norms({**tensors, "0.weight": k}, specs, ord).values()))
    kernel = tensors["0.weight"]
    forward, reverse = torch.func.jacfwd(norms)(kernel), torch.func.jacrev(norms)(kernel)
    assert_close(forward, reverse, rtol=1e-6)
    assert forward[0].abs().sum() > 0
    tangent = torch.randn_like(kernel)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(kernel, tangent)
        primal, jvp = torch.autograd.forward_ad.unpack_dual(norms(dual))
    assert_close(primal, norms(kernel), rtol=1e-6)
    assert_close(jvp, (reverse * tangent).flatten(1).sum(1), rtol=1e-5)


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_a_first_call_under_inference_mode_leaves_the_specs_usable_outside_it(ord):
    """The tables and scratch the first call keeps with the specs are normal tensors, even when that
    call (a validation loop's log) runs under torch.inference_mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    specs = layer_specs(model, torch.zeros(1, 3, 8, 8))
    expected = normopt.layer_norms(model.state_dict(), layer_specs(model, torch.zeros(1, 3, 8, 8)), ord)
    with torch.inference_mode():
        logged = normopt.layer_norms(model.state_dict(), specs, ord)
    with torch.no_grad():
        again = normopt.layer_norms(model.state_dict(), specs, ord)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    differentiable = normopt.layer_norms(tensors, specs, ord)
    sum(differentiable.values()).backward()
    for name in expected:
        for got in (logged, again, differentiable):
            assert_close(got[name], expected[name], rtol=1e-6, msg=name)
    assert model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("ord", [1, math.inf, 2], ids=["l1", "linf", "l2"])
def test_a_weight_that_is_not_real_is_refused_by_layer(ord):
    linear = normopt.LinearSpec("fc", "fc.weight", 2, 2)
    for weight in (torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 2, dtype=torch.complex64)):
        with pytest.raises(TypeError, match=rf"layer 'fc': 'fc.weight' is {weight.dtype}; norms are of real weights"):
            normopt.layer_norms({"fc.weight": weight}, {"fc": linear}, ord)
    bn = normopt.BatchNormSpec("bn", "bn.weight", "bn.running_var", 2, 0.0)
    with pytest.raises(TypeError, match=r"layer 'bn': 'bn.running_var' is torch.complex64"):  # was cut to its real part
        normopt.layer_norms({"bn.weight": torch.ones(2), "bn.running_var": torch.ones(2, dtype=torch.complex64)}, {"bn": bn}, ord)


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_model_norms_of_a_model_on_the_meta_device_are_meta_tensors(ord):
    # The strided, padded and circular convolutions take products with tap tables, the first none.
    layers = [nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8, 3)).to("meta")
    norms = normopt.model_norms(model, torch.zeros(1, 1, 5, 5, device="meta"), ord)  # the non-finite check read values
    assert sorted(norms) == ["0", "1", "2", "4"] and all(n.device.type == "meta" for n in norms.values())
    assert normopt.nonfinite_layers(norms) == []


@pytest.mark.parametrize(
    "call, every",
    [
        (lambda sd, spec: layer_norm(sd, spec, 1), "layer_norms"),
        (lambda sd, spec: layer_norm(sd, spec, 2), "layer_norms"),
        (lambda sd, spec: layer_argmax(sd, spec, "linf"), "layer_argmaxes"),
        (lambda sd, spec: normopt.project_layer(sd["0.weight"], spec, 1, 1.0), None),
    ],
)
def test_the_specs_of_every_layer_or_a_name_given_for_one_spec_are_refused_saying_so(call, every):
    """Given the whole LayerSpecs they raised "unhashable type: 'LayerSpecs'" (project_layer printed
    the whole mapping as the layer's name); given a layer's name, "no operator-norm rule ... of layer '?'"."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
    specs, sd = layer_specs(model, torch.zeros(1, 1, 4, 4)), model.state_dict()
    suggestion = rf", or {every}\(tensors, specs\) for every layer$" if every else "$"
    with pytest.raises(TypeError, match=r"takes one layer's spec, got a LayerSpecs of 2 layers: pass specs\[name\]" + suggestion):
        call(sd, specs)
    with pytest.raises(TypeError, match=r"spec must be a LinearSpec, ConvSpec or BatchNormSpec .* got str '0'$"):
        call(sd, "0")


def test_specs_that_are_not_a_mapping_are_refused():
    with pytest.raises(TypeError, match="specs must be a mapping"):
        normopt.layer_norms({"w": torch.ones(2, 2)}, [normopt.LinearSpec("fc", "w", 2, 2)], 1)


@pytest.mark.parametrize("ord", [1, math.inf, 2], ids=["l1", "linf", "l2"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")  # torch's, building it
def test_an_empty_layer_is_the_zero_map_with_no_arg_max_line(ord):
    model = nn.Sequential(nn.Linear(0, 3), nn.BatchNorm1d(0))
    specs = layer_specs(model)
    tensors = model.state_dict()
    norms = normopt.layer_norms(tensors, specs, ord)  # the l1 norm was -inf, named non-finite
    assert all(torch.equal(n, torch.tensor(0.0)) for n in norms.values()) and normopt.nonfinite_layers(norms) == []
    assert torch.equal(layer_norm(tensors, specs["0"], ord), torch.tensor(0.0))  # was torch's amax error
    assert torch.equal(layer_norm(tensors, specs["1"], ord), torch.tensor(0.0))  # l2 was torch's amax error
    if ord == 2:
        return  # no arg-max line for the l2 norm at all
    for find in (layer_argmax, normopt.norm_subgradient):
        with pytest.raises(ValueError, match="layer '0' has an empty weight: the zero map has no line"):
            find(tensors, specs["0"], ord)


@pytest.mark.parametrize("affine", [True, False])
def test_a_batch_norm_is_computed_in_its_weights_precision_by_layer_norm_as_by_layer_norms(affine):
    spec = normopt.BatchNormSpec("bn", "bn.weight" if affine else None, "bn.running_var", 2, 1e-5)
    tensors = {"bn.weight": torch.tensor([1 + 1e-12, 1.0], dtype=torch.float64), "bn.running_var": torch.ones(2)}
    alone, batched = normopt.layer_norm(tensors, spec, 1), normopt.layer_norms(tensors, {"bn": spec}, 1)["bn"]
    assert alone.dtype == batched.dtype == (torch.float64 if affine else torch.float32)
    assert torch.equal(alone, batched)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize(
    "hide",
    [
        nn.utils.parametrizations.spectral_norm,
        nn.utils.weight_norm,
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5),
    ],
    ids=["parametrized", "hook", "pruned"],
)
def test_model_norms_warns_of_linear_layers_it_leaves_out_and_not_of_other_skipped_modules(hide):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(18), nn.Linear(18, 2))
    hide(model[3])
    with pytest.warns(UserWarning, match=r"layers \['3'\] are left out of the norms \('3': .*weight") as caught:
        norms = normopt.model_norms(model, torch.zeros(1, 1, 5, 5))
    assert list(norms) == ["0"] and not any("'2'" in str(w.message) for w in caught)


def test_model_norms_warns_nothing_for_a_model_whose_skipped_modules_are_not_linear_maps():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.PReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(normopt.model_norms(model, torch.zeros(1, 1, 5, 5))) == ["0"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_model_norms_of_a_model_with_torchscript_parts_warns_of_those_with_weights_only():
    """A scripted part has no parameter dict to look at: the check of hidden layers crashed on it."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), torch.jit.script(nn.ReLU()), nn.Flatten(), torch.jit.script(nn.Linear(18, 2)))
    with pytest.warns(UserWarning, match=r"layers \['3'\] are left out of the norms \('3': .*TorchScript"):
        norms = normopt.model_norms(model, torch.zeros(1, 1, 5, 5))
    assert list(norms) == ["0"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("part", "warned"),
    [
        (lambda: torch.jit.script(nn.BatchNorm1d(18, affine=False).eval()), True),  # buffers only, a linear map
        (lambda: torch.jit.script(nn.LayerNorm(18)), False),  # no linear map, as the eager one
        (lambda: torch.jit.trace(nn.Sequential(nn.Linear(18, 18), nn.ReLU()), torch.zeros(1, 18)), True),
    ],
    ids=["batch-norm-buffers", "layer-norm", "traced"],
)
def test_a_torchscript_part_is_warned_of_where_it_hides_a_linear_map(part, warned):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), part())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(normopt.model_norms(model, torch.zeros(2, 1, 5, 5))) == ["0"]
    assert bool([w for w in caught if "left out of the norms" in str(w.message)]) == warned


@pytest.mark.parametrize("ord", [1, math.inf])
def test_threads_sharing_specs_each_get_their_own_norms(ord):
    """The specs kept one buffer for |w|, written by every call: two threads (a logging thread
    beside the training loop) read each other's and got wrong norms, without an error (review)."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.Flatten())
    specs = layer_specs(model, torch.zeros(1, 32, 8, 8))
    weights = [{k: torch.randn_like(v) * (i + 1) for k, v in model.state_dict().items()} for i in range(4)]
    expected = [normopt.layer_norms(w, normopt.LayerSpecs(dict(specs)), ord) for w in weights]  # specs of their own
    wrong = []

    def work(i):
        for _ in range(300):
            got = normopt.layer_norms(weights[i], specs, ord)
            wrong.extend((i, name) for name in got if not torch.equal(got[name], expected[i][name]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong
