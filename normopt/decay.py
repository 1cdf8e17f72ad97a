r"""Norm decay, as pure functions: subgradients of layer norms and the decay-buffer updates.

The subgradient of a layer's l_inf (l1) norm is the sign of the weights on the arg-max row
(column) of the layer's matrix — for a convolution restricted to that row's tap sets, each tap
counted as often as it enters the line — and zero elsewhere. It lives on one channel slice of the
kernel, so :func:`norm_subgradient` returns it sparsely, as flat indices of that slice with the
values there: a training step then costs one pass over each weight, not several.

The closed form is checked against autodiff (:func:`autodiff_subgradient`: the vector-Jacobian
product of the layer's line sums with the one-hot vector of the arg-max line). These per-layer
functions are the reference that :func:`normopt.norm_decay`, which computes every layer at once,
is tested against. Ties go to the first line in
a fixed order, as in :func:`normopt.layer_argmax`: deterministic, so data-parallel replicas
agree. (Differentiating :func:`normopt.layer_norm` itself spreads the gradient evenly
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

from normopt.deterministic import put
from normopt.lines import checked, line_plan, line_tables, parse_ord, slice_subgradient
from normopt.norms import _line_sums_to_search
from normopt.specs import BatchNormSpec, Spec


class Subgradient(NamedTuple):
    """One layer's norm and a subgradient of it, on the channel slice of the arg-max line.

    Attributes:
        norm: the operator norm, 0-d.
        index: distinct flat indices (row-major, whatever the memory layout) into the weight
            (``gamma`` for batch norm) covering the arg-max line's channel slice.
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


def _regularized(tensors, spec: Spec) -> torch.Tensor:
    shape = (spec.num_features,) if isinstance(spec, BatchNormSpec) else spec.weight_shape
    return checked(tensors, spec.weight, spec, shape)


def _one_hot_argmax(sums: torch.Tensor) -> torch.Tensor:
    flat = sums.reshape(-1)
    return torch.zeros_like(flat).scatter(0, flat.argmax().reshape(1), 1.0).reshape(sums.shape)


def autodiff_subgradient(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense subgradient and per-entry line counts by autodiff: the vjp of the line sums with the arg-max one-hot.

    The counts are the same vjp taken where every weight is +1 (there each absolute value has
    slope 1, so it counts how often each entry enters the line).

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
    weight = _regularized(tensors, spec).detach()
    line_sums_of = lambda w: _line_sums_to_search({**tensors, spec.weight: w}, spec, ord)
    sums, vjp = torch.func.vjp(line_sums_of, weight)
    one_hot = _one_hot_argmax(sums)
    (grad,) = vjp(one_hot)
    if isinstance(spec, BatchNormSpec):
        return grad.to(weight.dtype), one_hot.reshape(-1).to(torch.int64)
    # With every weight positive each |.| has slope 1, so the vjp counts how often each entry enters the line.
    _, vjp_at_ones = torch.func.vjp(line_sums_of, torch.ones_like(weight))
    (counts,) = vjp_at_ones(one_hot)
    return grad.to(weight.dtype), counts.round().to(torch.int64)


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
    weight = _regularized(tensors, spec)
    sums = _line_sums_to_search(tensors, spec, ord)
    if isinstance(spec, BatchNormSpec):
        channel = sums.reshape(-1).argmax().reshape(1)
        var = checked(tensors, spec.running_var, spec, (spec.num_features,))
        values = torch.sign(weight.take(channel)) * torch.rsqrt(var.take(channel).to(sums.dtype) + spec.eps)
        return Subgradient(sums.amax(), channel, values.to(weight.dtype), torch.ones_like(channel))
    plan = line_plan(spec, ord)
    tables = line_tables(plan, weight.device, weight.dtype)
    channel, pattern = torch.unravel_index(sums.reshape(-1).argmax(), sums.shape)
    index = plan.slice_index(channel)
    taps = tables.tap_counts.index_select(0, pattern.reshape(1))[0]  # (K,)
    per_entry = taps.repeat(plan.slice_size // plan.taps)
    group_counts = taps if plan.membership is None else tables.reduce.T.index_select(0, pattern.reshape(1))[0]
    values = slice_subgradient(torch.take(weight, index), group_counts, plan, tables)
    return Subgradient(sums.amax(), index, values.to(weight.dtype), per_entry.round().to(torch.int64))


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

    ``gamma`` may be a float or a 0-d tensor. One pass over ``h``; any memory layout. The result
    has ``h``'s dtype (a float32 ``h`` of bfloat16 weights stays float32).

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([1]), torch.tensor([-1.0]), torch.tensor([1]))
        >>> paper_update(torch.tensor([1.0, 1.0]), sub, gamma=0.5)
        tensor([0.5000, 0.0000])
    """
    new = h * gamma
    return new.put_(sub.index, ((1 - gamma) * sub.values).to(new.dtype), accumulate=True)


def reference_update(h: torch.Tensor, sub: Subgradient, gamma) -> torch.Tensor:
    r"""The released code's rule: :math:`h \leftarrow \gamma h`, the arg-max line of ``h`` set to ``p``.

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([0, 1]), torch.tensor([0.0, -1.0]), torch.tensor([0, 1]))
        >>> reference_update(torch.tensor([4.0, 4.0]), sub, gamma=0.5)  # entry 0 is off the line
        tensor([ 2., -1.])
    """
    new = h * gamma
    return put(new, sub.index, torch.where(sub.counts > 0, sub.values.to(new.dtype), new.take(sub.index)))
