r"""Projections that cap a layer's norm, as pure functions returning new tensors.

* :func:`project_l1_ball` — Euclidean projection of each row of a matrix onto the l1 ball of a
  radius (sort-based, Duchi et al., ICML 2008): :math:`w = \mathrm{sign}(v)\max(|v| - \theta, 0)`
  with the threshold :math:`\theta` that makes :math:`\|w\|_1 = r`; rows already inside are kept.
* :func:`project_layer` — caps a linear or conv layer's l1 or l_inf norm at ``radius`` by projecting
  every row (l_inf) or column (l1) slice of the kernel whose sum exceeds it.
* :func:`project_batchnorm` — clips each :math:`|\gamma_c|` to :math:`r\sqrt{\sigma^2_c + \epsilon}`.
"""

from __future__ import annotations

import itertools
import math

import torch

from normopt.norms import _line_plan, parse_ord
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Project each row of ``v`` (last axis) onto the l1 ball of ``radius``; no host sync.

    Example:
        >>> import torch
        >>> project_l1_ball(torch.tensor([[2.0, -1.0], [0.5, 0.25]]), 2.0)  # the second row is inside
        tensor([[ 1.5000, -0.5000],
                [ 0.5000,  0.2500]])
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    if v.shape[-1] == 0:
        return v
    a = v.abs()
    u = a.sort(dim=-1, descending=True).values
    css = u.cumsum(-1)
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = (u * j > css - radius).sum(-1, keepdim=True)  # >= 1 since u_1 > u_1 - radius
    theta = (css.gather(-1, rho - 1) - radius) / rho
    projected = torch.sign(v) * (a - theta).clamp_min(0)
    return torch.where(a.sum(-1, keepdim=True) > radius, projected, v)


def check_projectable(spec: LinearSpec | ConvSpec, ord) -> None:
    """Raise ValueError, naming the layer, if :func:`project_layer` cannot cap it exactly."""
    if isinstance(spec, ConvSpec):
        _tap_masks(spec, parse_ord(ord))


def _tap_masks(spec: ConvSpec, ord: float) -> list[torch.Tensor]:
    """One 0/1 tap mask (kernel-shaped) per combination of per-axis patterns."""
    _, plans, _ = _line_plan(spec, ord)
    per_axis = []
    for plan in plans:
        rows = plan.tap_table
        if plan.membership is not None or any(c > 1 for row in rows for c in row):
            raise ValueError(
                f"layer {spec.name!r}: l1-ball projection needs every tap to enter a line at most once; "
                f"{spec.padding_mode} padding on input size {spec.input_size} folds taps together"
            )
        per_axis.append([torch.tensor(row, dtype=torch.bool) for row in rows])
    masks = []
    for combo in itertools.product(*per_axis):
        mask = torch.ones((), dtype=torch.bool)
        for axis_mask in combo:
            mask = mask.unsqueeze(-1) & axis_mask
        masks.append(mask)
    return masks


def project_layer(weight: torch.Tensor, spec: LinearSpec | ConvSpec, ord, radius: float) -> torch.Tensor:
    """Kernel whose every row (l_inf) or column (l1) sums to at most ``radius``, as a new tensor.

    Each row (column) slice above the radius is projected onto the l1 ball, one tap pattern after
    another. A projection only shrinks magnitudes, so slices handled earlier stay inside the ball;
    with disjoint or nested patterns (every zero-padded layer) the result is the exact Euclidean
    projection of each slice.

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> project_layer(torch.tensor([[3.0, 1.0], [0.5, 0.0]]), spec, "linf", 2.0)
        tensor([[2.0000, 0.0000],
                [0.5000, 0.0000]])
    """
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"layer {spec.name!r}: projection caps the l1 or l_inf norm, not ord={ord}")
    groups = getattr(spec, "groups", 1)
    rows = (ord == math.inf) != getattr(spec, "transposed", False)
    d, cg = weight.shape[:2]
    masks = _tap_masks(spec, ord) if isinstance(spec, ConvSpec) else [torch.ones((), dtype=torch.bool)]
    w = weight.reshape(d, cg, -1)
    for mask in masks:
        taps = mask.reshape(-1).nonzero().flatten().to(weight.device)
        part = w.index_select(2, taps)  # (d, cg, t)
        if rows:
            new = project_l1_ball(part.reshape(d, -1), radius).reshape(part.shape)
        else:
            # Columns of input channel c gather its group's output channels: (g, d/g, cg, t).
            by_input = part.reshape(groups, d // groups, cg, -1).permute(0, 2, 1, 3)
            flat = by_input.reshape(groups * cg, -1)
            new = project_l1_ball(flat, radius).reshape(by_input.shape).permute(0, 2, 1, 3).reshape(part.shape)
        w = w.index_copy(2, taps, new)
    return w.reshape(weight.shape)


def project_batchnorm(gamma: torch.Tensor, running_var: torch.Tensor, spec: BatchNormSpec, radius: float) -> torch.Tensor:
    r"""``gamma`` with :math:`|\gamma_c| / \sqrt{\sigma^2_c + \epsilon} \le r` for every channel.

    Example:
        >>> import torch
        >>> from normopt.specs import BatchNormSpec
        >>> spec = BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=2, eps=0.0)
        >>> project_batchnorm(torch.tensor([-8.0, 1.0]), torch.tensor([1.0, 1.0]), spec, 5.0)
        tensor([-5.,  1.])
    """
    if radius <= 0:
        raise ValueError(f"layer {spec.name!r}: radius must be positive, got {radius}")
    bound = radius * torch.sqrt(running_var.to(gamma.dtype) + spec.eps)
    return torch.maximum(torch.minimum(gamma, bound), -bound)
