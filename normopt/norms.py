r"""Exact l1 and l_inf operator norms of linear, convolution and batch-norm layers.

Every function here is pure: it reads a ``{name: tensor}`` mapping and specs and returns 0-d
tensors on the weights' device, with no host synchronisation, so the norms can be logged every
step and differentiated (the gradient is the subgradient that norm decay uses).

For a layer with matrix :math:`A`:

* :math:`\|A\|_1 = \max_j \sum_i |A_{ij}|` (largest absolute column sum),
* :math:`\|A\|_\infty = \max_i \sum_j |A_{ij}|` (largest absolute row sum),
* :math:`\|A\|_2 = \sigma_{\max}(A)` (linear and batch-norm layers only here).

A convolution's matrix is never built: :mod:`normopt.lines` gives the sums of all its candidate
rows or columns from one abs-and-reduce pass over the kernel, and :func:`layer_norms` computes every
layer of a model together (:mod:`normopt.batched`).

Non-finite weights give a non-finite norm for that layer only (NaN propagates through the max,
an infinite weight gives ``inf``); :func:`nonfinite_layers` names such layers, and nothing raises
inside the pure functions, because checking would need a host synchronisation. A weight that
enters no entry of the matrix (a tap of a kernel larger than its zero-padded input) does not
count: the norm is exact and finite without it.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Mapping
from typing import NamedTuple

import numpy
import torch

from normopt.batched import all_line_sums, batch_norms, batch_plan, batch_tables, batchnorm_factors
from normopt.lines import (
    accumulation_dtype,
    check_spec,
    check_specs,
    checked,
    line_plan,
    line_sums,
    line_tables,
    lookup,
    parse_ord,
    weight_shape,
)
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec, Spec

__all__ = [
    "NormArgMax",
    "layer_argmax",
    "layer_argmaxes",
    "layer_norm",
    "layer_norms",
    "nonfinite_layers",
    "parse_ord",
]


class NormArgMax(NamedTuple):
    """Where a layer attains its norm.

    ``channel`` is the output channel / row of the arg-max row (l_inf) or the input channel /
    column of the arg-max column (l1); ``position`` holds one spatial index per axis, into the
    output (l_inf) or the input (l1), of a row or column that attains the norm; ``-1`` where the
    input size is unknown. Both are integer tensors. Ties go to the first maximal line of a fixed order: among lines
    that read the same taps the first position; lines that read different taps (at a border) are
    ordered by how many taps they read, not by position.
    """

    channel: torch.Tensor
    position: torch.Tensor


def _batchnorm_sums(tensors, spec: BatchNormSpec) -> torch.Tensor:
    """``|gamma_c| / sqrt(running_var_c + eps)`` per channel (gamma = 1 without affine weights)."""
    var = checked(tensors, spec.running_var, spec, (spec.num_features,))
    if spec.weight is None:
        return torch.rsqrt(var.to(accumulation_dtype(var.dtype)) + spec.eps)
    # In the weight's precision, as layer_norms computes a batch of layers of the weight's dtype
    # (a float64 gamma beside a float32 running variance stays float64).
    gamma = checked(tensors, spec.weight, spec, (spec.num_features,))
    acc = accumulation_dtype(gamma.dtype)
    return gamma.to(acc).abs() * torch.rsqrt(var.to(acc) + spec.eps)


def _sums(tensors, spec: Spec, ord: float) -> torch.Tensor:
    """Absolute sums of every candidate row (l_inf) or column (l1), ``(channels, patterns)``."""
    if isinstance(spec, BatchNormSpec):
        return _batchnorm_sums(tensors, spec).unsqueeze(1)
    plan = line_plan(spec, ord)
    weight = checked(tensors, spec.weight, spec, spec.weight_shape)
    return line_sums(weight, plan, line_tables(plan, weight.device, weight.dtype))


def _line_sums_to_search(tensors, spec: Spec, ord: float) -> torch.Tensor:
    """:func:`_sums` of a layer whose arg-max line is wanted: one with lines (a weight not empty)."""
    sums = _sums(tensors, spec, ord)
    if math.prod(weight_shape(spec)) == 0:
        raise ValueError(f"layer {spec.name!r} has an empty weight: the zero map has no line that attains its norm")
    return sums


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

    The result's dtype is the weight's, promoted to at least float32. This builds the layer's small
    index tables on each call; :func:`layer_norms` with the specs of :func:`normopt.layer_specs`
    keeps them on the device, which suits per-step logging on a GPU.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> w = {"fc.weight": torch.tensor([[1.0, -2.0], [3.0, 4.0]])}
        >>> layer_norm(w, spec, 1), layer_norm(w, spec, "linf")
        (tensor(6.), tensor(7.))
    """
    check_spec(spec, "layer_norm", "layer_norms")
    ord = parse_ord(ord)
    if ord == 2:
        return _spectral_norm(tensors, spec)
    sums = _sums(tensors, spec, ord)
    return sums.amax() if sums.numel() else sums.new_zeros(())  # an empty weight: the zero map


def _spectral_norm(tensors, spec: Spec) -> torch.Tensor:
    if isinstance(spec, BatchNormSpec):  # diagonal: every p-norm is the largest |entry|
        sums = _batchnorm_sums(tensors, spec)
        return sums.amax() if sums.numel() else sums.new_zeros(())  # an empty weight: the zero map
    if isinstance(spec, LinearSpec):
        weight = checked(tensors, spec.weight, spec, spec.weight_shape)
        return torch.linalg.matrix_norm(weight.to(accumulation_dtype(weight.dtype)), ord=2)
    if isinstance(spec, ConvSpec):
        raise NotImplementedError(
            f"layer {spec.name!r}: the spectral norm of a convolution is not exact here; "
            "normopt.svc gives the circular-convolution singular values"
        )
    raise TypeError(f"no operator-norm rule for spec {type(spec).__name__} of layer {getattr(spec, 'name', '?')!r}")


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
    check_spec(spec, "layer_argmax", "layer_argmaxes")
    ord = parse_ord(ord)
    if ord == 2:
        raise ValueError(f"layer {spec.name!r}: arg-max locations are defined for l1 and l_inf only")
    sums = _line_sums_to_search(tensors, spec, ord)
    channel, pattern = torch.unravel_index(sums.reshape(-1).argmax(), sums.shape)
    device = sums.device
    if isinstance(spec, BatchNormSpec):
        return NormArgMax(channel, torch.zeros(0, dtype=torch.int64, device=device))
    plan = line_plan(spec, ord)
    per_axis = torch.unravel_index(pattern, tuple(len(p) for p in plan.positions)) if plan.positions else ()
    tables = line_tables(plan, device, sums.dtype)
    # torch.take, unlike indexing with a 0-d tensor, does not read the index back to the host.
    position = [torch.take(p, i) for p, i in zip(tables.positions, per_axis)]
    position = torch.stack(position) if position else torch.zeros(0, dtype=torch.int64, device=device)
    return NormArgMax(channel, position)


def _main_tensor(tensors, spec: Spec) -> torch.Tensor:
    key = spec.running_var if isinstance(spec, BatchNormSpec) and spec.weight is None else spec.weight
    return lookup(tensors, key, spec)


_SET_UP_OUTSIDE = (
    "normopt.layer_norms builds its index tables on the host, once per LayerSpecs: call it once eagerly, "
    "with the LayerSpecs of normopt.layer_specs, before compiling it with fullgraph=True"
)


def _outside_the_graph(fn):
    try:
        return torch.compiler.disable(fn, reason=_SET_UP_OUTSIDE)
    except TypeError:  # torch before 2.6 takes no reason
        return torch.compiler.disable(fn)


# Host-side set-up, built once per batch and kept with the specs: under torch.compile it runs
# outside the graph (one break, on the first call only), where dynamo would otherwise trace the
# plan's Python and stop at the lock of its cache.
@_outside_the_graph
def _batch_entry(members_specs: tuple[Spec, ...], ord: float, device: torch.device, dtype: torch.dtype) -> tuple:
    order, plan = batch_plan(members_specs, ord)
    # Normal tensors even when the first call runs under torch.inference_mode (a validation loop's
    # log): inference tensors kept here would make every later call outside it raise, when it
    # writes |w| into the scratch or saves a table for backward.
    with torch.inference_mode(False):
        return members_specs, order, plan, batch_tables(plan, device, dtype), threading.local()


def _scratch(per_thread: threading.local, plan, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Buffers for ``|w|`` of the plan's kernels, views of one, reused by every call of this thread.

    One per thread: two threads sharing specs (a logging thread beside the training loop) wrote
    each other's ``|w|`` into one buffer and read back wrong norms, without an error.
    """
    scratch = getattr(per_thread, "scratch", None)
    if scratch is None:
        with torch.inference_mode(False):  # as the tables, for calls outside inference mode later
            work = torch.empty(plan.max_numel, device=device, dtype=dtype)
        scratch = per_thread.scratch = [work[: math.prod(p.shape)].view(p.shape) for p in plan.plans]
    return scratch


def layer_norms(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1) -> dict[str, torch.Tensor]:
    """Operator norm of every layer in ``specs``, as ``{name: 0-d tensor}``.

    All layers of one device and dtype are computed together: one abs-and-reduce pass per kernel,
    then a fixed number of operations for the whole model (:mod:`normopt.batched`). With the
    :class:`~normopt.LayerSpecs` of :func:`normopt.layer_specs`, the small index tables this needs
    are built once per device and kept with the specs. Under ``torch.compile`` they are built
    outside the graph, a break on the first call only (with ``fullgraph=True``, call once eagerly
    first, with those same specs; a plain dict of specs keeps no tables and breaks at every call).

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
    ord = parse_ord(ord)
    check_specs(specs)
    if ord == 2:
        return {name: layer_norm(tensors, spec, ord) for name, spec in specs.items()}
    cache = getattr(specs, "device_tables", {})
    by_batch: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, spec in specs.items():
        if not isinstance(spec, (LinearSpec, ConvSpec, BatchNormSpec)):
            raise TypeError(f"no operator-norm rule for spec {type(spec).__name__} of layer {name!r}")
        main = _main_tensor(tensors, spec)
        by_batch.setdefault((main.device, main.dtype), []).append(name)
    norms: dict[str, torch.Tensor] = {}
    for (device, dtype), members in by_batch.items():
        members_specs = tuple(specs[n] for n in members)
        key = (tuple(members), ord, device, dtype)  # names: cheaper to hash than the specs
        if key not in cache or any(a is not b for a, b in zip(cache[key][0], members_specs)):
            cache[key] = _batch_entry(members_specs, ord, device, dtype)
        _, order, plan, tables, per_thread = cache[key]
        # Compiled, |w| is never written into a scratch (inductor fuses it into the sums).
        scratch = None if torch.compiler.is_compiling() else _scratch(per_thread, plan, device, dtype)
        ordered = [members_specs[i] for i in order]
        weights, running_vars = [], []
        for spec in ordered:
            if isinstance(spec, BatchNormSpec):
                running_vars.append(checked(tensors, spec.running_var, spec, (spec.num_features,)))
                if spec.weight is None:  # gamma = 1
                    weights.append(torch.ones_like(running_vars[-1]))
                    continue
            weights.append(checked(tensors, spec.weight, spec, plan.plans[len(weights)].shape))
        factors = batchnorm_factors(running_vars, tables) if running_vars else None
        values = batch_norms(all_line_sums(weights, factors, plan, tables, scratch), tables)
        norms.update(zip((members[i] for i in order), values.unbind(0)))
    return {name: norms[name] for name in specs}


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
    """Names of the layers whose norm is NaN or infinite (synchronises once with each device).

    A norm may also be a plain number (a logged ``float(norm)``), a NumPy array (``norm.numpy()``),
    or a tensor or array of several values (named if any is not finite). Norms on the meta device
    have no values: they are not named.

    Example:
        >>> import torch
        >>> nonfinite_layers({"a": torch.tensor(1.0), "b": torch.tensor(float("nan")), "c": float("inf")})
        ['b', 'c']
    """
    bad, on_device = set(), {}
    for name, norm in norms.items():
        if isinstance(norm, torch.Tensor):
            if norm.device.type != "meta":
                on_device.setdefault(norm.device, []).append(name)
        elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
            if not isinstance(norm, numbers.Integral) and not math.isfinite(norm):  # math.isfinite(10**400) overflows
                bad.add(name)
        elif isinstance(norm, numpy.ndarray) and norm.dtype.kind in "iuf":
            if not numpy.isfinite(norm).all():
                bad.add(name)
        else:
            raise TypeError(
                f"layer {name!r}: a norm must be a tensor, a real NumPy array or a real number (not a bool), got {norm!r:.40}"
            )
    for names in on_device.values():  # one stack per device: a model may span several
        finite = torch.stack([torch.isfinite(norms[n]).all() for n in names]).tolist()
        bad.update(name for name, ok in zip(names, finite) if not ok)
    return [name for name in norms if name in bad]
