"""The transfer matrices of normopt.spectrum against SciPy's FFT of the zero-padded kernel."""

from __future__ import annotations

import numpy as np
import torch
from helpers import circular_cases
from hypothesis import given, settings

from normopt.spectrum import _dilated_kernel, _Phases


@settings(max_examples=120)
@given(circular_cases())
def test_phases_give_the_fft_of_the_zero_padded_kernel(case):
    weight, size, groups, dilation = case
    phases = _Phases(weight.shape[2:], size, dilation, groups, torch.complex128)
    ours = phases.forward(weight).numpy()
    dilated = _dilated_kernel(weight, groups, dilation)
    fft = np.fft.fftn(dilated, s=size, axes=tuple(range(3, dilated.ndim)))  # (g, D/g, C/g, *grid)
    fft = np.moveaxis(fft.reshape(*fft.shape[:3], -1), -1, 1)[:, phases.indices]  # (g, F, D/g, C/g)
    np.testing.assert_allclose(ours, fft.reshape(ours.shape), rtol=1e-12, atol=1e-12 * np.abs(fft).max())
    # one frequency of each conjugate pair, each counted for its pair: the whole grid, once
    assert phases.multiplicity.sum() == np.prod(size)
    coords = np.array(np.unravel_index(phases.indices, size))
    partners = np.ravel_multi_index(tuple(-coords % np.array(size)[:, None]), size)
    single = phases.multiplicity == 1
    assert (partners[single] == phases.indices[single]).all() and not set(partners[~single]) & set(phases.indices)


@settings(max_examples=120)
@given(circular_cases())
def test_the_inverse_reads_the_taps_back(case):
    weight, size, groups, dilation = case
    phases = _Phases(weight.shape[2:], size, dilation, groups, torch.complex128)
    torch.testing.assert_close(phases.inverse(phases.forward(weight)), weight, rtol=1e-12, atol=1e-12)


def test_single_precision_tables_for_float32_kernels():
    weight = torch.randn(4, 3, 3, 3)
    phases = _Phases(weight.shape[2:], (7, 8), (1, 1), 1, torch.complex64)
    spectrum = phases.forward(weight)
    assert spectrum.dtype == torch.complex64 and spectrum.shape == ((7 * 8 + 2) // 2, 4, 3)  # 2 self-conjugate
    torch.testing.assert_close(phases.inverse(spectrum), weight, rtol=1e-5, atol=1e-6)
