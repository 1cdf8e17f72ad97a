r"""Transfer matrices of a convolution and their singular values.

A circular convolution of a kernel ``K`` (torch layout ``(D, C/g, k_1..k_N)``) on an
``n_1 x .. x n_N`` input is block-diagonalised by the Fourier transform: its singular values are
those of the ``D x C`` matrices :math:`\hat K(f) = \sum_t K_t e^{-2\pi i f \cdot p_t / n}` (per
group; ``K_t`` the tap at offset ``p_t``), the FFT of the kernel zero-padded to the input size
(Sedghi, Gupta & Long, ICLR 2019). Real kernels give Hermitian-symmetric spectra
(``K(-f) = conj(K(f))``, the same singular values), so one frequency of each conjugate pair
carries them all.

Two paths, both LAPACK on the CPU, kept out of ``torch.compile``:

* ``method="gram"`` (default): the transfer matrices come from one matrix product of the ``T``
  taps with the ``F x T`` table of phases (a 3x3 kernel has 9 taps; an FFT of every channel pair
  zero-padded to the input pays for the whole grid), and the singular values are the square roots
  of the eigenvalues of the smaller Hermitian Gram matrix ``K^H K`` / ``K K^H`` of each frequency.
  The eigenvalues go through torch's LAPACK binding, which releases the GIL (SciPy's holds it),
  over a pool of ``threads`` threads with BLAS and torch held to one thread each meanwhile, so
  nothing oversubscribes the cores.
* ``method="svd"``: SciPy's FFT and complex SVD of every frequency in complex128 (the first
  version, kept as the benchmark's baseline).

Precision: float64 kernels run in complex128, others in complex64 (``precision`` overrides). The
Gram matrix squares the values, so the small singular values carry an absolute error of about
``sqrt(eps) * max(s)``: 1e-8 relative to the largest in double, but about 3e-4 in single, where
the values do not meet the double oracle's 1e-5 tolerance (the largest values do, to about 1e-5 of
the largest value; see the tests). A kernel far out of the ordinary range (largest tap beyond
``2**±32`` in single precision) is computed scaled by a power of two, which is exact, so that the
squares neither overflow nor underflow; where LAPACK's ``eigh`` does not converge, SciPy's SVD of
the same transfer matrices answers instead.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
import scipy.linalg
import torch
from threadpoolctl import ThreadpoolController

from normopt.arguments import positive_int
from normopt.deterministic import matmul
from normopt.specs import kernel_reach

__all__ = ["METHODS", "PRECISIONS", "conv_singular_values", "conv_spectral_norm"]

METHODS = ("gram", "svd")
PRECISIONS = ("single", "double")

_CONTROLLER = None  # threadpoolctl's scan of the loaded BLAS libraries, done once (it takes milliseconds)

# torch's and BLAS's thread counts are process-wide: two callers saving and restoring them at once
# would restore each other's values. One computation at a time (each already uses every core it is given).
THREAD_SETTINGS = threading.RLock()

# Above this many taps the phase table (frequencies x taps) costs more than an FFT of the grid.
MAX_TABLE_TAPS = 64


def _blas_limited():
    """Context holding the BLAS libraries to one thread: the pool supplies the parallelism."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


@contextlib.contextmanager
def _torch_threads(count: int):
    with THREAD_SETTINGS:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


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


def _check_options(method: str, precision, threads) -> int:
    """Refuse unknown options by name; return the pool size (``None``: ``torch.get_num_threads()``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
    threads = positive_int(threads, "threads", none=True)
    return torch.get_num_threads() if threads is None else threads


def _check_kernel(kernel: torch.Tensor, input_size, groups: int, dilation) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the kernel's layout against the input size; return ``(input_size, dilation)`` per axis."""
    if not isinstance(kernel, torch.Tensor) or kernel.dim() < 3:
        raise ValueError(f"kernel must be a torch tensor of layout (out, in/groups, k_1, ..), got shape {tuple(kernel.shape)}")
    if kernel.is_complex() or not kernel.is_floating_point():  # a complex one's imaginary part was dropped
        raise TypeError(f"kernel must be real floating-point, got {kernel.dtype}")
    if kernel.device.type == "meta":
        raise ValueError("kernel is on the meta device: its singular values need its values")
    if kernel.numel() == 0:
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} is empty: it has no singular values")
    spatial = tuple(kernel.shape[2:])
    if len(spatial) > 3:
        raise ValueError(f"kernel has {len(spatial)} spatial axes; 1, 2 or 3 are supported")
    if not (isinstance(groups, (int, np.integer)) and not isinstance(groups, bool) and groups >= 1):
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    dilation = _positive_ints("dilation", dilation, len(spatial))
    input_size = _positive_ints("input_size", input_size, len(spatial))
    if len(input_size) != len(spatial) or len(dilation) != len(spatial):
        raise ValueError(f"kernel has {len(spatial)} spatial axes, input_size {input_size} and dilation {dilation} must match")
    if kernel.shape[0] % groups:
        raise ValueError(f"{kernel.shape[0]} output channels do not split into groups={groups}")
    reach = kernel_reach(spatial, dilation)
    if any(r > n for r, n in zip(reach, input_size)):
        raise ValueError(f"kernel reach {reach} (size {spatial}, dilation {dilation}) is larger than the input {input_size}")
    if not torch.isfinite(kernel).all():
        raise ValueError("kernel has non-finite values (NaN or inf)")
    return input_size, dilation


def _complex_dtype(kernel: torch.Tensor, precision) -> torch.dtype:
    """complex128 for float64 kernels or precision="double", complex64 otherwise (see the module notes)."""
    if precision is None:
        precision = "double" if kernel.dtype == torch.float64 else "single"
    return torch.complex128 if precision == "double" else torch.complex64


def _mirror_counts(last: int) -> np.ndarray:
    """How often each real-FFT bin of the last axis occurs in the full spectrum (1 or 2)."""
    counts = np.full(last // 2 + 1, 2)
    counts[0] = 1
    if last % 2 == 0:
        counts[-1] = 1
    return counts


class _Phases:
    """The DFT restricted to a kernel's taps and to one frequency of each conjugate pair.

    A real kernel's transfer matrices satisfy ``K(-f) = conj(K(f))``, and clipping commutes with
    that conjugation, so one frequency per pair ``{f, -f}`` carries all the work (about half the
    grid, and fewer than the real-FFT half, which keeps both members of the pairs on the planes
    where the last frequency is 0 or n/2). ``forward`` maps the taps ``(D, C/g, k_1..k_N)`` of a
    kernel to the transfer matrices ``(g * F, D/g, C/g)`` (group-major); ``inverse`` maps transfer
    matrices back to the kernel's taps: the inverse DFT read at the taps only, each representative
    counted for its whole pair (the crop to the kernel's support comes for free). For up to
    :data:`MAX_TABLE_TAPS` taps both are real matrix products with ``F x T`` tables of
    ``cos`` / ``sin``; a kernel with more taps (the table grows as ``F x T``) goes through torch's
    FFT of the whole grid instead.
    """

    def __init__(self, kernel_size, input_size, dilation, groups: int, dtype: torch.dtype):
        self.kernel_size, self.input_size, self.groups, self.dtype = tuple(kernel_size), tuple(input_size), groups, dtype
        self.real = torch.float64 if dtype == torch.complex128 else torch.float32
        n = np.array(input_size)
        grid = np.stack(np.meshgrid(*[np.arange(size) for size in input_size], indexing="ij"), -1).reshape(-1, len(n))
        flat = np.ravel_multi_index(grid.T, input_size)
        partner = np.ravel_multi_index(((-grid) % n).T, input_size)
        keep = flat <= partner
        freqs = grid[keep]
        #: how many frequencies of the full grid each kept one stands for (2 for a pair, 1 if self-conjugate)
        self.multiplicity = np.where(flat[keep] == partner[keep], 1, 2)
        self.indices = flat[keep]  #: the kept frequencies' flat indices in the full grid (C order)
        self.kept = torch.from_numpy(self.indices)
        self.frequencies = len(freqs)
        self.support = tuple(slice(0, d * (k - 1) + 1, d) for k, d in zip(kernel_size, dilation))  # taps in the grid
        taps = math.prod(kernel_size)
        self.table = taps <= MAX_TABLE_TAPS
        if not self.table:
            self.partners = torch.from_numpy(partner[keep])
            return
        offsets = np.stack(np.meshgrid(*[np.arange(k) * d for k, d in zip(kernel_size, dilation)], indexing="ij"), -1)
        offsets = offsets.reshape(-1, len(n))
        # Phases in float64 and reduced mod n before the cosine: exact integer arithmetic, then one rounding.
        theta = (2 * np.pi * ((freqs[:, None, :] * offsets[None, :, :]) % n) / n).sum(-1)  # (F, T)
        cos, sin = (np.where(np.abs(v) < 1e-15, 0.0, v) for v in (np.cos(theta), np.sin(theta)))  # sin(pi) is 1e-16
        weight = self.multiplicity[:, None] / math.prod(input_size)
        self.cos, self.sin = (torch.from_numpy(v).to(self.real) for v in (cos, sin))
        self.cos_back, self.sin_back = (torch.from_numpy((weight * v).T.copy()).to(self.real) for v in (cos, sin))

    def forward(self, kernel: torch.Tensor) -> torch.Tensor:
        d, c = kernel.shape[0] // self.groups, kernel.shape[1]
        kernel = kernel.detach().to("cpu", self.real)
        if self.table:
            taps = kernel.reshape(-1, self.cos.shape[1]).T  # (T, M)
            spectrum = torch.complex(matmul(self.cos, taps), -matmul(self.sin, taps)).view(self.frequencies, self.groups, d, c)
        else:
            grid = kernel.new_zeros(self.groups * d, c, *self.input_size)
            grid[(slice(None),) * 2 + self.support] = kernel
            axes = tuple(range(2, grid.dim()))
            full = torch.fft.fftn(grid, dim=axes).reshape(self.groups, d, c, -1)
            spectrum = full[..., self.kept].permute(3, 0, 1, 2)
        return spectrum.transpose(0, 1).reshape(self.groups * self.frequencies, d, c)

    def inverse(self, matrices: torch.Tensor) -> torch.Tensor:
        d, c = matrices.shape[-2:]
        spectrum = matrices.view(self.groups, self.frequencies, d, c).transpose(0, 1)  # (F, g, d, c)
        if self.table:
            spectrum = spectrum.reshape(self.frequencies, -1)
            taps = matmul(self.cos_back, spectrum.real) - matmul(self.sin_back, spectrum.imag)  # (T, M)
            return taps.T.reshape(self.groups * d, c, *self.kernel_size)
        full = spectrum.new_zeros(math.prod(self.input_size), self.groups, d, c)
        full[self.partners] = spectrum.conj()  # first the mirror images, then the kept ones over the self-conjugate
        full[self.kept] = spectrum
        full = full.permute(1, 2, 3, 0).reshape(self.groups * d, c, *self.input_size)
        grid = torch.fft.ifftn(full, dim=tuple(range(2, full.dim()))).real
        return grid[(slice(None),) * 2 + self.support].contiguous()


@functools.lru_cache(maxsize=64)
def _phases(kernel_size, input_size, dilation, groups: int, dtype: torch.dtype) -> _Phases:
    """The tables of one geometry, built once (a periodic clip meets the same layers again and again)."""
    return _Phases(tuple(kernel_size), tuple(input_size), tuple(dilation), groups, dtype)


def _dilated_kernel(kernel: torch.Tensor, groups: int, dilation) -> np.ndarray:
    """The kernel with its dilation spelled out, as float64 ``(g, D/g, C/g, *reach)`` (the SVD path's input)."""
    k = kernel.detach().to("cpu", torch.float64).numpy()
    k = k.reshape(groups, k.shape[0] // groups, *k.shape[1:])
    reach = tuple(d * (s - 1) + 1 for d, s in zip(dilation, k.shape[3:]))
    dilated = np.zeros(k.shape[:3] + reach)
    dilated[(slice(None),) * 3 + tuple(slice(None, None, d) for d in dilation)] = k
    return dilated


def _fft_transfer(dilated: np.ndarray, input_size: tuple[int, ...], workers: int = 1) -> np.ndarray:
    """The SVD path's transfer matrices by SciPy's FFT, complex128 ``(g, *freqs, D/g, C/g)``."""
    spatial = tuple(range(3, dilated.ndim))
    spectrum = scipy.fft.rfftn(dilated, s=input_size, axes=spatial, workers=workers)
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


def _gram_exponent(kernel: torch.Tensor, real: torch.dtype) -> int:
    """``e`` such that ``kernel / 2**e`` keeps the Gram path's squares in range: 0 where they already are.

    The Gram path squares the singular values in ``real`` (float32 for complex64): a kernel whose
    largest tap is beyond about 1e19 (or under about 1e-19) in float32 overflows (underflows) the
    Gram matrices, and gave NaN or 0 norms, NaN kernels written back, or ``eigh`` failing. Scaled by
    a power of two (exact), the largest tap lies in ``[0.5, 1)``. A kernel whose largest tap lies
    within ``2**±(E / 4)``, ``2**E`` the dtype's overflow (``2**±32`` in float32, ``2**±256`` in
    float64), is left as it is, so the ordinary range keeps the bits of the unscaled computation.
    Host work (one read of the kernel).

    Example:
        >>> _gram_exponent(torch.full((1, 1, 3), 3e20), torch.float32), _gram_exponent(torch.ones(1, 1, 3), torch.float32)
        (69, 0)
    """
    largest = float(kernel.detach().abs().amax()) if kernel.numel() else 0.0
    if largest == 0.0 or not math.isfinite(largest):
        return 0
    exponent = math.frexp(largest)[1]
    window = math.frexp(torch.finfo(real).max)[1] // 4  # a quarter of the largest exponent: 32 in float32
    return 0 if -window <= exponent <= window else exponent


def _scaled_kernel(kernel: torch.Tensor, exponent: int) -> torch.Tensor:
    """``kernel * 2**exponent`` in float64 on the CPU (by ``ldexp``: exact but for taps that fall
    subnormal, far below the round-off of the largest), or ``kernel`` where ``exponent`` is 0."""
    if exponent == 0:
        return kernel
    return torch.from_numpy(np.ldexp(kernel.detach().to("cpu", torch.float64).numpy(), exponent))


def _gram(t: torch.Tensor) -> torch.Tensor:
    """The smaller Hermitian Gram matrix of each ``D x C`` matrix: ``K^H K`` if ``D >= C``, else ``K K^H``."""
    th = t.mH
    return th @ t if t.shape[-2] >= t.shape[-1] else t @ th


def _gram_values(t: torch.Tensor) -> torch.Tensor:
    """Singular values (ascending) of each matrix from the eigenvalues of its Gram matrix."""
    return torch.linalg.eigvalsh(_gram(t)).clamp_(min=0).sqrt_()


def _svd_values(t: torch.Tensor) -> torch.Tensor:
    """Singular values of each matrix by SciPy's SVD (gesdd, then gesvd): where ``eigh`` did not converge."""
    return torch.from_numpy(np.ascontiguousarray(_svd(t.numpy(), compute_uv=False)))


def _map_blocks(fn, matrices, threads: int, *args):
    """``fn`` over the stacked matrices ``(M, D, C)``, split into contiguous blocks over a thread pool.

    LAPACK and BLAS release the GIL, so the blocks run in parallel; BLAS and torch are held to one
    thread meanwhile, so that pool and BLAS do not oversubscribe the cores.
    """
    blocks = min(threads, len(matrices))
    with THREAD_SETTINGS, _torch_threads(1), _blas_limited():
        if blocks <= 1:
            return fn(matrices, *args)
        bounds = np.linspace(0, len(matrices), blocks + 1).astype(int)
        with ThreadPoolExecutor(blocks) as pool:
            parts = list(pool.map(lambda a, b: fn(matrices[a:b], *args), bounds[:-1], bounds[1:]))
    cat = torch.cat if isinstance(matrices, torch.Tensor) else np.concatenate
    if isinstance(parts[0], tuple):
        return tuple(cat(column) for column in zip(*parts))
    return cat(parts)


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
        A float64 array of ``prod(n) * groups * min(out, in) / groups`` values (any order).
        Conjugate symmetry halves the work: frequencies ``f`` and ``-f`` share their singular values. The Gram path
        squares the values, so its absolute error is about ``sqrt(eps) * max(s)``: about ``1e-8``
        relative to the largest value in double, ``3e-4`` in single (the largest values themselves
        are as accurate as the SVD's).

    Example:
        >>> import torch
        >>> sv = conv_singular_values(torch.ones(1, 1, 2), 4)  # y[a] = x[a] + x[a+1], circular
        >>> sorted(sv.round(5).tolist())
        [0.0, 1.41421, 1.41421, 2.0]
    """
    threads = _check_options(method, precision, threads)
    input_size, dilation = _check_kernel(kernel, input_size, groups, dilation)
    if method == "gram":
        phases = _phases(tuple(kernel.shape[2:]), input_size, dilation, groups, _complex_dtype(kernel, precision))
        exponent = _gram_exponent(kernel, phases.real)
        with _torch_threads(threads):
            matrices = phases.forward(_scaled_kernel(kernel, -exponent))
        try:
            values = _map_blocks(_gram_values, matrices, threads).numpy().astype(np.float64)
        except torch.linalg.LinAlgError:  # eigh did not converge: SciPy's SVD of the same matrices
            values = _map_blocks(_svd_values, matrices, threads).numpy().astype(np.float64)
        values = np.ldexp(values, exponent)
        return np.repeat(values.reshape(groups, phases.frequencies, -1), phases.multiplicity, axis=1).reshape(-1)
    t = _fft_transfer(_dilated_kernel(kernel, groups, dilation), input_size, threads)
    values = _map_blocks(lambda m: _svd(m, compute_uv=False), np.ascontiguousarray(t.reshape(-1, *t.shape[-2:])), threads)
    values = values.reshape(*t.shape[:-2], -1)  # (g, *freqs, r): mirrored bins of the last axis share their values
    return np.repeat(values, _mirror_counts(input_size[-1]), axis=-2).reshape(-1)


def conv_spectral_norm(kernel: torch.Tensor, input_size, *, groups: int = 1, dilation=1, **options) -> float:
    """Largest singular value of the circular convolution (see :func:`conv_singular_values`, whose
    ``method``, ``precision`` and ``threads`` it takes).

    Example:
        >>> import torch
        >>> conv_spectral_norm(torch.ones(1, 1, 2), 4)
        2.0
    """
    return float(conv_singular_values(kernel, input_size, groups=groups, dilation=dilation, **options).max())
