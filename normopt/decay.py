r"""Norm decay, as pure functions: subgradients of layer norms and the decay-buffer updates.

The subgradient of a layer's l_inf (l1) norm is the sign of the weights on the arg-max row
(column) of the layer's matrix — for a convolution restricted to that row's tap sets — and zero
elsewhere. It is computed by autodiff: the vector-Jacobian product of the layer's line sums
(:mod:`normopt.norms`) with the one-hot vector of the arg-max line. Ties go to the first line in
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
    _weight,
    parse_ord,
)
from normopt.specs import BatchNormSpec, Spec


class Subgradient(NamedTuple):
    """One layer's norm and a subgradient of it with respect to its weight.

    Attributes:
        norm: the operator norm, 0-d.
        grad: the subgradient, shaped like the weight (``gamma`` for batch norm).
        support: boolean, shaped like the weight: the entries on the arg-max row or column,
            including those whose weight (and so whose ``grad``) is zero. Only computed when asked
            for; None otherwise.
    """

    norm: torch.Tensor
    grad: torch.Tensor
    support: torch.Tensor | None


def _one_hot_argmax(sums: torch.Tensor) -> torch.Tensor:
    flat = sums.reshape(-1)
    return torch.zeros_like(flat).scatter(0, flat.argmax().reshape(1), 1.0).reshape(sums.shape)


def _support(weight: torch.Tensor, spec: Spec, ord: float, one_hot: torch.Tensor) -> torch.Tensor:
    """Entries of ``weight`` that enter the line picked by ``one_hot``: the transposes of the two
    linear maps (tap merging, then line reduction) applied to it, which are non-negative."""
    if isinstance(spec, BatchNormSpec):
        return one_hot > 0
    kind, plans, _ = _line_plan(spec, ord)
    acc = _accumulation_dtype(weight.dtype)
    merged, merge_vjp = torch.func.vjp(lambda w: _merge_taps(w, plans), weight.detach().to(acc))
    _, reduce_vjp = torch.func.vjp(lambda a: _reduce_lines(a, getattr(spec, "groups", 1), plans, kind), merged)
    (counts,) = merge_vjp(*reduce_vjp(one_hot))
    return counts > 0


def norm_subgradient(tensors: Mapping[str, torch.Tensor], spec: Spec, ord=1, support: bool = False) -> Subgradient:
    """Norm of one layer and the subgradient of that norm with respect to its weight.

    Args:
        tensors: ``{name: tensor}`` holding the layer's weight (and batch norm's running variance).
        spec: the layer's spec; batch norm needs affine weights.
        ord: ``1``/``"l1"`` or ``float("inf")``/``"linf"``.
        support: also return the boolean mask of the arg-max line (for :func:`reference_update`).

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> sub = norm_subgradient({"fc.weight": torch.tensor([[1.0, -2.0], [3.0, 0.0]])}, spec, "linf", support=True)
        >>> sub.norm, sub.grad, sub.support
        (tensor(3.), tensor([[ 1., -1.],
                [ 0.,  0.]]), tensor([[ True,  True],
                [False, False]]))
    """
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"layer {spec.name!r}: norm decay supports the l1 and l_inf norms, not ord={ord}")
    key = spec.weight  # batch norm: gamma
    if key is None:
        raise ValueError(f"layer {spec.name!r}: batch norm without affine weights has nothing to regularize")
    if isinstance(spec, BatchNormSpec):
        weight = _checked(tensors, key, spec, (spec.num_features,))
        needed = {spec.running_var: _checked(tensors, spec.running_var, spec, (spec.num_features,))}
    else:
        weight, needed = _weight(tensors, spec), {}
    sums, vjp = torch.func.vjp(lambda w: _line_sums({**needed, key: w}, spec, ord)[0], weight.detach())
    one_hot = _one_hot_argmax(sums)
    (grad,) = vjp(one_hot)
    mask = _support(weight, spec, ord, one_hot) if support else None
    return Subgradient(sums.amax(), grad.to(weight.dtype), mask)


def norm_subgradients(
    tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1, support: bool = False
) -> dict[str, Subgradient]:
    """:func:`norm_subgradient` of every layer in ``specs``, keyed by layer name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from normopt import layer_specs
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3))
        >>> subs = norm_subgradients(model.state_dict(), layer_specs(model, torch.zeros(1, 1, 4, 4)), "l1")
        >>> subs["0"].grad.shape, subs["2"].grad.shape
        (torch.Size([2, 1, 3, 3]), torch.Size([3, 32]))
    """
    return {name: norm_subgradient(tensors, spec, ord, support) for name, spec in specs.items()}


def paper_update(h: torch.Tensor, sub: Subgradient, gamma: float) -> torch.Tensor:
    r"""Algorithm 1 of the paper: :math:`h \leftarrow \gamma h + (1 - \gamma) p`.

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([1.0, -1.0]), None)
        >>> paper_update(torch.tensor([1.0, 1.0]), sub, gamma=0.5)
        tensor([1., 0.])
    """
    return torch.lerp(sub.grad, h, gamma) if h is not None else (1 - gamma) * sub.grad


def reference_update(h: torch.Tensor, sub: Subgradient, gamma: float) -> torch.Tensor:
    r"""The released code's rule: :math:`h \leftarrow \gamma h`, the arg-max line of ``h`` set to ``p``.

    Example:
        >>> import torch
        >>> sub = Subgradient(torch.tensor(1.0), torch.tensor([0.0, -1.0]), torch.tensor([False, True]))
        >>> reference_update(torch.tensor([4.0, 4.0]), sub, gamma=0.5)
        tensor([ 2., -1.])
    """
    if sub.support is None:
        raise ValueError("reference_update needs the arg-max support: compute subgradients with support=True")
    decayed = gamma * h if h is not None else torch.zeros_like(sub.grad)
    return torch.where(sub.support, sub.grad, decayed)
