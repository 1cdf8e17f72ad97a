r"""Projections that cap a layer's norm, as pure functions returning new tensors.

* :func:`project_l1_ball` — Euclidean projection of each row of a matrix onto the l1 ball of a
  radius (sort-based, Duchi et al., ICML 2008): :math:`w = \mathrm{sign}(v)\max(|v| - \theta, 0)`
  with the threshold :math:`\theta` that makes :math:`\|w\|_1 = r`; rows already inside are kept.
* :func:`project_layer` — caps a linear or conv layer's l1 or l_inf norm at ``radius`` by projecting
  every row (l_inf) or column (l1) slice of the kernel whose sum exceeds it.
* :func:`project_batchnorm` — clips each :math:`|\gamma_c|` to :math:`r\sqrt{\sigma^2_c + \epsilon}`;
  :func:`project_batchnorm_argmax` sets only the arg-max channel to the radius, as the authors'
  released code does.

A layer with non-finite weights is returned unchanged: its norm, and so what to project, is undefined.
"""

from __future__ import annotations

import functools
import math

import torch

from normopt.arguments import finite_number
from normopt.deterministic import put
from normopt.lines import accumulation_dtype, check_spec, line_plan, parse_ord
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec, check_weight_shape


def _check_radius(radius, where: str = "radius"):
    """The radius as a Python float, or a refusal of one that is not a positive finite number (NaN
    included: ``radius <= 0`` lets it through). A 0-d tensor is not refused (see
    :func:`_inside_a_ball`): on the CPU it is read (free) and comes back as a float, which may be
    negative or NaN; on an accelerator it is taken as it is, unread (a read would synchronise)."""
    if isinstance(radius, torch.Tensor) and radius.dim() == 0:
        # A CPU radius beside accelerator weights as a tensor: torch.where copies a CPU condition
        # to the device and waits for it.
        return float(radius) if radius.device.type == "cpu" and not torch.compiler.is_compiling() else radius
    return finite_number(radius, where)


def _inside_a_ball(radius, projected: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``projected``, or ``original`` where a tensor-given ``radius`` (see :func:`_check_radius`) is
    negative or NaN: no ball to project onto (a scheduled radius gone below zero turned whole
    kernels into NaN), and a tensor radius is never refused. A radius of 0 projects onto the zero map."""
    if isinstance(radius, torch.Tensor):
        return torch.where(radius >= 0, projected, original)
    return projected if radius >= 0 else original  # a float: NaN compares False


def _check_batchnorm(gamma: torch.Tensor, running_var: torch.Tensor, spec: BatchNormSpec, radius):
    radius = _check_radius(radius, f"layer {spec.name!r}: radius")
    for what, t in (("gamma", gamma), ("running_var", running_var)):
        if tuple(t.shape) != (spec.num_features,):
            raise ValueError(f"layer {spec.name!r}: {what} of shape {tuple(t.shape)}, expected ({spec.num_features},)")
    return radius


def _towards_zero(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x >= 0`` rounded towards zero to ``dtype``'s significand, then cast (exactly) to it.

    Written in arithmetic, not as a cast and a step back where it rounded up: inductor keeps a
    low-precision intermediate in float32, so the cast's round trip compared equal and nothing was
    stepped (rows came out 0.2% outside the ball compiled); torch.nextafter has no float16 CUDA
    kernel before torch 2.6.
    """
    info = torch.finfo(dtype)
    digits = round(-math.log2(info.eps)) + 1  # significand bits, the implicit one included
    significand, exponent = torch.frexp(x)  # x = significand * 2**exponent, significand in [0.5, 1)
    normal = torch.ldexp(torch.floor(significand * 2.0**digits), exponent - digits)
    step = info.tiny * info.eps  # the spacing of the subnormals
    return torch.where(x < info.tiny, torch.floor(x / step) * step, normal).to(dtype)


def project_l1_ball(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Project each row of ``v`` (last axis) onto the l1 ball of ``radius``; no host sync.

    Rows must be finite (a NaN row comes back unchanged, an infinite one as NaN):
    :func:`project_layer` leaves layers with non-finite weights alone before calling this.

    Example:
        >>> import torch
        >>> project_l1_ball(torch.tensor([[2.0, -1.0], [0.5, 0.25]]), 2.0)  # the second row is inside
        tensor([[ 1.5000, -0.5000],
                [ 0.5000,  0.2500]])
    """
    radius = _check_radius(radius)
    if v.dim() == 0:
        raise ValueError("project_l1_ball projects the rows of v (its last axis): v is 0-d")
    if not v.is_floating_point():
        raise TypeError(f"project_l1_ball projects real floating-point rows, got {v.dtype}")
    return _inside_a_ball(radius, _project_rows(v, radius), v)


def _project_rows(v: torch.Tensor, radius) -> torch.Tensor:
    """:func:`project_l1_ball` of checked ``v`` and ``radius`` (a negative radius gives NaN rows)."""
    if v.shape[-1] == 0:
        return v
    # In at least float32: a bfloat16 cumsum (and arange, inexact past 256) put the threshold, and
    # the projected row, up to 9% outside the ball.
    acc = accumulation_dtype(v.dtype)
    a = v.abs().to(acc)
    u = a.sort(dim=-1, descending=True).values
    # Duchi et al.'s rho and theta, measured down from the largest entry u_1: with gaps d = u_1 - u,
    # u_j j > css_j - r reads j d_j - cumsum(d)_j < r, and a - theta = (r + cumsum(d)_rho) / rho -
    # (u_1 - a). Written from css = cumsum(u), a radius below half an ulp of u_1 (3e7 against 1 in
    # float32) vanished in css - r: no j counted, gather(-1) indexed -1 and the step raised, and
    # with rho clamped the row came out all zero instead of (r, 0, ...).
    top = u[..., :1]
    gaps = top - u
    gap_sums = gaps.cumsum(-1)
    j = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=acc)
    rho = (gaps * j - gap_sums < radius).sum(-1, keepdim=True).clamp_min(1)  # >= 1: the first term is 0 < r
    kept = (radius + gap_sums.gather(-1, rho - 1)) / rho
    shrunk = (kept - (top - a)).clamp_min(0)
    # A backstop for the rounding of the lines above: a row whose sum still exceeds the radius (by
    # an ulp, on about a quarter of ordinary rows) is scaled onto the ball.
    total = shrunk.sum(-1, keepdim=True)
    shrunk = torch.where(total > radius, shrunk * (radius / total), shrunk)
    if acc != v.dtype:  # rounded towards zero, so that no entry grows back past the float32 ball
        shrunk = _towards_zero(shrunk, v.dtype)
    projected = torch.sign(v) * shrunk
    return torch.where(a.sum(-1, keepdim=True) > radius, projected, v)


@functools.lru_cache(maxsize=4096)
def projection_taps(spec: LinearSpec | ConvSpec, ord) -> tuple[tuple[int, ...], ...]:
    """Per candidate pattern, the flat kernel taps its lines read (each at most once).

    Raises:
        ValueError: naming the layer, when a line reads some tap twice or adds several taps
            before the absolute value (folding padding): then no l1-ball projection of slices
            caps the norm exactly.
    """
    plan = line_plan(spec, parse_ord(ord))
    if plan.membership is not None or any(c > 1 for row in plan.tap_counts for c in row):
        padding = getattr(spec, "padding_mode", "zeros")
        raise ValueError(
            f"layer {spec.name!r}: l1-ball projection needs every tap to enter a line at most once; "
            f"{padding} padding on input size {getattr(spec, 'input_size', None)} folds taps together"
        )
    return tuple(tuple(i for i, c in enumerate(row) if c) for row in plan.tap_counts)


def check_projectable(spec: LinearSpec | ConvSpec, ord) -> None:
    """Raise ValueError, naming the layer, if :func:`project_layer` cannot cap it exactly."""
    projection_taps(spec, ord)


def tap_tables(spec: LinearSpec | ConvSpec, ord, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`projection_taps` as index tensors on ``device``; build once and pass to :func:`project_layer`."""
    return tuple(torch.tensor(taps, dtype=torch.int64, device=device) for taps in projection_taps(spec, ord))


def project_layer(
    weight: torch.Tensor, spec: LinearSpec | ConvSpec, ord, radius: float, taps: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """Kernel whose every row (l_inf) or column (l1) sums to at most ``radius``, as a new tensor.

    Each row (column) slice above the radius is projected onto the l1 ball, one tap pattern after
    another. A projection only shrinks magnitudes, so slices handled earlier stay inside the ball;
    with disjoint or nested patterns (a zero-padded layer on an input with a position that every
    tap reads) the result is the exact Euclidean projection of each slice. Patterns that overlap
    without nesting (a short input: ``Conv1d(1, 1, 3, padding=1)`` on 2 samples reads taps {1, 2}
    and {0, 1}) still end with every line in the ball, but not at the nearest such kernel.
    ``taps`` are the layer's :func:`tap_tables` (built here if omitted).
    Non-finite weights leave the kernel unchanged (a kernel's taps that no line reads are never
    changed, and do not count); so does an empty layer (the zero map). Low-precision kernels are
    projected in float32 and rounded towards zero, so their norm is at most ``radius`` to float32's
    round-off. ``radius`` is a positive number, or a 0-d tensor (never read on the host: one below
    zero or NaN leaves the kernel unchanged, 0 gives the zero map).

    Example:
        >>> import torch
        >>> from normopt.specs import LinearSpec
        >>> spec = LinearSpec("fc", "fc.weight", in_features=2, out_features=2)
        >>> project_layer(torch.tensor([[3.0, 1.0], [0.5, 0.0]]), spec, "linf", 2.0)
        tensor([[2.0000, 0.0000],
                [0.5000, 0.0000]])
    """
    check_spec(spec, "project_layer")
    if not isinstance(spec, (LinearSpec, ConvSpec)):
        kind = type(spec).__name__
        raise TypeError(f"layer {spec.name!r} is described by a {kind}: project_layer caps linear and conv layers")
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"layer {spec.name!r}: projection caps the l1 or l_inf norm, not ord={ord}")
    radius = _check_radius(radius, f"layer {spec.name!r}: radius")
    check_weight_shape(weight, spec)
    if weight.numel() == 0:  # the zero map, of norm 0: inside every ball
        return weight.clone()
    if taps is None:
        taps = tap_tables(spec, ord, weight.device)
    groups = getattr(spec, "groups", 1)
    rows = (ord == math.inf) != getattr(spec, "transposed", False)
    d, cg = weight.shape[:2]
    w = weight.reshape(d, cg, -1)
    # Only the taps some line reads: a kernel larger than its zero-padded input holds others, which
    # the layer's matrix never reads (its norm is finite whatever they hold); they are kept as they are.
    if not taps:  # no line reads any tap
        return weight.clone()
    finite = torch.stack([torch.isfinite(w.index_select(2, index)).all() for index in taps]).all()
    for index in taps:
        part = torch.nan_to_num(w.index_select(2, index), nan=0.0, posinf=0.0, neginf=0.0)  # (d, cg, t)
        if rows:
            new = _project_rows(part.reshape(d, -1), radius).reshape(part.shape)
        else:
            # Columns of input channel c gather its group's output channels: (g, d/g, cg, t).
            by_input = part.reshape(groups, d // groups, cg, -1).permute(0, 2, 1, 3)
            flat = by_input.reshape(groups * cg, -1)
            new = _project_rows(flat, radius).reshape(by_input.shape).permute(0, 2, 1, 3).reshape(part.shape)
        w = w.index_copy(2, index, new)
    return _inside_a_ball(radius, torch.where(finite, w.reshape(weight.shape), weight), weight)


def project_batchnorm(gamma: torch.Tensor, running_var: torch.Tensor, spec: BatchNormSpec, radius: float) -> torch.Tensor:
    r"""``gamma`` with :math:`|\gamma_c| / \sqrt{\sigma^2_c + \epsilon} \le r` for every channel.

    A bfloat16 or float16 ``gamma`` is capped in float32 and rounded towards zero: inside the
    radius to float32's round-off (not to its own dtype's, 0.13% over in bfloat16 before).

    Example:
        >>> import torch
        >>> from normopt.specs import BatchNormSpec
        >>> spec = BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=2, eps=0.0)
        >>> project_batchnorm(torch.tensor([-8.0, 1.0]), torch.tensor([1.0, 1.0]), spec, 5.0)
        tensor([-5.,  1.])
    """
    radius = _check_batchnorm(gamma, running_var, spec, radius)
    bound = radius * _bn_scale(gamma, running_var, spec)
    if bound.dtype != gamma.dtype:  # copysign keeps a -0.0 (a product with sign() did not)
        capped = torch.copysign(_towards_zero(torch.minimum(gamma.abs().to(bound.dtype), bound), gamma.dtype), gamma)
    else:
        capped = torch.maximum(torch.minimum(gamma, bound), -bound)
    return _inside_a_ball(radius, capped, gamma)


def _bn_scale(gamma: torch.Tensor, running_var: torch.Tensor, spec: BatchNormSpec) -> torch.Tensor:
    """``sqrt(running_var + eps)`` per channel, in float32 for a low-precision ``gamma``: a cap
    computed in its own dtype rounds up as often as down (a bfloat16 one came out 0.13% above the
    radius), so the projections round it towards zero once it is known (:func:`_towards_zero`)."""
    return torch.sqrt(running_var.to(torch.promote_types(gamma.dtype, torch.float32)) + spec.eps)


def project_batchnorm_argmax(gamma: torch.Tensor, running_var: torch.Tensor, spec: BatchNormSpec, radius: float) -> torch.Tensor:
    r"""``gamma`` with only its arg-max channel set to :math:`r\sqrt{\sigma^2_c + \epsilon}\,\mathrm{sign}(\gamma_c)`
    when that channel's norm exceeds ``r``: the released code's batch-norm projection.

    Other channels may stay above the radius (only the largest is touched per call).

    Example:
        >>> import torch
        >>> from normopt.specs import BatchNormSpec
        >>> spec = BatchNormSpec("bn", "bn.weight", "bn.running_var", num_features=3, eps=0.0)
        >>> project_batchnorm_argmax(torch.tensor([-8.0, 6.0, 1.0]), torch.ones(3), spec, 5.0)
        tensor([-5.,  6.,  1.])
    """
    radius = _check_batchnorm(gamma, running_var, spec, radius)
    scale = _bn_scale(gamma, running_var, spec)
    norms = gamma.abs().to(scale.dtype) / scale
    channel = norms.argmax().reshape(1)
    capped = radius * scale.take(channel)
    if scale.dtype != gamma.dtype:
        capped = _towards_zero(capped, gamma.dtype)
    new = torch.where(norms.take(channel) > radius, capped * torch.sign(gamma.take(channel)), gamma.take(channel))
    return put(gamma.clone(), channel, _inside_a_ball(radius, new, gamma.take(channel)))
