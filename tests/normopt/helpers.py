"""Shared test helpers: the explicit-matrix oracle, a tolerance-aware comparison, layer strategies."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from unittest import mock

import torch
import torch.nn.functional as F
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normopt
from normopt import recent_slices

# Relative tolerance of an exact norm against the oracle, by weight dtype. Low-precision weights
# are exact in float64; the library accumulates them in float32.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-8, msg: str = "") -> None:
    """Compare tensors or numbers as float64, with a message that shows both."""
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


def explicit_matrix(module: nn.Module, input_shape: tuple[int, ...], weight: torch.Tensor | None = None) -> torch.Tensor:
    """The matrix of ``module``'s linear part on one sample of shape ``(channels, *spatial)``.

    Built by brute force from the real module: a float64 copy in eval mode maps every basis
    vector, and the image of zero is subtracted to remove biases and batch-norm shifts. Rows are
    the output in PyTorch's ``(channels, *spatial)`` order, columns the input in the same order.
    With ``weight`` (float64), the matrix is computed from it with ``functional_call`` and is
    differentiable in it.
    """
    module = copy.deepcopy(module).to(torch.float64).eval()
    size = math.prod(input_shape)
    basis = torch.eye(size, dtype=torch.float64).reshape(size, *input_shape)
    with torch.set_grad_enabled(weight is not None):
        params = {} if weight is None else {"weight": weight}
        run = lambda x: torch.func.functional_call(module, params, (x,))
        images = run(basis) - run(torch.zeros_like(basis[:1]))
    return images.reshape(size, -1).T


def brute_norms(matrix: torch.Tensor) -> dict:
    """l1, l_inf and l2 operator norms of an explicit matrix, with arg-max column and row sums."""
    column_sums = matrix.abs().sum(0)
    row_sums = matrix.abs().sum(1)
    return {
        1: column_sums.max(),
        math.inf: row_sums.max(),
        2: torch.linalg.matrix_norm(matrix, 2),
        "column_sums": column_sums,
        "row_sums": row_sums,
    }


CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAX_SIZE = {1: 12, 2: 7, 3: 4}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def _channels(draw, transposed: bool):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    if draw(st.booleans()) and groups > 1:  # depthwise
        return groups, groups, groups
    return groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2)), groups


@st.composite
def conv_layers(draw, transposed: bool = False, modes=("zeros",), dims=(1, 2, 2, 3)):
    """A random conv (or transposed conv) module with random weights, and a valid input size."""
    dims = draw(st.sampled_from(dims))
    axes = st.lists  # one value per spatial axis
    kernel = draw(axes(st.integers(1, 5 if dims == 1 else 4), min_size=dims, max_size=dims))
    stride = draw(axes(st.integers(1, 3), min_size=dims, max_size=dims))
    dilation = draw(axes(st.integers(1, 3), min_size=dims, max_size=dims))
    size = draw(axes(st.integers(1, MAX_SIZE[dims]), min_size=dims, max_size=dims))
    mode = draw(st.sampled_from(modes))
    if transposed:
        padding = draw(axes(st.integers(0, 3), min_size=dims, max_size=dims))
        out_pad = [draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)]
        extra = {"output_padding": tuple(out_pad)}
    else:
        choice = draw(st.sampled_from(["ints", "ints", "same", "valid"]))
        if choice == "same":
            stride = [1] * dims
            padding = "same"
        elif choice == "valid":
            padding = "valid"
        else:
            padding = draw(axes(st.integers(0, 3), min_size=dims, max_size=dims))
        extra = {}
    c_in, c_out, groups = _channels(draw, transposed)
    layer = (CONV_T if transposed else CONV)[dims](
        c_in,
        c_out,
        tuple(kernel),
        stride=tuple(stride),
        padding=padding if isinstance(padding, str) else tuple(padding),
        dilation=tuple(dilation),
        groups=groups,
        padding_mode=mode,
        bias=draw(st.booleans()),
        **extra,
    )
    try:
        spec = normopt.module_spec(layer, "layer", tuple(size))
    except ValueError:
        assume(False)  # the input is too small for this kernel / padding
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
        if draw(st.booleans()):  # sparse kernels make ties and empty rows likely
            weight = weight * (torch.rand(weight.shape, generator=generator) < 0.3)
        layer.weight.copy_(weight.to(dtype))
    return layer.to(dtype), spec, (c_in, *size)


@st.composite
def circular_cases(draw, full_support: bool = False):
    """A kernel with groups / dilation and an input size the kernel reach fits in."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    size = [draw(st.integers(1, {1: 9, 2: 6, 3: 3}[dims])) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    if full_support:
        dilation = [1] * dims
        kernel = list(size)
    else:
        kernel = [draw(st.integers(1, 4)) for _ in range(dims)]
    assume(all(d * (k - 1) + 1 <= n for d, k, n in zip(dilation, kernel, size)))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return weight, tuple(size), groups, tuple(dilation)


def small_cnn(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    """A small CNN for 8x8 single-channel inputs (the digits data)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4) if batchnorm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as (N, 1, 8, 8) floats in [0, 1] and int labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)


def batches(x: torch.Tensor, y: torch.Tensor, steps: int, size: int, seed: int = 0):
    """Deterministic random mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(x), (size,), generator=generator)
        yield x[index], y[index]


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    return digits()


def one_step(model: nn.Module, optimizer, seed: int = 0) -> None:
    """One training step of ``model`` (:func:`small_cnn`) on a batch of 16 digits drawn with ``seed``."""
    inputs, labels = next(batches(*_digits(), 1, 16, seed))
    optimizer.zero_grad()
    F.cross_entropy(model(inputs), labels).backward()
    optimizer.step()


def wrapped(model: nn.Module, **options) -> normopt.NormDecayOptimizer:
    """SGD with momentum, norm decay by the wrapper (``options`` its own)."""
    return normopt.NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, **options)


def attached(model: nn.Module, **options) -> torch.optim.Optimizer:
    """SGD with momentum, norm decay by its hooks (``options`` those of :func:`normopt.attach_norm_decay`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    normopt.attach_norm_decay(optimizer, model, **options)
    return optimizer


def same_weights(model: nn.Module, twin: nn.Module, rtol: float = 0.0) -> None:
    """Bit for bit, or within ``rtol`` and an absolute ulp or two of float32 weights of about 0.1."""
    for key, value in model.state_dict().items():
        if rtol:
            assert_close(twin.state_dict()[key], value, rtol=rtol, atol=3e-8, msg=key)
        else:
            assert torch.equal(twin.state_dict()[key], value), key


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside the block only."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def rings_everywhere():
    """Read the decay gradient of every layer a ring can serve through one, however small the layer.

    Only for layers created inside the block (the choice is made when the state is initialised).
    """
    with mock.patch.multiple(recent_slices, RING_SHARE=0, RING_MIN_WEIGHTS=0):
        yield


def graph_recorder(then: str | None = None):
    """``(graphs, backend)``: a ``torch.compile`` backend that appends each graph to ``graphs``, so
    that a test can count the graphs (and so the recompiles) of its steps, and runs it as traced,
    or through the backend named ``then`` (``"aot_eager"``: AOTAutograd specializes some values
    that dynamo alone keeps symbolic)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        if then is not None:
            import torch._dynamo

            return torch._dynamo.lookup_backend(then)(graph, example_inputs)
        return graph.forward

    return graphs, backend


# Operators whose result the host must wait for (on an accelerator, a synchronisation).
HOST_READS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select"}
HOST_READS |= {"aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive"}


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in HOST_READS or _sized_by_values(name, args, kwargs or {}):
            self.found.append((str(func), args[0]))
        return func(*args, **(kwargs or {}))


def _sized_by_values(name: str, args, kwargs) -> bool:
    """Whether the result's size depends on tensor values: boolean-mask indexing, repeats as a tensor."""
    if name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    # repeat_interleave(x, repeats) reaches the dispatcher as repeat_interleave(repeats): sized by its
    # values, unless told the output size
    repeats_only = name == "aten.repeat_interleave" and len(args) == 1 and isinstance(args[0], torch.Tensor)
    return repeats_only and kwargs.get("output_size") is None


def _refuse(name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"Tensor.{name} reads a tensor back to the host")

    return refuse


@contextlib.contextmanager
def host_reads():
    """Record, as ``(operator, first argument)`` in ``.found``, each operator whose result the host
    would wait for, and refuse ``Tensor.tolist`` and ``Tensor.numpy`` (which dispatch no operator)."""
    with _HostReads() as reads, mock.patch.multiple(torch.Tensor, tolist=_refuse("tolist"), numpy=_refuse("numpy")):
        yield reads
