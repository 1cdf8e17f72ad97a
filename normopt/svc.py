r"""Singular value clipping (SVC) of convolutions, and spectral-norm bounds of conv layers.

Clipping the singular values of every transfer matrix :math:`\hat K(f)` (see
:mod:`normopt.spectrum`) at ``c`` and transforming back gives the nearest circular convolution with
spectral norm at most ``c``; cropping that to the kernel's support keeps the layer's shape, exactly
so when the kernel is as large as the input and approximately otherwise (repeat the clip and crop
to shrink the residual).

For a zero-padded (or strided) layer on an ``n``-sized input with paddings ``p_l, p_r`` the matrix
is a restriction of the circular convolution on ``n + p_l + p_r`` (the padded input embeds
isometrically, outputs and strides select rows), so the latter's spectral norm bounds the layer's;
:func:`layer_spectral_bound` uses that size, and
:func:`~normopt.power_iteration.power_iteration_norm` estimates the layer's own value. The
clipped kernels are computed on the CPU, outside ``torch.compile``, and reach every replica
through a broadcast, so they stay bit-identical.

The default ``method="gram"`` needs no SVD: with ``K^H K = V diag(s^2) V^H`` (eigh of the smaller
Gram matrix) the clip is ``K - K V_+ diag(1 - c/s_+) V_+^H`` over the eigenvectors ``V_+`` whose
value exceeds ``c`` only, for the frequencies whose largest value exceeds ``c`` only, then once more
along the Ritz vectors of the result in the span of ``V_+`` (the subtraction cancels: without it a
value far above ``c`` landed thousands of ulps off it, either side), and, where a value was far
above ``c``, clipped once more; a layer with none is left untouched, and the transform back is
read at the kernel's taps only.
``method="svd"`` is the first version (SciPy's FFT and full complex SVD of every frequency).

This module also re-exports :func:`~normopt.spectrum.conv_singular_values`,
:func:`~normopt.spectrum.conv_spectral_norm` and :func:`~normopt.power_iteration.power_iteration_norm`.
Once any frequency of a layer is clipped, the whole kernel goes through the transform and back,
so the untouched frequencies change by round-off of the computing precision (complex64 for
float32 kernels: about 1e-7 relative).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import scipy.fft
import torch

from normopt.arguments import positive_int
from normopt.power_iteration import power_iteration_norm
from normopt.specs import ConvSpec, axis_geometries, check_weight_shape, pads_with_copies
from normopt.spectrum import (
    _check_kernel,
    _check_options,
    _complex_dtype,
    _dilated_kernel,
    _fft_transfer,
    _gram,
    _gram_exponent,
    _map_blocks,
    _phases,
    _scaled_kernel,
    _svd,
    _torch_threads,
    conv_singular_values,
    conv_spectral_norm,
)

__all__ = [
    "INPUT_SIZES",
    "check_zero_padded",
    "clip_input_size",
    "clip_layer",
    "clip_layer_counted",
    "clip_singular_values",
    "conv_singular_values",
    "conv_spectral_norm",
    "layer_spectral_bound",
    "padded_input_size",
    "pads_with_copies",
    "power_iteration_norm",
    "raw_input_size",
]

#: The ``input_size`` choices of the clip: ``"padded"`` (the input with the layer's padding, whose
#: circular convolution bounds the layer's norm) and ``"raw"`` (the input itself, as the released
#: code clips; see :func:`clip_input_size`).
INPUT_SIZES = ("padded", "raw")


# The largest value, relative to the bound, above which the Gram clip's result is clipped again (see
# _gram_clip). Measured on 40 random 32x34 matrices per value, real and complex, single precision:
# between 3 and 4 times the bound the result sat up to 34 ulps over it (16 is the next clip's
# allowance); clipped again from 1.5 on, at most 9 from 1.05 to 1000 times.
FAR_ABOVE = 1.5


def _subtracted(k: torch.Tensor, vectors: torch.Tensor, s: torch.Tensor, bound: float) -> torch.Tensor:
    """``k`` with its singular values ``s`` along ``vectors`` (eigenvectors of :func:`~normopt.spectrum._gram`,
    right ones where ``D >= C``, else left) lowered to ``bound``: ``K - K V diag(1 - c/s) V^H``
    (those at most ``bound`` take a factor of exactly 0)."""
    factor = (1.0 - torch.clamp(bound / s.clamp(min=torch.finfo(s.dtype).tiny), max=1.0)).to(k.dtype)
    if k.shape[-2] >= k.shape[-1]:
        return k - ((k @ vectors) * factor[..., None, :]) @ vectors.mH
    return k - (vectors * factor[..., None, :]) @ (vectors.mH @ k)


def _shrink_along(k: torch.Tensor, vectors: torch.Tensor, s: torch.Tensor, bound: float) -> torch.Tensor:
    """``k`` with its singular values ``s`` along ``vectors`` (eigenvectors of :func:`~normopt.spectrum._gram`,
    right ones where ``D >= C``, else left) clipped at ``bound``, then corrected by one
    Rayleigh-Ritz pass over ``vectors`` (see :func:`_gram_clip`): of the result's Ritz values there,
    the ``m`` largest, ``m`` the values clipped, are set to ``bound`` from either side (from below
    only within the subtraction's round-off), and any other still above it (one coupled by
    round-off to a clipped one) lowered to it. A matrix with none clipped comes back bit for bit."""
    tiny = torch.finfo(s.dtype).tiny
    right = k.shape[-2] >= k.shape[-1]
    r = _subtracted(k, vectors, s, bound)
    projected = r @ vectors if right else vectors.mH @ r  # the result along the span
    values, rotation = torch.linalg.eigh(projected.mH @ projected if right else projected @ projected.mH)
    sigma = values.clamp(min=0).sqrt().clamp(min=tiny)
    clipped = (s > bound).sum(-1, keepdim=True)  # m per matrix; eigh sorts ascending: the m last
    top = torch.arange(sigma.shape[-1], device=sigma.device) >= sigma.shape[-1] - clipped
    # Raised only from within the subtraction's round-off under the bound (about 30 eps s_max / c
    # measured; 64 taken): a value the Gram eigenvalues misread as above the bound (their error
    # is about eps s_max^2 / s), or a null direction, is never lifted to it.
    reach = (64 * torch.finfo(s.dtype).eps * s[..., -1:] / bound).clamp(max=0.5)
    raise_ = top & (sigma >= bound * (1.0 - reach))
    second = torch.where(raise_, 1.0 - bound / sigma, (1.0 - bound / sigma).clamp(min=0.0))
    second = torch.where(clipped > 0, second, 0.0).to(k.dtype)
    ritz = vectors @ rotation
    if right:
        return r - ((projected @ rotation) * second[..., None, :]) @ ritz.mH
    return r - (ritz * second[..., None, :]) @ (rotation.mH @ projected)


def _gram_clip(k: torch.Tensor, bound: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each matrix with its singular values clipped at ``bound``, from the eigenvectors of its Gram matrix;
    and which matrices had a singular value above ``limit`` (the others come back unchanged).

    With ``K^H K = V diag(s^2) V^H``: ``K V diag(min(1, c/s)) V^H = K - K V_+ diag(1 - c/s_+) V_+^H``,
    ``V_+`` the eigenvectors whose value exceeds ``c`` (the others have a zero factor): the
    unclipped directions stay exactly as they were (no ``V V^H = I`` round-off), and the products
    cost ``D C k`` for ``k`` values above the bound instead of ``D C^2``. The largest eigenvalue of
    a Gram matrix is at most its largest row sum of ``|Re g| + |Im g|`` (no square roots, unlike
    ``|g|``), so frequencies with that sum at most ``limit^2`` skip the eigendecomposition.

    The subtraction cancels: along the top direction it takes ``s (1 - c/s)`` from ``s``, so the
    result sits off ``c`` by round-off of ``s`` (up to about ``30 eps s / c`` either side: 3,000 ulps
    of complex64 where ``s = 100 c``), and the next clip would find it above the bound again. One
    Rayleigh-Ritz pass over ``V_+`` measures the result's values there and sets the ``m`` largest,
    ``m`` the values clipped, to ``c`` (from below only within that round-off: the Gram eigenvalues
    of values far under ``s`` are misread by about ``eps s^2``, and such a value must not be lifted
    to the bound), at a ratio near 1 (within 16 ulps of ``c`` then on random matrices of 2 to 64
    columns, both precisions, for ``s`` up to ``1000 c``). Where ``s`` is ``FAR_ABOVE`` times ``c``
    or more, the values near ``c`` are misread too, and a pair of them coupled by the round-off can
    stay over it: the result is clipped once more (it reads them to ``eps c^2``), lowering only.
    """
    g = _gram(k)
    candidates = torch.view_as_real(g).abs().sum((-1, -2)).amax(-1) > limit * limit
    need = torch.zeros(len(k), dtype=torch.bool)
    if not candidates.any():
        return k, need
    every = bool(candidates.all())  # the usual case of a first clip: no gathering and scattering copies
    k_c, g_c = (k, g) if every else (k[candidates], g[candidates])
    values, vectors = torch.linalg.eigh(g_c)
    s = values.clamp(min=0).sqrt()
    need[candidates] = s[:, -1] > limit
    above = int((s > bound).sum(-1).max())  # eigh sorts ascending: the values above are the last ones
    if above == 0:
        return k, need
    clipped = _shrink_along(k_c, vectors[..., -above:], s[:, -above:], bound)
    # Far above the bound the Gram eigenvalues misread the values near it (by about eps s_max^2):
    # the pass above can leave a pair of them over it. Clipped once, the largest value is near the
    # bound, and the Gram matrix of the result reads them to eps c^2: clip those once more, only
    # lowering (a value 1000 times the bound in single precision left the norm up to 24,000 ulps over).
    far = s[:, -1] > FAR_ABOVE * bound
    if bool(far.any()):
        again = clipped[far]
        values, vectors = torch.linalg.eigh(_gram(again))
        s_again = values.clamp(min=0).sqrt()
        count = int((s_again > bound).sum(-1).max())
        if count:  # into a fresh tensor of _shrink_along's: never the caller's kernel
            clipped[far] = _subtracted(again, vectors[..., -count:], s_again[:, -count:], bound)
    if every:
        return clipped, need
    out = k.clone()
    out[candidates] = clipped
    return out, need


def _svd_clip(t: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """Each matrix with its singular values clipped at ``bound``, and each one's largest value."""
    u, s, vh = _svd(t, compute_uv=True)
    return (u * np.minimum(s, bound)[..., None, :]) @ vh, s[..., 0]


def _svd_clip_matrices(k: torch.Tensor, bound: float, limit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gram_clip`'s results from SciPy's SVD of the same matrices (gesdd, then gesvd), where
    LAPACK's ``eigh`` did not converge: the same frequencies, so the same counts."""
    clipped, top = _svd_clip(k.numpy(), bound)
    need = torch.from_numpy(top > limit)
    return torch.where(need[:, None, None], torch.from_numpy(clipped).to(k.dtype), k), need


def _check_clip(bound, iterations) -> float:
    """``bound`` as a float (a number, or a 0-d tensor or array: both paths compute with floats), checked."""
    try:
        positive = not isinstance(bound, (bool, str)) and bool(bound > 0)
        bound = float(bound)
    except (TypeError, RuntimeError, ValueError):
        positive = False
    if not positive:
        raise ValueError(f"bound must be positive, got {bound!r}")
    positive_int(iterations, "iterations")
    return bound


def _round_off_limit(bound: float, kernel_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    """The largest singular value taken as at most ``bound``: above it by the round-off of the
    computation (16 ulps of its dtype: a Gram clip of 48 channels lands up to 11 above) or of an
    earlier clip's kernel stored in its dtype (two ulps: a bfloat16 clip measured 0.14 of one),
    not by work to do. Eight ulps of bfloat16 (6%) left kernels that far above the bound unclipped.

    Example:
        >>> round(_round_off_limit(1.0, torch.bfloat16, torch.float64), 4)
        1.0156
    """
    eps = lambda dtype: torch.finfo(dtype).eps  # a complex dtype's is its real part's
    return bound * (1 + max(16 * eps(compute_dtype), 2 * eps(kernel_dtype)))


def _svd_path(kernel, input_size, bound, groups, dilation, iterations, threads) -> tuple[torch.Tensor | None, int]:
    """The first version: full SVD of every frequency, SciPy's FFT there and back.

    Returns ``(kernel or None when no frequency exceeded bound, frequencies of the real-FFT half
    that exceeded it in the first round)``; as on the Gram path, a layer under the bound is left
    as it is rather than rewritten with the round-off of a transform there and back.
    """
    dilated = _dilated_kernel(kernel, groups, dilation)
    spatial = tuple(range(3, dilated.ndim))
    support = (slice(None),) * 3 + tuple(slice(None, r, d) for r, d in zip(dilated.shape[3:], dilation))
    limit = _round_off_limit(bound, kernel.dtype, torch.float64)
    clipped_first, changed = 0, False
    for round_ in range(iterations):
        t = _fft_transfer(dilated, input_size, threads)
        matrices, top = _map_blocks(_svd_clip, np.ascontiguousarray(t.reshape(-1, *t.shape[-2:])), threads, bound)
        exceeded = int((top > limit).sum())
        if round_ == 0:
            clipped_first = exceeded
        if not exceeded:
            break
        changed = True
        spectrum = np.moveaxis(matrices.reshape(t.shape), (-2, -1), (1, 2))
        full = scipy.fft.irfftn(spectrum, s=input_size, axes=spatial, workers=threads)
        dilated = np.zeros_like(dilated)
        dilated[support] = full[support]
    if not changed:
        return None, clipped_first
    taps = dilated[(slice(None),) * 3 + tuple(slice(None, None, d) for d in dilation)]
    return torch.from_numpy(np.ascontiguousarray(taps.reshape(kernel.shape))), clipped_first


def _clip(kernel, input_size, bound, groups, dilation, iterations, method, precision, threads):
    """The clip behind the public functions: ``(kernel or None when nothing exceeded, frequencies, clipped)``.

    ``frequencies`` counts the per-group transfer matrices computed (one per conjugate pair of
    frequencies; the SVD path: the real-FFT half); ``clipped`` those
    whose largest singular value exceeded ``bound`` in the first round.
    """
    bound = _check_clip(bound, iterations)
    threads = _check_options(method, precision, threads)
    input_size, dilation = _check_kernel(kernel, input_size, groups, dilation)
    if method == "svd":
        result, clipped_first = _svd_path(kernel, input_size, bound, groups, dilation, iterations, threads)
        frequencies = groups * int(np.prod(input_size[:-1])) * (input_size[-1] // 2 + 1)  # the real-FFT half
        if result is None:
            return None, frequencies, clipped_first
        return result.to(dtype=kernel.dtype, device=kernel.device), frequencies, clipped_first
    dtype = _complex_dtype(kernel, precision)
    phases = _phases(tuple(kernel.shape[2:]), input_size, dilation, groups, dtype)
    # A kernel far out of the ordinary range is clipped scaled by a power of two (exact), at the
    # bound scaled alike: the Gram matrices square its values (see _gram_exponent).
    exponent = _gram_exponent(kernel, phases.real)
    scaled_bound = math.ldexp(bound, -exponent)
    limit = _round_off_limit(scaled_bound, kernel.dtype, dtype)
    frequencies = groups * phases.frequencies
    taps, clipped_first, changed = _scaled_kernel(kernel, -exponent), 0, False
    for round_ in range(iterations):
        with _torch_threads(threads):
            matrices = phases.forward(taps)
        try:
            matrices, need = _map_blocks(_gram_clip, matrices, threads, scaled_bound, limit)
        except torch.linalg.LinAlgError:  # eigh did not converge: SciPy's SVD of the same matrices
            matrices, need = _map_blocks(_svd_clip_matrices, matrices, threads, scaled_bound, limit)
        if round_ == 0:
            clipped_first = int(need.sum())
        if not need.any():
            break
        changed = True
        with _torch_threads(threads):
            taps = phases.inverse(matrices)
    if not changed:
        return None, frequencies, clipped_first
    taps = _scaled_kernel(taps, exponent)
    # The inverse transform's taps come out strided (channels last in memory): hand back a plain kernel.
    return taps.to(dtype=kernel.dtype, device=kernel.device).contiguous(), frequencies, clipped_first


@torch.compiler.disable
def clip_singular_values(
    kernel: torch.Tensor,
    input_size,
    bound: float,
    *,
    groups: int = 1,
    dilation=1,
    iterations: int = 1,
    method: str = "gram",
    precision=None,
    threads=None,
):
    """Kernel whose circular convolution has its singular values clipped at ``bound``, cropped to the support.

    Clip in the Fourier domain, transform back, keep the real part on the kernel's (dilated)
    support; with ``iterations > 1`` repeat clip-and-crop (alternating projection), which lowers the
    residual excess the crop leaves when the kernel is smaller than the input.

    The default ``method="gram"`` needs no SVD: with ``K^H K = V diag(s^2) V^H`` (eigh of the
    smaller Gram matrix) the clipped transfer matrix is ``K V diag(min(1, c/s)) V^H``, and only the
    frequencies whose largest value exceeds ``bound`` are touched. ``method="svd"`` is the first
    version (a full complex SVD of every frequency). Either way a kernel with no frequency above
    ``bound`` is returned unchanged.
    ``precision`` and ``threads`` as in :func:`conv_singular_values`.

    Returns:
        A tensor of the kernel's shape, dtype and device. A half-precision kernel is clipped in
        float32 and rounded to its dtype at the end, entry by entry to the nearest: the stored
        kernel's largest singular value can sit above ``bound`` by that rounding (up to 1.2% over
        random bfloat16 kernels as large as their input, 1-D to 3-D: about 1.5 ulps of bfloat16).

    Example:
        >>> import torch
        >>> clipped = clip_singular_values(torch.tensor([[[3.0, 1.0]]]), 2, bound=2.0)  # sv 4 and 2
        >>> clipped, conv_spectral_norm(clipped, 2)
        (tensor([[[2., 0.]]]), 2.0)
    """
    result, _, _ = _clip(kernel, input_size, bound, groups, dilation, iterations, method, precision, threads)
    return kernel.detach().clone() if result is None else result


def padded_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """Per axis, the size of the circular convolution that contains the layer: input + both paddings.

    For a transposed layer, that of its adjoint convolution.
    """
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: the input size is unknown; build specs with an example input")
    check_zero_padded(spec)
    return tuple(axis.size + sum(pads) for axis, pads in zip(axis_geometries(spec, spec.input_size), spec.padding))


def check_zero_padded(spec: ConvSpec) -> None:
    """Refuse a layer whose padding copies input values (circular, reflect, replicate): the layer is
    not a restriction of the circular convolution on its padded input, whose norm can then fall
    below the layer's (1.087 against 0.942 for a circular 3-tap kernel on 4 inputs)."""
    if pads_with_copies(spec):
        circular = spec.padding_mode == "circular" and all(
            sum(pads) <= d * (k - 1) for pads, d, k in zip(spec.padding, spec.dilation, spec.kernel_size)
        )
        raw = "; input_size='raw' clips the circular convolution on its input, which bounds it: see raw_input_size"
        raise ValueError(
            f"layer {spec.name!r} pads with {spec.padding_mode!r}, which copies input values: the circular convolution "
            "on its padded input does not bound it: neither a bound nor a clip is taken from it here (power_iteration_norm "
            f"gives its norm{raw if circular else ''})"
        )


def raw_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """Per axis, the layer's input size without padding: the size the released code clips at.

    The circular convolution on it does not contain the zero-padded layer, so its norm is not a
    bound of the layer's (:func:`padded_input_size` is); offered to reproduce the released numbers.
    For a transposed layer, the input size of its adjoint convolution.

    A *circular*-padded layer whose paddings add up, per axis, to at most its kernel's reach
    ``dilation * (kernel - 1)`` reads each row of this circular convolution at most once: with
    ``'same'`` padding and stride 1 it *is* that convolution (equal singular values), otherwise its
    norm is bounded by it. Larger paddings repeat rows, and the bound fails (a 1-tap kernel padded
    by 1 on 2 samples: ``sqrt(2)`` times the circular norm). (The circular convolution needs the
    kernel's reach to fit in the input.)
    """
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: the input size is unknown; build specs with an example input")
    return tuple(axis.size for axis in axis_geometries(spec, spec.input_size))


def clip_input_size(spec: ConvSpec, input_size: str = "padded") -> tuple[int, ...]:
    """The input size a layer is clipped at: :func:`padded_input_size` for ``"padded"``,
    :func:`raw_input_size` for ``"raw"``.

    Example:
        >>> from torch import nn
        >>> import normopt
        >>> spec = normopt.module_spec(nn.Conv2d(1, 1, 3, padding=1), "c", (8, 8))
        >>> clip_input_size(spec), clip_input_size(spec, "raw")
        ((10, 10), (8, 8))
    """
    if input_size not in INPUT_SIZES:
        raise ValueError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")
    return padded_input_size(spec) if input_size == "padded" else raw_input_size(spec)


@contextlib.contextmanager
def _named(spec: ConvSpec):
    """A refusal of the kernel (empty, meta, not finite, larger than its input) names its layer."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if str(error).startswith("layer "):
            raise
        raise type(error)(f"layer {spec.name!r}: {error}") from error


def _check_layer(weight: torch.Tensor, spec: ConvSpec) -> None:
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"layer {getattr(spec, 'name', spec)!r} is described by a {type(spec).__name__}: SVC clips convolutions")
    if not (isinstance(spec.groups, int) and spec.groups >= 1):
        return  # no shape to compare with: the clip refuses the groups by name
    check_weight_shape(weight, spec)


def layer_spectral_bound(weight: torch.Tensor, spec: ConvSpec, **options) -> float:
    """Upper bound of a conv layer's spectral norm: the circular convolution on the padded input.

    ``options`` (``method``, ``precision``, ``threads``) as in :func:`conv_singular_values`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        >>> spec = normopt.module_spec(layer, "", (8, 8))
        >>> layer_spectral_bound(layer.weight, spec) >= float(power_iteration_norm(layer.weight, spec))
        True
    """
    _check_layer(weight, spec)
    with _named(spec):
        return conv_spectral_norm(weight, padded_input_size(spec), groups=spec.groups, dilation=spec.dilation, **options)


def clip_layer_counted(
    weight: torch.Tensor,
    spec: ConvSpec,
    bound: float,
    iterations: int = 1,
    *,
    input_size: str = "padded",
    method: str = "gram",
    precision: str | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor | None, int, int]:
    """:func:`clip_layer`, also saying how much work it took.

    Returns:
        ``(kernel, frequencies, clipped)``: the clipped kernel, or ``None`` when no frequency's
        largest singular value exceeded ``bound`` (the layer needs no clip); the number of
        per-group transfer matrices computed (one frequency of each conjugate pair ``f, -f``; with
        ``method="svd"``, every frequency of the real-FFT half) and how many of them exceeded
        ``bound``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> spec = normopt.module_spec(nn.Conv1d(1, 1, 2), "c", (4,))
        >>> kernel, frequencies, clipped = clip_layer_counted(torch.tensor([[[1.0, 1.0]]]), spec, 1.9)
        >>> frequencies, clipped  # input 4: frequencies 0, 1 (and 3 = -1), 2; only 0 (value 2) exceeds
        (3, 1)
    """
    _check_layer(weight, spec)
    size = clip_input_size(spec, input_size)
    with _named(spec):
        return _clip(weight, size, bound, spec.groups, spec.dilation, iterations, method, precision, threads)


def clip_layer(weight: torch.Tensor, spec: ConvSpec, bound: float, iterations: int = 1, *, input_size: str = "padded", **options):
    """SVC of one conv layer: :func:`clip_singular_values` on its padded input size (strides ignored:
    the unstrided periodic operator bounds the layer). Returns a new kernel.

    ``input_size="raw"`` clips at the input size without padding, as the released code does
    (see :func:`raw_input_size`). ``options`` (``method``, ``precision``, ``threads``) as in
    :func:`clip_singular_values`.
    """
    kernel, _, _ = clip_layer_counted(weight, spec, bound, iterations, input_size=input_size, **options)
    return weight.detach().clone() if kernel is None else kernel
