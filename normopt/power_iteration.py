"""A conv layer's own spectral norm (its padding, stride and input size) by power iteration."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from normopt.arguments import positive_int
from normopt.lines import accumulation_dtype
from normopt.specs import ConvSpec, check_weight_shape


def _forward(spec: ConvSpec, weight: torch.Tensor):
    """The layer's linear map (no bias) on one batch, for any padding mode, and transposed layers."""
    if spec.transposed:
        conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[len(spec.kernel_size) - 1]
        pads = tuple(p for p, _ in spec.padding)
        return lambda x: conv_t(x, weight, None, spec.stride, pads, spec.output_padding, spec.groups, spec.dilation)
    conv = (F.conv1d, F.conv2d, F.conv3d)[len(spec.kernel_size) - 1]
    pad = tuple(p for pair in reversed(spec.padding) for p in pair)  # F.pad wants the last axis first
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return lambda x: conv(F.pad(x, pad, mode=mode), weight, None, spec.stride, 0, spec.dilation, spec.groups)


def power_iteration_norm(weight: torch.Tensor, spec: ConvSpec, iterations: int = 500, tol: float | None = 1e-7, seed: int = 0):
    """Spectral norm of the layer itself (its padding, stride and input size) by power iteration.

    Iterates ``v <- A^T A v / ||A^T A v||`` with the adjoint from ``torch.func.vjp``; stops after
    ``iterations`` or when the estimate changes by less than ``tol`` relative (one host read per
    iteration: an analysis tool, not a per-step one). ``tol=None`` runs exactly ``iterations``,
    reading nothing back until the end, as a timing needs (``tol=0`` still stops once two estimates
    are equal: after 293 of 500 iterations on one randomly initialised 3x3 32-channel conv).
    Returns a 0-d tensor, ``||A v||``, in at least float32: bfloat16 and float16 weights are
    iterated in float32, where their own precision left the estimate up to 3% below the norm. An
    empty layer is the zero map, of norm 0.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> layer = nn.Conv1d(1, 1, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        >>> spec = normopt.module_spec(layer, "", (3,))  # [[1, 1, 0], [0, 1, 1]]: sigma = sqrt(3)
        >>> round(float(power_iteration_norm(layer.weight.detach(), spec)) ** 2, 4)
        3.0
    """
    weight = _checked(weight, spec, iterations, tol, seed)
    iterations, seed = int(iterations), int(seed)
    tol = None if tol is None else float(tol)
    if weight.numel() == 0:
        return weight.new_zeros(())
    # In the weight's dtype inside torch.autocast too (which would run the convolutions in bfloat16).
    if not torch.amp.is_autocast_available(weight.device.type):
        return _iterate(_forward(spec, weight), spec, weight, iterations, tol, seed)
    with torch.autocast(weight.device.type, enabled=False):
        return _iterate(_forward(spec, weight), spec, weight, iterations, tol, seed)


def _checked(weight: torch.Tensor, spec: ConvSpec, iterations: int, tol: float, seed: int) -> torch.Tensor:
    """The weight to iterate with (detached, in at least float32), or a refusal naming the layer."""
    if not isinstance(spec, ConvSpec):
        raise TypeError(
            f"layer {getattr(spec, 'name', spec)!r} is described by a {type(spec).__name__}: power iteration takes "
            "conv layers (a linear layer's spectral norm is torch.linalg.matrix_norm(weight, 2))"
        )
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: power iteration needs the layer's input size")
    positive_int(iterations, f"layer {spec.name!r}: iterations")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf):
        raise ValueError(f"layer {spec.name!r}: tol must be a finite number >= 0 or None, got {tol!r}")
    # torch.Generator's range: a seed beyond it failed there with "Overflow when unpacking long long"
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"layer {spec.name!r}: seed must be an int in [-2**63, 2**64), got {seed!r}")
    if not isinstance(weight, torch.Tensor) or weight.is_complex() or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"layer {spec.name!r}: power iteration needs a real floating-point weight, got {got}")
    check_weight_shape(weight, spec)
    if weight.device.type == "meta":
        raise ValueError(f"layer {spec.name!r}: the weight is on the meta device; its norm needs its values")
    return weight.detach().to(accumulation_dtype(weight.dtype))


def _smallest_unscaled(dtype: torch.dtype) -> float:
    """The smallest largest entry of ``A v`` that the iteration takes unscaled, ``sqrt(tiny) / eps``
    (9e-13 for float32, 7e-139 for float64): ``A^T A v`` is then at least about its square (8e-25
    in float32), clear of the subnormals (full precision down to ``tiny / eps``, 1e-31), and
    :func:`_norm` takes its norm scaled where its squares would fall subnormal."""
    finfo = torch.finfo(dtype)
    return finfo.tiny**0.5 / finfo.eps


def _norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||``, where torch's (a sum of unscaled squares) loses precision in subnormal squares or
    overflows to inf: of ``x`` scaled by its largest entry there (a largest entry under
    ``sqrt(n * tiny)``, below which the subnormal squares of its ``n`` entries, each off by at most
    ``tiny * eps / 2``, could add more than rounding to the sum; or an infinite plain norm), the plain
    norm elsewhere (the same bits as torch's). No host read."""
    finfo = torch.finfo(x.dtype)
    plain = x.norm()
    largest = x.abs().amax()
    scaled = (x / largest.clamp_min(finfo.tiny)).norm() * largest
    exact = largest >= (x.numel() * finfo.tiny) ** 0.5
    return torch.where(exact & torch.isfinite(plain), plain, scaled)


def _iterate(forward, spec: ConvSpec, weight: torch.Tensor, iterations: int, tol: float | None, seed: int) -> torch.Tensor:
    channels = spec.in_channels
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn((1, channels, *spec.input_size), generator=generator, dtype=weight.dtype).to(weight.device)
    v = v / v.norm()
    # A^T A v is of size sigma^2: past sigma ~ 1e9 (float32) its squares overflowed torch's norm,
    # past ~ 1e19 it overflowed itself, and below ~ 1e-11 it underflowed, so that v became 0 (or
    # NaN) and the norm read 0 (or NaN). Out of that range A v is scaled to a largest entry of 1
    # before the adjoint; within it, it is divided by exactly 1 (the same bits as unscaled). The low
    # end keeps A^T A v clear of the subnormals (see _smallest_unscaled).
    finfo = torch.finfo(weight.dtype)
    low, high = _smallest_unscaled(weight.dtype), finfo.max**0.25
    estimate = 0.0
    for _ in range(iterations):
        out, adjoint = torch.func.vjp(forward, v)
        largest = out.abs().amax()
        scale = torch.where((largest > high) | (largest < low), largest.clamp_min(finfo.tiny), 1.0)
        (w,) = adjoint(out / scale)
        norm = _norm(w)
        v = torch.where(norm > 0, w / norm, torch.zeros_like(w))  # the zero map: v = 0, of norm 0
        if tol is None:
            continue
        previous, estimate = estimate, (float(norm) * float(scale)) ** 0.5
        if estimate == 0 or abs(estimate - previous) <= tol * estimate:
            break
    return _norm(forward(v))
