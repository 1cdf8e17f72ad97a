"""Per-axis tap patterns: padding index maps against torch.nn.functional.pad, and small cases by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from normopt.geometry import AxisGeometry, axis_patterns, source_index


@given(st.integers(1, 9), st.integers(0, 9), st.sampled_from(["circular", "reflect", "replicate"]))
def test_source_index_matches_torch_padding(size, pad, mode):
    if (mode == "reflect" and pad >= size) or (mode == "circular" and pad > size):
        return  # torch refuses these paddings, and so do the specs
    padded = F.pad(torch.arange(size, dtype=torch.float64).reshape(1, 1, size), (pad, pad), mode=mode).flatten()
    expected = [int(v) for v in padded.tolist()]
    assert [source_index(q - pad, size, mode) for q in range(size + 2 * pad)] == expected


def test_zero_padding_rows_are_the_maximal_in_range_tap_sets():
    # n=4, k=3, stride 1, pad 1: interior rows read all taps; edge rows are subsets and drop out.
    axis = AxisGeometry(size=4, out_size=4, kernel=3, stride=1, pad_left=1, dilation=1)
    patterns = axis_patterns("rows", (axis,))
    assert patterns.counts == ((1, 1, 1),) and patterns.positions == (1,)
    assert patterns.singleton


def test_stride_two_columns_are_residue_classes():
    axis = AxisGeometry(size=8, out_size=4, kernel=3, stride=2, pad_left=1, dilation=1)
    patterns = axis_patterns("columns", (axis,))
    taps = {tuple(i for i, c in enumerate(row) if c) for row in patterns.counts}
    assert taps == {(0, 2), (1,)}


def test_circular_wrap_groups_taps_that_land_on_one_sample():
    # A 3-tap kernel on a 2-sample circular input: taps 0 and 2 hit the same sample.
    axis = AxisGeometry(size=2, out_size=2, kernel=3, stride=1, pad_left=1, dilation=1, mode="circular")
    patterns = axis_patterns("rows", (axis,))
    assert not patterns.singleton
    assert patterns.groups == ((0, 2), (1,))


def test_reflect_edge_columns_by_hand():
    # n=4, k=3, pad 1. Column 1 is read by output 0 through taps {0, 2} (q=-1 reflects onto 1),
    # by output 1 through tap 1 and by output 2 through tap 0; column 2 mirrors it. Columns 0 and
    # 3 have sub-multisets of those groups and are dropped.
    axis = AxisGeometry(size=4, out_size=4, kernel=3, stride=1, pad_left=1, dilation=1, mode="reflect")
    patterns = axis_patterns("columns", (axis,))
    expanded = {tuple(g for g, c in zip(patterns.groups, row) for _ in range(c)) for row in patterns.counts}
    assert expanded == {((0,), (0, 2), (1,)), ((0, 2), (1,), (2,))}
    assert sorted(patterns.positions) == [1, 2]


def test_unknown_positions_are_minus_one():
    axis = AxisGeometry(size=20, out_size=18, kernel=3, stride=1, pad_left=0, dilation=1)
    assert axis_patterns("rows", (axis,), known=False).positions == (-1,)


def test_bad_kind_and_mode_are_refused():
    axis = AxisGeometry(size=4, out_size=2, kernel=3, stride=1, pad_left=0, dilation=1)
    with pytest.raises(ValueError, match="kind must be"):
        axis_patterns("diagonals", (axis,))
    with pytest.raises(ValueError, match="unknown padding mode 'mirror'"):
        source_index(-1, 4, "mirror")
