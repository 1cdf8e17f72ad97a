r"""Norm decay, as pure functions: subgradients of layer norms and the decay-buffer updates.

The subgradient of a layer's l_inf (l1) norm is the sign of the weights on the arg-max row
(column) of the layer's matrix — for a convolution restricted to that row's tap sets, each tap
counted as often as it enters the line — and zero elsewhere. It lives on one channel slice of the
kernel, so :func:`norm_subgradient` returns it sparsely, as flat indices of that slice with the
values there: a training step then costs one pass over each weight, not several.

The closed form is checked against autodiff (:func:`autodiff_subgradient`: the vector-Jacobian
product of the layer's line sums with the one-hot vector of the arg-max line), which also serves
the rare layers whose padding folds several taps onto one sample. Ties go to the first line in
``torch.argmax`` order, as in :func:`normopt.layer_argmax`: deterministic, so data-parallel
replicas agree. (Differentiating :func:`normopt.layer_norm` itself spreads the gradient evenly
over tied lines instead, also a valid subgradient.)

Two rules turn subgradients ``p`` into the decay buffer ``h`` that is added to the gradient:

* :func:`paper_update` — Algorithm 1 of Liang & Huang (2021):
  :math:`h \leftarrow \gamma h + (1 - \gamma) p`, added as :math:`(\beta / N) h`.
* :func:`reference_update` — the authors' released code: :math:`h \leftarrow \gamma h`, then the
  current arg-max line of ``h`` overwritten by ``p``, added as :math:`\beta h`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from normopt.norms import (
    _accumulation_dtype,
    _checked,
    _line_plan,
    _line_sums,
    _merge_taps,
    _reduce_lines,
    _table,
    _weight,
    parse_ord,
)
from normopt.specs import BatchNormSpec, Spec


class Subgradient(NamedTuple):
    """One layer's norm and a subgradient of it, on the channel slice of the arg-max line.

    Attributes:
        norm: the operator norm, 0-d.
        index: distinct flat indices into the weight (``gamma`` for batch norm) covering the
            arg-max line's channel slice.
        values: the subgradient at ``index``; it is zero everywhere else.
        counts: how often each entry at ``index`` enters the arg-max line (0: not on it).
    """

    norm: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """The subgradient as a tensor shaped like the weight ``like``."""
        flat = torch.zeros(like.numel(), dtype=self.values.dtype, device=self.values.device)
        return flat.index_copy(0, self.index, self.values).view(like.shape)

    def support(self, like: torch.Tensor) -> torch.Tensor:
        """Boolean mask, shaped like the weight ``like``, of the entries on the arg-max line."""
        flat = torch.zeros(like.numel(), dtype=torch.bool, device=self.index.device)
        return flat.index_copy(0, self.index, self.counts > 0).view(like.shape)

    def masked(self, keep: torch.Tensor) -> Subgradient:
        """This subgradient where ``keep`` (0-d bool) holds; one with no line where it does not."""
        values = torch.where(keep, self.values, torch.zeros_like(self.values))
        return Subgradient(self.norm, self.index, values, torch.where(keep, self.counts, torch.zeros_like(self.counts)))


def _decay_ord(ord, spec: Spec) -> float:
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"layer {spec.name!r}: norm decay supports the l1 and l_inf norms, not ord={ord}")
    if spec.weight is None:
        raise ValueError(f"layer {spec.name!r}: batch norm without affine weights has nothing to regularize")
    return ord


def _inputs(tensors, spec: Spec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The regularized tensor and the other tensors its norm reads."""
    if isinstance(spec, BatchNormSpec):
        shape = (spec.num_features,)
        return _checked(tensors, spec.weight, spec, shape), {spec.running_var: _checked(tensors, spec.running_var, spec, shape)}
    return _weight(tensors, spec), {}


def _one_hot_argmax(sums: torch.Tensor) -> torch.Tensor:
    flat = sums.reshape(-1)
    return torch.zeros_like(flat).scatter(0, flat.argmax().reshape(1), 1.0).reshape(sums.shape)


def autodiff_subgradient(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense subgradient and per-entry line counts by autodiff: the vjp of the line sums with the arg-max one-hot.

    The counts come from the transposes of the two linear maps behind the line sums (tap merging,
    then line reduction) applied to the same one-hot vector.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
        >>> grad, counts = autodiff_subgradient({"w": weight}, LinearSpec("fc", "w", 2, 2), "linf")
        >>> grad, counts
        (tensor([[ 1., -1.],
                [ 0.,  0.]]), tensor([[1, 1],
                [0, 0]]))
    """
    ord = _decay_ord(ord, spec)
    weight, others = _inputs(tensors, spec)
    sums, vjp = torch.func.vjp(lambda w: _line_sums({**others, spec.weight: w}, spec, ord)[0], weight.detach())
    one_hot = _one_hot_argmax(sums)
    (grad,) = vjp(one_hot)
    if isinstance(spec, BatchNormSpec):
        return grad.to(weight.dtype), one_hot.to(torch.int64)
    kind, plans, _ = _line_plan(spec, ord)
    acc = _accumulation_dtype(weight.dtype)
    merged, merge_vjp = torch.func.vjp(lambda w: _merge_taps(w, plans), weight.detach().to(acc))
    _, reduce_vjp = torch.func.vjp(lambda a: _reduce_lines(a, getattr(spec, "groups", 1), plans, kind), merged)
    (counts,) = merge_vjp(*reduce_vjp(one_hot))
    return grad.to(weight.dtype), counts.round().to(torch.int64)


def _tap_counts(plans, patterns: tuple[torch.Tensor, ...], device: torch.device) -> torch.Tensor:
    """Flattened kernel taps: how often each enters the chosen pattern of every axis."""
    counts = torch.ones(1, dtype=torch.int64, device=device)
    for plan, p in zip(plans, patterns):
        row = _table(plan.tap_table, device, torch.int64).index_select(0, p.reshape(1))[0]
        counts = (counts.unsqueeze(-1) * row).reshape(-1)
    return counts


def _slice_index(
    shape: torch.Size, groups: int, kind: str, channel: torch.Tensor, taps: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Flat indices of a row's (output channel's) or column's (input channel's) kernel slice, with tap counts."""
    d, cg, k = shape[0], shape[1], taps.numel()
    if kind == "rows":
        index = channel * (cg * k) + torch.arange(cg * k, device=taps.device)
        return index, taps.expand(cg, k).reshape(-1)
    dg = d // groups
    group, local = channel // cg, channel % cg
    outputs = group * dg + torch.arange(dg, device=taps.device)
    index = ((outputs.unsqueeze(1) * cg + local) * k + torch.arange(k, device=taps.device)).reshape(-1)
    return index, taps.expand(dg, k).reshape(-1)


def norm_subgradient(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1) -> Subgradient:
    """Norm of one layer and the subgradient of that norm on its arg-max line, without host sync.

    Args:
        tensors: ``{name: tensor}`` holding the layer's weight (and batch norm's running variance).
        spec: the layer's spec; batch norm needs affine weights.
        ord: ``1``/``"l1"`` or ``float("inf")``/``"linf"``.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> weight = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
        >>> sub = norm_subgradient({"w": weight}, LinearSpec("fc", "w", 2, 2), "l1")  # column 0: 1 + 3
        >>> sub.norm, sub.dense(weight)
        (tensor(4.), tensor([[1., 0.],
                [1., 0.]]))
    """
    ord = _decay_ord(ord, spec)
    weight, others = _inputs(tensors, spec)
    sums, _ = _line_sums({**others, spec.weight: weight}, spec, ord)
    if isinstance(spec, BatchNormSpec):
        channel = sums.argmax().reshape(1)
        var = others[spec.running_var]
        values = torch.sign(weight.take(channel)) * torch.rsqrt(var.take(channel).to(sums.dtype) + spec.eps)
        return Subgradient(sums.amax(), channel, values.to(weight.dtype), torch.ones_like(channel))
    kind, plans, _ = _line_plan(spec, ord)
    if any(plan.membership is not None for plan in plans):
        grad, counts = autodiff_subgradient(tensors, spec, ord)
        index = torch.arange(weight.numel(), device=weight.device)
        return Subgradient(sums.amax(), index, grad.reshape(-1), counts.reshape(-1))
    channel, *patterns = torch.unravel_index(sums.reshape(-1).argmax(), sums.shape)
    taps = _tap_counts(plans, patterns, weight.device)
    index, counts = _slice_index(weight.shape, getattr(spec, "groups", 1), kind, channel, taps)
    values = counts.to(weight.dtype) * torch.sign(weight.reshape(-1).take(index))
    return Subgradient(sums.amax(), index, values, counts)


def norm_subgradients(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1) -> dict[str, Subgradient]:
    """:func:`norm_subgradient` of every layer in ``specs``, keyed by layer name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from normopt import layer_specs
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
        >>> subs = norm_subgradients(model.state_dict(), layer_specs(model, torch.zeros(1, 1, 4, 4)), "l1")
        >>> subs["0"].dense(model[0].weight).shape, subs["2"].index.shape  # column: all 3 outputs
        (torch.Size([2, 1, 3, 3]), torch.Size([3]))
    """
    return {name: norm_subgradient(tensors, spec, ord) for name, spec in specs.items()}


def paper_update(h: torch.Tensor, sub: Subgradient, gamma) -> torch.Tensor:
    r"""Algorithm 1 of the paper: :math:`h \leftarrow \gamma h + (1 - \gamma) p`, as a new tensor.

    ``gamma`` may be a float or a 0-d tensor. One pass over ``h``.

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([1]), torch.tensor([-1.0]), torch.tensor([1]))
        >>> paper_update(torch.tensor([1.0, 1.0]), sub, gamma=0.5)
        tensor([0.5000, 0.0000])
    """
    new = h * gamma
    new.view(-1).index_add_(0, sub.index, (1 - gamma) * sub.values)
    return new


def reference_update(h: torch.Tensor, sub: Subgradient, gamma) -> torch.Tensor:
    r"""The released code's rule: :math:`h \leftarrow \gamma h`, the arg-max line of ``h`` set to ``p``.

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([0, 1]), torch.tensor([0.0, -1.0]), torch.tensor([0, 1]))
        >>> reference_update(torch.tensor([4.0, 4.0]), sub, gamma=0.5)  # entry 0 is off the line
        tensor([ 2., -1.])
    """
    new = h * gamma
    flat = new.view(-1)
    flat.index_copy_(0, sub.index, torch.where(sub.counts > 0, sub.values, flat.take(sub.index)))
    return new
