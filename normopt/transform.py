r"""Norm decay as one gradient transformation: an ``init`` and an ``update``, optax-style.

For each regularized layer with weight ``W``, decay buffer ``h`` and subgradient ``p`` of its l1 or
l_inf norm (see :mod:`normopt.decay`), one ``update`` does

* ``rule="paper"`` (Algorithm 1 of Liang & Huang, 2021): :math:`h \leftarrow \gamma h + (1-\gamma) p`,
  :math:`\nabla W \mathrel{+}= (\beta / N) h`, with ``N`` the number of regularized layers;
* ``rule="reference"`` (the authors' released code): :math:`h \leftarrow \gamma h`, the arg-max
  line of ``h`` set to ``p``, :math:`\nabla W \mathrel{+}= \beta h`. Columns are summed in the
  released code's order (see :class:`normopt.lines.LinePlan`), so that near-ties resolve as there.

Every layer of one device and dtype is computed together (:mod:`normopt.batched`): the number of
operations grows by about three per layer, nothing is read back to the host, and the update
compiles with ``torch.compile(fullgraph=True)``.

**How h is stored.** ``h = buffer * scale``, with ``scale`` one number per channel slice of the
kernel (broadcast against it). Decaying ``h`` by ``gamma`` multiplies the small ``scale`` only; the
slice that holds the arg-max line is rewritten, its scale reset to 1. A step then reads each
buffer once, to add it to the gradient, instead of rewriting it first (the same trick as Bottou's
scaled weight decay). With ``gamma = 0.5`` every scale is a power of two, so the reference rule
gives the released code's numbers bit for bit.

``update`` changes the gradient tensors and the state's buffers in place (as torch.optim's
functional optimizers do) and returns them, so no step allocates a weight-sized tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from normopt.batched import (
    BatchPlan,
    BatchTables,
    all_line_sums,
    argmax_slices,
    batch_plan,
    batch_tables,
    batchnorm_factors,
    padded_line_sums,
    slice_subgradients,
)
from normopt.lines import checked, lookup, parse_ord, weight_shape
from normopt.specs import BatchNormSpec, Spec

RULES = ("paper", "reference")


class NormDecayState(NamedTuple):
    """Decay state of every batch of layers (one per device and dtype).

    Attributes:
        buffers: per batch, the flat decay buffers of its layers.
        scales: per batch, the flat per-slice scales of its layers.
        tables: per batch, its index tables (constant).
        scratch: per batch, weight-shaped work buffers, views of one buffer as large as the largest
            weight (their content is not state).
        views: ``{layer: (buffer, scale)}``: views of ``buffers`` and ``scales``, the buffer shaped
            like the layer's weight and the scale broadcastable against it: ``h = buffer * scale``.
    """

    buffers: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    tables: tuple[BatchTables, ...]
    scratch: tuple[tuple[torch.Tensor, ...], ...]
    views: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def decay_buffer(self, layer: str) -> torch.Tensor:
        """The dense decay buffer ``h`` of ``layer`` (a new tensor)."""
        buffer, scale = self.views[layer]
        return buffer * scale


class NormDecayTransform(NamedTuple):
    """Norm decay as a pair of functions (see :func:`norm_decay`).

    Attributes:
        init: ``init(tensors) -> NormDecayState``: zero buffers, and the index tables on the weights' device.
        update: ``update(grads, state, tensors, *, beta, gamma) -> (grads, state, norms)``.
        layers: the regularized layers' names, in order.
    """

    init: Callable[[Mapping[str, torch.Tensor]], NormDecayState]
    update: Callable[..., tuple[Mapping[str, torch.Tensor | None], NormDecayState, dict[str, torch.Tensor]]]
    layers: tuple[str, ...]


def _decayed(spec: Spec) -> None:
    if isinstance(spec, BatchNormSpec) and spec.weight is None:
        raise ValueError(f"layer {spec.name!r}: batch norm without affine weights has nothing to regularize")


def _per_layer(value, names, what: str) -> list[float]:
    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise KeyError(f"{what} has no value for layers {missing}")
        return [float(value[n]) for n in names]
    return [float(value)] * len(names)


def norm_decay(specs: Mapping[str, Spec], *, ord=1, rule: str = "paper") -> NormDecayTransform:
    r"""Norm decay of the layers in ``specs`` as an ``(init, update)`` pair.

    Args:
        specs: ``{layer name: spec}`` of the layers to regularize (conv, linear, affine batch norm).
        ord: ``1``/``"l1"`` or ``float("inf")``/``"linf"``.
        rule: ``"paper"`` or ``"reference"`` (see the module docstring).

    ``update(grads, state, tensors, *, beta, gamma)`` takes ``grads`` keyed like ``tensors`` (a
    missing or None gradient is left alone), ``tensors`` holding every weight (and batch norm's
    running variance), and ``beta``/``gamma`` as numbers or ``{layer: number}``. It adds the decay to
    the gradients and updates the state, both in place, and returns ``(grads, state, norms)`` with
    ``norms`` the layers' norms as 0-d tensors (NaN or inf for a layer with non-finite weights,
    which then contributes no new subgradient).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        >>> decay = norm_decay(normopt.layer_specs(model), ord="linf", rule="reference")
        >>> state = decay.init(model.state_dict())
        >>> grads = {"weight": torch.zeros(2, 2)}
        >>> grads, state, norms = decay.update(grads, state, model.state_dict(), beta=0.1, gamma=0.5)
        >>> norms[""], grads["weight"]  # row 1 (|3| + |4|) attains the norm: beta * sign there
        (tensor(7.), tensor([[0.0000, 0.0000],
                [0.1000, 0.1000]]))
    """
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"norm decay supports ord 1 ('l1') and inf ('linf'), not {ord!r}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {list(RULES)}")
    if not specs:
        raise ValueError("no layer to regularize: specs is empty")
    for spec in specs.values():
        _decayed(spec)
    names = tuple(specs)
    # (layer names in batch order, plan) per device and dtype, fixed by init from the weights it gets.
    layout: list[tuple[tuple[str, ...], BatchPlan]] = []

    def init(tensors: Mapping[str, torch.Tensor]) -> NormDecayState:
        by_batch: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name, spec in specs.items():
            weight = checked(tensors, spec.weight, spec, weight_shape(spec))
            if weight.is_complex() or not weight.is_floating_point():
                raise TypeError(f"layer {name!r}: norm decay needs real floating-point weights, not {weight.dtype}")
            by_batch.setdefault((weight.device, weight.dtype), []).append(name)
        layout.clear()
        buffers, scales, tables, scratch, views = [], [], [], [], {}
        for (device, dtype), members in by_batch.items():
            order, plan = batch_plan(tuple(specs[n] for n in members), ord, rule == "reference")
            members = tuple(members[i] for i in order)
            layout.append((members, plan))
            tables.append(batch_tables(plan, device, dtype))
            buffer = torch.zeros(sum(plan.numels), device=device, dtype=dtype)
            scale = torch.ones(sum(math.prod(s) for s in plan.scale_shapes), device=device, dtype=dtype)
            b = s = 0
            for name, p, numel, shape in zip(members, plan.plans, plan.numels, plan.scale_shapes):
                size = math.prod(shape)
                views[name] = (buffer[b : b + numel].view(p.shape), scale[s : s + size].view(shape))
                b, s = b + numel, s + size
            buffers.append(buffer)
            scales.append(scale)
            work = torch.empty(plan.max_numel, device=device, dtype=dtype)
            scratch.append(tuple(work[: math.prod(p.shape)].view(p.shape) for p in plan.plans))
        return NormDecayState(tuple(buffers), tuple(scales), tuple(tables), tuple(scratch), {n: views[n] for n in names})

    def update(grads, state: NormDecayState, tensors, *, beta, gamma):
        if not layout:
            raise RuntimeError("norm_decay: call init before update")
        betas = dict(zip(names, _per_layer(beta, names, "beta")))
        gammas = dict(zip(names, _per_layer(gamma, names, "gamma")))
        per_layer_beta = rule == "paper"
        norms: dict[str, torch.Tensor] = {}
        all_views = state.views
        for (members, plan), buffer, scale, tables, scratch in zip(
            layout, state.buffers, state.scales, state.tables, state.scratch
        ):
            member_specs = [specs[n] for n in members]
            weights = [lookup(tensors, s.weight, s) for s in member_specs]
            bn = [lookup(tensors, s.running_var, s) for s in member_specs if isinstance(s, BatchNormSpec)]
            factors = batchnorm_factors(bn, tables) if bn else None
            lines = all_line_sums(weights, factors, plan, tables, scratch)
            found = argmax_slices(padded_line_sums(lines, plan, tables), tables)
            values, counts = slice_subgradients(weights, found, factors, plan, tables)
            decays = [gammas[n] for n in members]
            if len(set(decays)) == 1:  # h <- gamma h, on the scales only
                scale.mul_(decays[0])
            else:
                torch._foreach_mul_([all_views[n][1] for n in members], decays)
            current = buffer.take(found.buffer) * scale.take(found.scales)  # h on the arg-max slices
            finite = torch.isfinite(found.norms).index_select(0, tables.entry_layer)
            if rule == "paper":
                step = torch.where(finite, values, 0.0)
                blend = [1 - gammas[n] for n in members]
                if len(set(blend)) == 1:
                    step = step * blend[0]
                else:
                    sizes = [p.slice_size for p in plan.plans]
                    step = torch.cat(torch._foreach_mul(step.split(sizes), blend))
                new = current + step
            else:
                new = torch.where((counts > 0) & finite, values, current)
            buffer.put_(found.buffer, new)
            scale.put_(found.scales, tables.ones)
            have = [(n, s) for n, s in zip(members, member_specs) if grads.get(s.weight) is not None]
            if have:
                count = len(names) if per_layer_beta else 1
                strengths = [betas[n] / count for n, _ in have]
                layer_scales = [all_views[n][1] for n, _ in have]
                if len(set(strengths)) == 1:
                    value = strengths[0]
                else:
                    layer_scales, value = torch._foreach_mul(layer_scales, strengths), 1.0
                buffers = [all_views[n][0] for n, _ in have]
                torch._foreach_addcmul_([grads[s.weight] for _, s in have], buffers, layer_scales, value=value)
            norms.update(zip(members, found.norms.unbind(0)))
        return grads, state, {n: norms[n] for n in names}

    return NormDecayTransform(init, update, names)
