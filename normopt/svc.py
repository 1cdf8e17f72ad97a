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

Two paths, both LAPACK on the CPU and kept out of ``torch.compile`` (the clipped kernels reach
every replica through a broadcast, so they stay bit-identical):

* ``method="gram"`` (default): the singular values are the square roots of the eigenvalues of the
  smaller Hermitian Gram matrix ``K^H K`` / ``K K^H`` of each frequency, and the clip is
  ``K V diag(min(1, c/s)) V^H`` from its eigenvectors, only for the frequencies whose largest value
  exceeds ``c``; a layer with none is left untouched. The eigendecompositions go through torch's
  LAPACK binding, which releases the GIL (SciPy's holds it), over a pool of ``threads`` threads
  with BLAS and torch held to one thread each meanwhile, so nothing oversubscribes the cores.
* ``method="svd"``: a full SciPy complex SVD of every frequency in complex128 (the first version;
  the benchmark's baseline).

Precision: float64 kernels run in complex128, others in complex64 (``precision`` overrides). The
Gram matrix squares the values, so the small singular values carry an absolute error of about
``sqrt(eps) * max(s)``: 1e-8 relative to the largest in double, but about 3e-4 in single, where
the values do not meet the double oracle's 1e-5 tolerance (the largest values and the clipped
kernels do, to about 1e-5 of the largest value; see the tests).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
import scipy.linalg
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController

from normopt.specs import ConvSpec, axis_geometries

METHODS = ("gram", "svd")
PRECISIONS = ("single", "double")
INPUT_SIZES = ("padded", "raw")

_CONTROLLER = None  # threadpoolctl's scan of the loaded BLAS libraries, done once (it takes milliseconds)


def _blas_limited():
    """Context holding the BLAS libraries to one thread: the pool supplies the parallelism."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def _positive_ints(name: str, value, count: int) -> tuple[int, ...]:
    """``value`` (one int or ``count`` of them) as a tuple of positive ints, or a ValueError naming ``name``."""
    values = (value,) * count if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or a tuple of them, got {value!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive int or a tuple of them, got {value!r}")
    return tuple(int(v) for v in values)


def _check_options(method: str, precision, threads) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    if threads is not None and not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        raise ValueError(f"threads must be None or a positive int, got {threads!r}")


def _as_groups(kernel: torch.Tensor, input_size, groups: int, dilation) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...]]:
    """Check the layout and return the dilated kernel as float64 ``(g, D/g, C/g, *reach)``."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() < 3:
        raise ValueError(f"kernel must be a torch tensor of layout (out, in/groups, k_1, ..), got shape {tuple(kernel.shape)}")
    spatial = tuple(kernel.shape[2:])
    if not (isinstance(groups, (int, np.integer)) and not isinstance(groups, bool) and groups >= 1):
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    dilation = _positive_ints("dilation", dilation, len(spatial))
    input_size = _positive_ints("input_size", input_size, len(spatial))
    if len(input_size) != len(spatial) or len(dilation) != len(spatial):
        raise ValueError(f"kernel has {len(spatial)} spatial axes, input_size {input_size} and dilation {dilation} must match")
    if kernel.shape[0] % groups:
        raise ValueError(f"{kernel.shape[0]} output channels do not split into groups={groups}")
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


def _complex_dtype(kernel: torch.Tensor, precision) -> np.dtype:
    """complex128 for float64 kernels or precision="double", complex64 otherwise (see the module notes)."""
    if precision is None:
        precision = "double" if kernel.dtype == torch.float64 else "single"
    return np.dtype(np.complex128 if precision == "double" else np.complex64)


def _transfer(dilated: np.ndarray, input_size: tuple[int, ...], dtype=np.complex128, workers: int = 1) -> np.ndarray:
    """Per group and frequency (real-FFT half), the D/g x C/g transfer matrix, as ``(g, *freqs, D/g, C/g)``."""
    spatial = tuple(range(3, dilated.ndim))
    real = np.float64 if dtype == np.complex128 else np.float32
    spectrum = scipy.fft.rfftn(dilated.astype(real, copy=False), s=input_size, axes=spatial, workers=workers)
    return np.moveaxis(spectrum, (1, 2), (-2, -1))


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


def _gram(t: torch.Tensor) -> torch.Tensor:
    """The smaller Hermitian Gram matrix of each ``D x C`` matrix: ``K^H K`` if ``D >= C``, else ``K K^H``."""
    th = t.mH
    return th @ t if t.shape[-2] >= t.shape[-1] else t @ th


def _gram_values(t: np.ndarray) -> np.ndarray:
    """Singular values (ascending) of each matrix from the eigenvalues of its Gram matrix."""
    # torch's LAPACK binding (CPU) releases the GIL and its eigh is 2-4x faster than NumPy's here;
    # SciPy's holds the GIL, so its calls do not run in parallel in a thread pool.
    values = torch.linalg.eigvalsh(_gram(torch.from_numpy(t)))
    return values.clamp_(min=0).sqrt_().numpy()


def _gram_clip(t: np.ndarray, bound: float, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Each matrix with its singular values clipped at ``bound``, from the eigenvectors of its Gram matrix;
    and which matrices had a singular value above ``limit`` (the others come back unchanged).

    With ``K^H K = V diag(s^2) V^H``: ``K V diag(min(1, c/s)) V^H = K - K V diag(1 - min(1, c/s)) V^H``;
    the second form leaves the unclipped directions exactly as they were (no ``V V^H = I`` round-off).
    A Gram matrix whose largest absolute row sum is at most ``limit^2`` bounds its largest
    eigenvalue by that, so those frequencies skip the eigendecomposition.
    """
    k = torch.from_numpy(t)
    gram = _gram(k)
    candidates = gram.abs().sum(-1).amax(-1) > limit * limit
    need = torch.zeros(len(k), dtype=torch.bool)
    if not candidates.any():
        return t, need.numpy()
    k_c = k[candidates]
    values, vectors = torch.linalg.eigh(gram[candidates])
    s = values.clamp(min=0).sqrt()
    need[candidates] = s[:, -1] > limit
    shrink = (1.0 - torch.clamp(bound / s.clamp(min=torch.finfo(s.dtype).tiny), max=1.0)).to(k.dtype)
    if k.shape[-2] >= k.shape[-1]:
        clipped = k_c - ((k_c @ vectors) * shrink[..., None, :]) @ vectors.mH
    else:
        clipped = k_c - (vectors * shrink[..., None, :]) @ (vectors.mH @ k_c)
    out = k.clone()
    out[candidates] = clipped
    return out.numpy(), need.numpy()


def _svd_values(t: np.ndarray) -> np.ndarray:
    return _svd(t, compute_uv=False)


def _svd_clip(t: np.ndarray, bound: float, limit: float) -> tuple[np.ndarray, np.ndarray]:
    u, s, vh = _svd(t, compute_uv=True)
    return (u * np.minimum(s, bound)[..., None, :]) @ vh, np.ones(len(t), dtype=bool)  # no skipping


def _resolve_threads(threads) -> int:
    return torch.get_num_threads() if threads is None else threads


def _map_blocks(fn, matrices: np.ndarray, threads: int, *args) -> np.ndarray:
    """``fn`` over the stacked matrices ``(M, D, C)``, split into contiguous blocks over a thread pool.

    LAPACK and BLAS release the GIL, so the blocks run in parallel; BLAS is held to one thread
    meanwhile, so that pool and BLAS do not oversubscribe the cores.
    """
    blocks = min(threads, len(matrices))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own intra-op pool too: the blocks are the parallelism
    try:
        with _blas_limited():
            if blocks <= 1:
                return fn(matrices, *args)
            bounds = np.linspace(0, len(matrices), blocks + 1).astype(int)
            with ThreadPoolExecutor(blocks) as pool:
                parts = list(pool.map(lambda a, b: fn(matrices[a:b], *args), bounds[:-1], bounds[1:]))
    finally:
        torch.set_num_threads(torch_threads)
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts))
    return np.concatenate(parts)


def _mirror_counts(last: int) -> np.ndarray:
    """How often each real-FFT bin of the last axis occurs in the full spectrum (1 or 2)."""
    counts = np.full(last // 2 + 1, 2)
    counts[0] = 1
    if last % 2 == 0:
        counts[-1] = 1
    return counts


@torch.compiler.disable
def conv_singular_values(
    kernel: torch.Tensor, input_size, *, groups: int = 1, dilation=1, method: str = "gram", precision=None, threads=None
) -> np.ndarray:
    """All singular values of the circular convolution of ``kernel`` on an input of ``input_size``.

    Args:
        kernel: torch kernel ``(out, in/groups, k_1, .., k_N)``, N = 1, 2 or 3.
        input_size: spatial size ``(n_1, .., n_N)`` (an int for all axes).
        groups: the layer's groups; the matrix is block-diagonal, one block per group.
        dilation: per axis, or one int.
        method: ``"gram"`` (default): eigenvalues of the smaller Gram matrix ``K^H K`` / ``K K^H``
            per frequency; ``"svd"``: SciPy's complex SVD (the first version, kept as the baseline).
        precision: ``"single"`` (complex64) or ``"double"`` (complex128); ``None`` follows the kernel:
            double for float64 kernels, single otherwise. The SVD method always runs in double.
        threads: size of the thread pool over frequency blocks; ``None``: ``torch.get_num_threads()``.

    Returns:
        A float64 array of ``prod(n) * groups * min(out, in) / groups`` values (any order). Real-FFT
        symmetry halves the work: mirrored frequencies share their singular values. The Gram path
        squares the values, so its absolute error is about ``sqrt(eps) * max(s)``: about ``1e-8``
        relative to the largest value in double, ``3e-4`` in single (the largest values themselves
        are as accurate as the SVD's).

    Example:
        >>> import torch
        >>> sv = conv_singular_values(torch.ones(1, 1, 2), 4)  # y[a] = x[a] + x[a+1], circular
        >>> sorted(sv.round(5).tolist())
        [0.0, 1.41421, 1.41421, 2.0]
    """
    _check_options(method, precision, threads)
    threads = _resolve_threads(threads)
    dilated, input_size, _ = _as_groups(kernel, input_size, groups, dilation)
    dtype = np.complex128 if method == "svd" else _complex_dtype(kernel, precision)
    t = _transfer(dilated, input_size, dtype, threads)
    matrices = np.ascontiguousarray(t.reshape(-1, *t.shape[-2:]))
    values = _map_blocks(_gram_values if method == "gram" else _svd_values, matrices, threads)
    values = values.astype(np.float64).reshape(*t.shape[:-2], -1)  # (g, *freqs, r)
    values = np.repeat(values, _mirror_counts(input_size[-1]), axis=-2)
    return values.reshape(-1)


def conv_spectral_norm(kernel: torch.Tensor, input_size, *, groups: int = 1, dilation=1, **options) -> float:
    """Largest singular value of the circular convolution (see :func:`conv_singular_values`, whose
    ``method``, ``precision`` and ``threads`` it takes).

    Example:
        >>> import torch
        >>> conv_spectral_norm(torch.ones(1, 1, 2), 4)
        2.0
    """
    return float(conv_singular_values(kernel, input_size, groups=groups, dilation=dilation, **options).max())


def _clip(kernel, input_size, bound, groups, dilation, iterations, method, precision, threads):
    """The clip behind the public functions: ``(kernel or None when nothing exceeded, frequencies, clipped)``.

    ``frequencies`` counts the per-group transfer matrices of the real-FFT half; ``clipped`` those
    whose largest singular value exceeded ``bound`` in the first round.
    """
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound!r}")
    if not (isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1):
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    _check_options(method, precision, threads)
    threads = _resolve_threads(threads)
    dilated, input_size, dilation = _as_groups(kernel, input_size, groups, dilation)
    dtype = np.complex128 if method == "svd" else _complex_dtype(kernel, precision)
    # A value this close above the bound is round-off of an earlier clip, not work to do.
    limit = bound * (1 + 8 * np.finfo(dtype).eps)
    spatial = tuple(range(3, dilated.ndim))
    reach = dilated.shape[3:]
    support = (slice(None),) * 3 + tuple(slice(None, r, d) for r, d in zip(reach, dilation))
    frequencies = clipped_first = 0
    changed = False
    for round_ in range(iterations):
        t = _transfer(dilated, input_size, dtype, threads)
        matrices = np.ascontiguousarray(t.reshape(-1, *t.shape[-2:]))
        matrices, need = _map_blocks(_gram_clip if method == "gram" else _svd_clip, matrices, threads, bound, limit)
        if round_ == 0:
            frequencies, clipped_first = len(need), int(need.sum())
        if not need.any():
            break
        changed = True
        full = scipy.fft.irfftn(
            np.moveaxis(matrices.reshape(t.shape), (-2, -1), (1, 2)), s=input_size, axes=spatial, workers=threads
        )
        dilated = np.zeros_like(dilated)
        dilated[support] = full[support]
    if not changed:
        return None, frequencies, clipped_first
    taps = dilated[(slice(None),) * 3 + tuple(slice(None, None, d) for d in dilation)]
    result = torch.from_numpy(np.ascontiguousarray(taps.reshape(kernel.shape)))
    return result.to(dtype=kernel.dtype, device=kernel.device), frequencies, clipped_first


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
    frequencies whose largest value exceeds ``bound`` are touched; a kernel with none is returned
    unchanged. ``method="svd"`` is the first version (a full complex SVD of every frequency).
    ``precision`` and ``threads`` as in :func:`conv_singular_values`.

    Returns:
        A tensor of the kernel's shape, dtype and device.

    Example:
        >>> import torch
        >>> clipped = clip_singular_values(torch.tensor([[[3.0, 1.0]]]), 2, bound=2.0)  # sv 4 and 2
        >>> clipped, conv_spectral_norm(clipped, 2)
        (tensor([[[2., 0.]]]), 2.0)
    """
    result, _, _ = _clip(kernel, input_size, bound, groups, dilation, iterations, method, precision, threads)
    return kernel.detach().clone() if result is None else result


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


def raw_input_size(spec: ConvSpec) -> tuple[int, ...]:
    """Per axis, the layer's input size without padding: the size the released code clips at.

    The circular convolution on it does not contain the zero-padded layer, so its norm is not a
    bound of the layer's (:func:`padded_input_size` is); offered to reproduce the released numbers.
    For a transposed layer, the input size of its adjoint convolution.
    """
    if spec.input_size is None:
        raise ValueError(f"layer {spec.name!r}: the input size is unknown; build specs with an example input")
    return tuple(axis.size for axis in axis_geometries(spec, spec.input_size))


def _layer_input_size(spec: ConvSpec, input_size: str) -> tuple[int, ...]:
    if input_size not in INPUT_SIZES:
        raise ValueError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")
    return padded_input_size(spec) if input_size == "padded" else raw_input_size(spec)


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
    return conv_spectral_norm(weight, padded_input_size(spec), groups=spec.groups, dilation=spec.dilation, **options)


def clip_layer_counted(
    weight: torch.Tensor, spec: ConvSpec, bound: float, iterations: int = 1, *, input_size: str = "padded", **options
) -> tuple[torch.Tensor | None, int, int]:
    """:func:`clip_layer`, also saying how much work it took.

    Returns:
        ``(kernel, frequencies, clipped)``: the clipped kernel, or ``None`` when no frequency's
        largest singular value exceeded ``bound`` (the layer needs no clip); the number of
        per-group transfer matrices (real-FFT half) and how many of them exceeded ``bound``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> spec = normopt.module_spec(nn.Conv1d(1, 1, 2), "c", (4,))
        >>> kernel, frequencies, clipped = clip_layer_counted(torch.tensor([[[1.0, 1.0]]]), spec, 1.9)
        >>> frequencies, clipped  # input 4 + padding 0: rfft bins 0, 1, 2; only bin 0 (value 2) exceeds
        (3, 1)
    """
    return _clip(
        weight, _layer_input_size(spec, input_size), bound, spec.groups, spec.dilation, iterations,
        options.get("method", "gram"), options.get("precision"), options.get("threads"),
    )  # fmt: skip


def clip_layer(weight: torch.Tensor, spec: ConvSpec, bound: float, iterations: int = 1, *, input_size: str = "padded", **options):
    """SVC of one conv layer: :func:`clip_singular_values` on its padded input size (strides ignored:
    the unstrided periodic operator bounds the layer). Returns a new kernel.

    ``input_size="raw"`` clips at the input size without padding, as the released code does
    (see :func:`raw_input_size`). ``options`` (``method``, ``precision``, ``threads``) as in
    :func:`clip_singular_values`.
    """
    kernel, _, _ = clip_layer_counted(weight, spec, bound, iterations, input_size=input_size, **options)
    return weight.detach().clone() if kernel is None else kernel
