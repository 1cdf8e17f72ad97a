r"""Exact l1 and l_inf operator norms of linear, convolution and batch-norm layers.

Every function here is pure: it reads a ``{name: tensor}`` mapping and a spec and returns 0-d
tensors on the weights' device, with no host synchronisation, so the norms can be logged every
step and differentiated (the gradient is the subgradient that norm decay uses).

For a layer with matrix :math:`A`:

* :math:`\|A\|_1 = \max_j \sum_i |A_{ij}|` (largest absolute column sum),
* :math:`\|A\|_\infty = \max_i \sum_j |A_{ij}|` (largest absolute row sum),
* :math:`\|A\|_2 = \sigma_{\max}(A)` (linear and batch-norm layers only here).

A convolution's matrix is never built. Per spatial axis, :mod:`normopt.geometry` lists the tap
patterns of its rows and columns; the row (column) sums of all distinct rows (columns) then come
from one abs-and-reduce pass over the kernel and a small contraction per axis.

Non-finite weights give a non-finite norm for that layer only (NaN propagates through the max,
an infinite weight gives ``inf``); :func:`nonfinite_layers` names such layers, and nothing raises
inside the pure functions, because checking would need a host synchronisation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from normopt.discovery import WRAPPER_PREFIXES
from normopt.geometry import Patterns, axis_patterns
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec, Spec, axis_geometries, large_input_geometries

_ORDS = {1: 1, "l1": 1, math.inf: math.inf, "inf": math.inf, "linf": math.inf, 2: 2, "l2": 2}


def parse_ord(ord) -> float:
    """Normalise a norm order: ``1``/``"l1"``, ``float("inf")``/``"linf"``, or ``2``/``"l2"``.

    Example:
        >>> parse_ord("linf")
        inf
    """
    try:
        return _ORDS[ord.lower() if isinstance(ord, str) else ord]
    except (KeyError, TypeError):
        raise ValueError(f"unknown norm order {ord!r}; use 1 or 'l1', float('inf') or 'linf', 2 or 'l2'") from None


class NormArgMax(NamedTuple):
    """Where a layer attains its norm.

    ``channel`` is the output channel / row of the arg-max row (l_inf) or the input channel /
    column of the arg-max column (l1); ``position`` holds one spatial index per axis, into the
    output (l_inf) or the input (l1), of a row or column that attains the norm; ``-1`` where the
    input size is unknown. Both are integer tensors; ties go to the first index.
    """

    channel: torch.Tensor
    position: torch.Tensor


def _lookup(tensors: Mapping[str, torch.Tensor], key: str, spec: Spec) -> torch.Tensor:
    if key in tensors:
        return tensors[key]
    for prefix in WRAPPER_PREFIXES:
        if prefix + key in tensors:
            return tensors[prefix + key]
    raise KeyError(
        f"layer {spec.name!r}: no tensor {key!r} in the mapping; pass model.state_dict() or "
        "{**dict(model.named_parameters()), **dict(model.named_buffers())}"
    )


def _checked(tensors, key: str, spec: Spec, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = _lookup(tensors, key, spec)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"layer {spec.name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _weight(tensors, spec: LinearSpec | ConvSpec) -> torch.Tensor:
    return _checked(tensors, spec.weight, spec, spec.weight_shape)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums over thousands of weights lose digits; accumulate in float32 at least.
    return torch.promote_types(dtype, torch.float32)


@functools.lru_cache(maxsize=4096)
def _table(values: tuple[tuple[int, ...], ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Cached per device so that no host-to-device copy (a synchronisation on CUDA) runs per step.
    return torch.tensor(values, dtype=dtype, device=device).reshape(len(values), -1)


class _AxisPlan(NamedTuple):
    """How one spatial axis of the kernel turns into pattern sums.

    ``membership`` (groups x taps) adds the taps that land on one sample before the absolute value
    is taken; None when every group is one tap. ``reduce`` (patterns x taps-or-groups) counts how
    often each enters each pattern; None when there is one pattern holding every tap once, which
    is a plain sum.
    """

    membership: tuple[tuple[int, ...], ...] | None
    reduce: tuple[tuple[int, ...], ...] | None
    kernel: int

    @property
    def tap_table(self) -> tuple[tuple[int, ...], ...]:
        """Patterns x taps multiplicities of a plan without membership (all ones if ``reduce`` is None)."""
        return self.reduce if self.reduce is not None else ((1,) * self.kernel,)


def _axis_plan(patterns: Patterns, kernel: int) -> _AxisPlan:
    if not patterns.singleton:
        membership = tuple(tuple(int(i in group) for i in range(kernel)) for group in patterns.groups)
        return _AxisPlan(membership, patterns.counts, kernel)
    per_tap = []
    for counts in patterns.counts:
        row = [0] * kernel
        for (tap,), c in zip(patterns.groups, counts):
            row[tap] += c
        per_tap.append(tuple(row))
    full = tuple(per_tap) == ((1,) * kernel,)
    return _AxisPlan(None, None if full else tuple(per_tap), kernel)


@functools.lru_cache(maxsize=4096)
def _plan(spec: Spec, kind: str) -> tuple[tuple[_AxisPlan, ...], tuple[Patterns, ...]]:
    """Per-axis plans and patterns of a layer's rows or columns; cached, so a step pays none of it."""
    if isinstance(spec, LinearSpec):
        return (), ()
    if spec.input_size is None:
        patterns = tuple(axis_patterns(kind, axes, known=False) for axes in large_input_geometries(spec))
    else:
        patterns = tuple(axis_patterns(kind, (axis,)) for axis in axis_geometries(spec, spec.input_size))
    return tuple(_axis_plan(p, k) for p, k in zip(patterns, spec.kernel_size)), patterns


def _contract(x: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """``x`` with axis ``dim`` (length k) replaced by ``matrix @`` that axis (``matrix``: r x k)."""
    return torch.movedim(torch.movedim(x, dim, -1) @ matrix.T, -1, dim)


def _merge_taps(weight: torch.Tensor, plans: tuple[_AxisPlan, ...]) -> torch.Tensor:
    """Add up the taps that land on one input sample (non-zero padding); a no-op otherwise."""
    if all(plan.membership is None for plan in plans):
        return weight
    acc = _accumulation_dtype(weight.dtype)
    x = weight.to(acc)
    for j, plan in enumerate(plans, start=2):
        if plan.membership is not None:
            x = _contract(x, j, _table(plan.membership, x.device, acc))
    return x


def _reduce_lines(x: torch.Tensor, groups: int, plans: tuple[_AxisPlan, ...], kind: str) -> torch.Tensor:
    """Sum non-negative ``x`` (conv layout) into the line sums of every row or column pattern.

    Rows of output channel o sum over its input channels; columns of input channel c sum over the
    output channels of c's group. Returns ``(channels, P_1 .. P_N)``. Linear in ``x``.
    """
    acc = _accumulation_dtype(x.dtype)
    # Both reductions run over contiguous memory, as fast as one read of the weights.
    if kind == "rows":
        x = x.sum(1, dtype=acc)
    else:
        spatial = x.shape[2:]
        x = x.reshape(groups, x.shape[0] // groups, -1).sum(1, dtype=acc).reshape(-1, *spatial)
    for j, plan in enumerate(plans, start=1):
        if plan.reduce is None:
            x = x.sum(j, keepdim=True)
        else:
            x = _contract(x, j, _table(plan.reduce, x.device, acc))
    return x


def _line_plan(spec: LinearSpec | ConvSpec, ord: float) -> tuple[str, tuple[_AxisPlan, ...], tuple[Patterns, ...]]:
    # A transposed convolution's matrix is the transpose of its adjoint convolution's.
    kind = "rows" if (ord == math.inf) != getattr(spec, "transposed", False) else "columns"
    return (kind, *_plan(spec, kind))


def _line_sums(tensors, spec: Spec, ord: float) -> tuple[torch.Tensor, tuple[Patterns, ...]]:
    """Absolute sums of the rows (l_inf) or columns (l1) that can attain the norm."""
    if isinstance(spec, BatchNormSpec):
        var = _checked(tensors, spec.running_var, spec, (spec.num_features,))
        acc = _accumulation_dtype(var.dtype)
        scale = torch.rsqrt(var.to(acc) + spec.eps)
        if spec.weight is not None:
            scale = _checked(tensors, spec.weight, spec, (spec.num_features,)).to(acc).abs() * scale
        return scale, ()
    if not isinstance(spec, (LinearSpec, ConvSpec)):
        raise TypeError(f"no operator-norm rule for spec {type(spec).__name__} of layer {getattr(spec, 'name', '?')!r}")
    weight = _weight(tensors, spec)
    kind, plans, patterns = _line_plan(spec, ord)
    return _reduce_lines(_merge_taps(weight, plans).abs(), getattr(spec, "groups", 1), plans, kind), patterns


def layer_norm(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1) -> torch.Tensor:
    r"""Operator norm of one layer as a 0-d tensor.

    * Linear: :math:`\|W\|_1 = \max_j \sum_i |W_{ij}|`, :math:`\|W\|_\infty = \max_i \sum_j |W_{ij}|`,
      :math:`\|W\|_2 = \sigma_{\max}(W)`.
    * Convolution, kernel :math:`K` of shape ``(D, C/g, k_1..k_N)``:
      :math:`\|A\|_\infty = \max_{o, a} \sum_{c} \sum_{i \in R(a)} |K[o, c, i]|` and
      :math:`\|A\|_1 = \max_{c, u} \sum_{o \in \mathrm{group}(c)} \sum_{i \in C(u)} |K[o, c, i]|`,
      with :math:`R(a)`, :math:`C(u)` the products of the per-axis tap sets of output position
      :math:`a` and input position :math:`u` (for non-zero padding, taps landing on one sample add
      first). Transposed convolutions swap the two.
    * Batch norm (eval mode): every p-norm is :math:`\max_c |\gamma_c| / \sqrt{\sigma^2_c + \epsilon}`.

    The result's dtype is the weight's, promoted to at least float32.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> w = {"fc.weight": torch.tensor([[1.0, -2.0], [3.0, 4.0]])}
        >>> layer_norm(w, spec, 1), layer_norm(w, spec, "linf")
        (tensor(6.), tensor(7.))
    """
    ord = parse_ord(ord)
    if ord == 2:
        return _spectral_norm(tensors, spec)
    sums, _ = _line_sums(tensors, spec, ord)
    return sums.amax()


def _spectral_norm(tensors, spec: Spec) -> torch.Tensor:
    if isinstance(spec, BatchNormSpec):
        return _line_sums(tensors, spec, 1)[0].amax()
    if isinstance(spec, LinearSpec):
        weight = _weight(tensors, spec)
        return torch.linalg.matrix_norm(weight.to(_accumulation_dtype(weight.dtype)), ord=2)
    raise NotImplementedError(
        f"layer {spec.name!r}: the spectral norm of a convolution is not exact here; "
        "normopt.svc gives the circular-convolution singular values"
    )


def layer_argmax(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1) -> NormArgMax:
    """Row (l_inf) or column (l1) of the layer's matrix that attains its norm.

    The row of the explicit matrix is ``channel * prod(out_size) + ravel(position, out_size)``,
    the column ``channel * prod(in_size) + ravel(position, in_size)``, in PyTorch's
    ``(channels, *spatial)`` layout of one sample.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> layer_argmax({"fc.weight": torch.tensor([[1.0, -2.0], [3.0, 4.0]])}, spec, 1).channel
        tensor(1)
    """
    ord = parse_ord(ord)
    if ord == 2:
        raise ValueError(f"layer {spec.name!r}: arg-max locations are defined for l1 and l_inf only")
    sums, patterns = _line_sums(tensors, spec, ord)
    index = torch.unravel_index(sums.reshape(-1).argmax(), sums.shape)
    device = sums.device
    # torch.take, unlike indexing with a 0-d tensor, does not read the index back to the host.
    position = [torch.take(_table((p.positions,), device, torch.int64), i) for p, i in zip(patterns, index[1:])]
    position = torch.stack(position) if position else torch.zeros(0, dtype=torch.int64, device=device)
    return NormArgMax(index[0], position)


def layer_norms(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1) -> dict[str, torch.Tensor]:
    """Operator norm of every layer in ``specs``, as ``{name: 0-d tensor}``.

    Args:
        tensors: ``model.state_dict()``, or ``{**dict(model.named_parameters()),
            **dict(model.named_buffers())}`` to keep gradients; extra keys are ignored, and keys
            with a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix are found too.
        specs: from :func:`normopt.layer_specs`.
        ord: ``1``/``"l1"``, ``float("inf")``/``"linf"``, or ``2``/``"l2"`` (linear and batch norm).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from normopt import layer_specs
        >>> model = nn.Sequential(nn.Linear(3, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [2.0, 0.0, 5.0]]))
        >>> layer_norms(model.state_dict(), layer_specs(model), "linf")
        {'0': tensor(7.)}
    """
    return {name: layer_norm(tensors, spec, ord) for name, spec in specs.items()}


def layer_argmaxes(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1) -> dict[str, NormArgMax]:
    """:func:`layer_argmax` of every layer in ``specs``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from normopt import layer_specs
        >>> model = nn.Sequential(nn.Conv1d(1, 2, 3, stride=2, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 5.0, 0.0]]]))
        >>> found = layer_argmaxes(model.state_dict(), layer_specs(model, torch.zeros(1, 1, 7)), 1)
        >>> found["0"].channel, found["0"].position  # input sample 1 meets tap 1 of both filters
        (tensor(0), tensor([1]))
    """
    return {name: layer_argmax(tensors, spec, ord) for name, spec in specs.items()}


def nonfinite_layers(norms: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the layers whose norm is NaN or infinite (synchronises with the device once).

    Example:
        >>> import torch
        >>> nonfinite_layers({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))})
        ['b']
    """
    if not norms:
        return []
    finite = torch.stack([torch.isfinite(n) for n in norms.values()]).tolist()
    return [name for name, ok in zip(norms, finite) if not ok]
