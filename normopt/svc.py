r"""Singular values and singular value clipping (SVC) of convolutions, with SciPy's complex SVD.

A circular convolution of a kernel ``K`` (torch layout ``(D, C/g, k_1..k_N)``) on an
``n_1 x .. x n_N`` input is block-diagonalised by the Fourier transform: its singular values are
those of the ``D x C`` matrices :math:`\hat K(f)` (per group), :math:`\hat K` the FFT of the
kernel zero-padded to the input size (Sedghi, Gupta & Long, ICLR 2019). Clipping them at ``c``
and transforming back gives the nearest circular convolution with spectral norm at most ``c``;
cropping that to the kernel's support keeps the layer's shape, exactly so when the kernel is as
large as the input and approximately otherwise (repeat the clip and crop to shrink the residual).

For a zero-padded (or strided) layer on an ``n``-sized input with paddings ``p_l, p_r`` the matrix
is a restriction of the circular convolution on ``n + p_l + p_r`` (the padded input embeds
isometrically, outputs and strides select rows), so the latter's spectral norm bounds the layer's;
:func:`layer_spectral_bound` uses that size. :func:`power_iteration_norm` estimates the layer's
own value through ``torch.func.vjp`` of its forward (the adjoint is the transposed convolution).

The SciPy calls run on the CPU in float64 / complex128 and are kept out of ``torch.compile``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from normopt.specs import ConvSpec, axis_geometries


def _as_groups(kernel: torch.Tensor, input_size, groups: int, dilation) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Check the layout and return the dilated kernel as float64 ``(g, D/g, C/g, *reach)``."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() < 3:
        raise ValueError(f"kernel must be a torch tensor of layout (out, in/groups, k_1, ..), got shape {tuple(kernel.shape)}")
    spatial = tuple(kernel.shape[2:])
    input_size = (input_size,) * len(spatial) if isinstance(input_size, int) else tuple(input_size)
    dilation = (dilation,) * len(spatial) if isinstance(dilation, int) else tuple(dilation)
    if len(input_size) != len(spatial) or len(dilation) != len(spatial):
        raise ValueError(f"kernel has {len(spatial)} spatial axes, input_size {input_size} and dilation {dilation} must match")
    if kernel.shape[0] % groups:
        raise ValueError(f"{kernel.shape[0]} output channels do not split into {groups} groups")
    reach = tuple(d * (k - 1) + 1 for d, k in zip(dilation, spatial))
    if any(r > n for r, n in zip(reach, input_size)):
        raise ValueError(f"kernel reach {reach} (size {spatial}, dilation {dilation}) is larger than the input {input_size}")
    if not torch.isfinite(kernel).all():
        raise ValueError("kernel has non-finite values (NaN or inf)")
    k = kernel.detach().to("cpu", torch.float64).numpy()
    k = k.reshape(groups, k.shape[0] // groups, *k.shape[1:])
    dilated = np.zeros(k.shape[:3] + reach)
    dilated[(slice(None),) * 3 + tuple(slice(None, None, d) for d in dilation)] = k
    return dilated, input_size, dilation


def _transfer(dilated: np.ndarray, input_size: tuple[int, ...]) -> np.ndarray:
    """Per group and frequency (real-FFT half), the D/g x C/g transfer matrix."""
    spatial = tuple(range(3, dilated.ndim))
    spectrum = np.fft.rfftn(dilated, s=input_size, axes=spatial)  # (g, D/g, C/g, *freqs)
    return np.moveaxis(spectrum, (1, 2), (-2, -1))  # (g, *freqs, D/g, C/g)


def _svd(matrices: np.ndarray, compute_uv: bool):
    # gesdd, SciPy's default, occasionally fails to converge; gesvd is slower but sturdier.
    for driver in ("gesdd", "gesvd"):
        try:
            result = scipy.linalg.svd(matrices, full_matrices=False, compute_uv=compute_uv, lapack_driver=driver)
        except np.linalg.LinAlgError:
            continue
        values = result[1] if compute_uv else result
        if np.isfinite(values).all():
            return result
    raise np.linalg.LinAlgError("complex SVD did not converge with gesdd nor gesvd")


def _mirror_counts(last: int) -> np.ndarray:
    """How often each real-FFT bin of the last axis occurs in the full spectrum (1 or 2)."""
    counts = np.full(last // 2 + 1, 2)
    counts[0] = 1
    if last % 2 == 0:
        counts[-1] = 1
    return counts


@torch.compiler.disable
def conv_singular_values(kernel: torch.Tensor, input_size, *, groups: int = 1, dilation=1) -> np.ndarray:
    """All singular values of the circular convolution of ``kernel`` on an input of ``input_size``.

    Args:
        kernel: torch kernel ``(out, in/groups, k_1, .., k_N)``, N = 1, 2 or 3.
        input_size: spatial size ``(n_1, .., n_N)`` (an int for all axes).
        groups: the layer's groups; the matrix is block-diagonal, one block per group.
        dilation: per axis, or one int.

    Returns:
        A float64 array of ``prod(n) * groups * min(out, in) / groups`` values (any order). Real-FFT
        symmetry halves the work: mirrored frequencies share their singular values.

    Example:
        >>> import torch
        >>> sv = conv_singular_values(torch.ones(1, 1, 2), 4)  # y[a] = x[a] + x[a+1], circular
        >>> sorted(sv.round(6).tolist())
        [0.0, 1.414214, 1.414214, 2.0]
    """
    dilated, input_size, _ = _as_groups(kernel, input_size, groups, dilation)
    values = _svd(_transfer(dilated, input_size), compute_uv=False)  # (g, *freqs, r)
    repeat = _mirror_counts(input_size[-1])
    values = np.repeat(values, repeat, axis=-2)
    return values.reshape(-1)


def conv_spectral_norm(kernel: torch.Tensor, input_size, *, groups: int = 1, dilation=1) -> float:
    """Largest singular value of the circular convolution (see :func:`conv_singular_values`).

    Example:
        >>> import torch
        >>> conv_spectral_norm(torch.ones(1, 1, 2), 4)
        2.0
    """
    return float(conv_singular_values(kernel, input_size, groups=groups, dilation=dilation).max())


@torch.compiler.disable
def clip_singular_values(kernel: torch.Tensor, input_size, bound: float, *, groups: int = 1, dilation=1, iterations: int = 1):
    """Kernel whose circular convolution has its singular values clipped at ``bound``, cropped to the support.

    Clip in the Fourier domain, transform back, keep the real part on the kernel's (dilated)
    support; with ``iterations > 1`` repeat clip-and-crop (alternating projection), which lowers the
    residual excess the crop leaves when the kernel is smaller than the input.

    Returns:
        A tensor of the kernel's shape, dtype and device.

    Example:
        >>> import torch
        >>> clipped = clip_singular_values(torch.tensor([[[3.0, 1.0]]]), 2, bound=2.0)  # sv 4 and 2
        >>> clipped, conv_spectral_norm(clipped, 2)
        (tensor([[[2., 0.]]]), 2.0)
    """
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    dilated, input_size, dilation = _as_groups(kernel, input_size, groups, dilation)
    spatial = tuple(range(3, dilated.ndim))
    reach = dilated.shape[3:]
    for _ in range(iterations):
        u, s, vh = _svd(_transfer(dilated, input_size), compute_uv=True)
        clipped = (u * np.minimum(s, bound)[..., None, :]) @ vh
        full = np.fft.irfftn(np.moveaxis(clipped, (-2, -1), (1, 2)), s=input_size, axes=spatial)
        dilated = np.zeros_like(dilated)
        support = (slice(None),) * 3 + tuple(slice(None, r, d) for r, d in zip(reach, dilation))
        dilated[support] = full[support]
    taps = dilated[(slice(None),) * 3 + tuple(slice(None, None, d) for d in dilation)]
    result = torch.from_numpy(np.ascontiguousarray(taps.reshape(kernel.shape)))
    return result.to(dtype=kernel.dtype, device=kernel.device)


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


def power_iteration_norm(weight: torch.Tensor, spec: ConvSpec, iterations: int = 500, tol: float = 1e-7, seed: int = 0):
    """Spectral norm of the layer itself (its padding, stride and input size) by power iteration.

    Iterates ``v <- A^T A v / ||A^T A v||`` with the adjoint from ``torch.func.vjp``; stops after
    ``iterations`` or when the estimate changes by less than ``tol`` relative (one host read per
    iteration: an analysis tool, not a per-step one). Returns a 0-d tensor, ``||A v||``.

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
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: power iteration needs the layer's input size")
    forward = _forward(spec, weight.detach())
    channels = spec.in_channels
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn((1, channels, *spec.input_size), generator=generator, dtype=weight.dtype).to(weight.device)
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iterations):
        out, adjoint = torch.func.vjp(forward, v)
        (w,) = adjoint(out)
        norm = w.norm()
        if norm == 0:
            return norm
        v = w / norm
        previous, estimate = estimate, float(norm) ** 0.5
        if abs(estimate - previous) <= tol * estimate:
            break
    return forward(v).norm()


def padded_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """Per axis, the size of the circular convolution that contains the layer: input + both paddings.

    For a transposed layer, that of its adjoint convolution.
    """
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: the input size is unknown; build specs with an example input")
    return tuple(axis.size + sum(pads) for axis, pads in zip(axis_geometries(spec, spec.input_size), spec.padding))


def layer_spectral_bound(weight: torch.Tensor, spec: ConvSpec) -> float:
    """Upper bound of a conv layer's spectral norm: the circular convolution on the padded input.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> layer = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        >>> spec = normopt.module_spec(layer, "", (8, 8))
        >>> layer_spectral_bound(layer.weight, spec) >= float(power_iteration_norm(layer.weight, spec))
        True
    """
    return conv_spectral_norm(weight, padded_input_size(spec), groups=spec.groups, dilation=spec.dilation)


def clip_layer(weight: torch.Tensor, spec: ConvSpec, bound: float, iterations: int = 1) -> torch.Tensor:
    """SVC of one conv layer: :func:`clip_singular_values` on its padded input size (strides ignored:
    the unstrided periodic operator bounds the layer). Returns a new kernel."""
    return clip_singular_values(
        weight, padded_input_size(spec), bound, groups=spec.groups, dilation=spec.dilation, iterations=iterations
    )
