"""The transfer matrices of normopt.spectrum against NumPy's FFT of the zero-padded kernel."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import threadpoolctl
import torch
from helpers import circular_cases
from hypothesis import given, settings

from normopt import spectrum
from normopt.spectrum import _dilated_kernel, _Phases, conv_singular_values
from normopt.svc import clip_singular_values


def phases_of(weight, size, groups, dilation, table: bool) -> _Phases:
    with mock.patch.object(spectrum, "MAX_TABLE_TAPS", 10**9 if table else 0):
        phases = _Phases(weight.shape[2:], size, dilation, groups, torch.complex128)
    assert phases.table is table
    return phases


@settings(max_examples=120)
@given(circular_cases())
@pytest.mark.parametrize("table", [True, False])
def test_phases_give_the_fft_of_the_zero_padded_kernel(table, case):
    weight, size, groups, dilation = case
    phases = phases_of(weight, size, groups, dilation, table)
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
@pytest.mark.parametrize("table", [True, False])
def test_the_inverse_reads_the_taps_back(table, case):
    weight, size, groups, dilation = case
    phases = phases_of(weight, size, groups, dilation, table)
    torch.testing.assert_close(phases.inverse(phases.forward(weight)), weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("table", [True, False])
def test_singular_values_and_clips_inside_autocast_are_those_outside(table):
    """The tables of phases multiply float32 kernels: autocast would run that in bfloat16."""
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3)
    with mock.patch.object(spectrum, "MAX_TABLE_TAPS", 10**9 if table else 0):
        outside = (conv_singular_values(weight, (6, 6)), clip_singular_values(weight, (6, 6), 0.5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = (conv_singular_values(weight, (6, 6)), clip_singular_values(weight, (6, 6), 0.5))
    np.testing.assert_array_equal(inside[0], outside[0])
    assert torch.equal(inside[1], outside[1])


def test_a_kernel_with_many_taps_goes_through_the_fft_and_clips_as_the_svd_path():
    weight = torch.randn(3, 2, 9, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 81 taps
    assert not spectrum._phases((9, 9), (10, 10), (1, 1), 1, torch.complex128).table
    values = np.sort(conv_singular_values(weight, 10))
    np.testing.assert_allclose(values, np.sort(conv_singular_values(weight, 10, method="svd")), rtol=1e-9, atol=1e-12)
    bound = 0.5 * values.max()
    torch.testing.assert_close(clip_singular_values(weight, 10, bound), clip_singular_values(weight, 10, bound, method="svd"))


def test_single_precision_tables_for_float32_kernels():
    weight = torch.randn(4, 3, 3, 3)
    phases = _Phases(weight.shape[2:], (7, 8), (1, 1), 1, torch.complex64)
    transfer = phases.forward(weight)
    assert transfer.dtype == torch.complex64 and transfer.shape == ((7 * 8 + 2) // 2, 4, 3)  # 2 self-conjugate
    torch.testing.assert_close(phases.inverse(transfer), weight, rtol=1e-5, atol=1e-6)


def test_concurrent_callers_leave_the_thread_settings_as_they_found_them():
    torch_threads = torch.get_num_threads()
    blas = [(p["filepath"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    barrier = threading.Barrier(4)

    def work(_):
        barrier.wait()
        return clip_singular_values(weight, 8, 0.1, threads=2), conv_singular_values(weight, 8, threads=3)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4)))
    for clipped, values in results[1:]:
        torch.testing.assert_close(clipped, results[0][0], rtol=0, atol=0)
        np.testing.assert_array_equal(values, results[0][1])
    assert torch.get_num_threads() == torch_threads
    assert [(p["filepath"], p["num_threads"]) for p in threadpoolctl.threadpool_info()] == blas


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_a_kernel_that_is_not_real_floating_point_is_refused(dtype):
    kernel = torch.ones(2, 2, 3, 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"kernel must be real floating-point"):
        conv_singular_values(kernel, (4, 4))
    with pytest.raises(TypeError, match=r"kernel must be real floating-point"):
        clip_singular_values(kernel, (4, 4), bound=1.0)
