"""Which kernel taps meet in one row or one column of a convolution's matrix, per spatial axis.

A convolution's matrix is separable over its spatial axes: output position ``a`` of one axis
reads, through tap ``i``, the padded input at ``q = a*stride - pad_left + i*dilation``, and the
padding mode maps ``q`` to a source sample ``u`` (or to nothing, for zero padding). The entry of
the matrix at (output ``(o, a_1..a_N)``, input ``(c, u_1..u_N)``) is therefore
``sum over taps i_j in G_j(a_j, u_j) of K[o, c, i_1..i_N]``, where ``G_j(a, u)`` is the *group* of
taps of axis ``j`` that carry ``a`` to ``u``.

A row of the matrix (fixed ``a``) is described per axis by the groups ``{G(a, u) : u}``; a column
(fixed ``u``) by ``{G(a, u) : a}``. This module computes those descriptions (*patterns*) for every
position of one axis, keeps the distinct ones, drops those dominated by another, and returns them
as small integer tables. Everything here is plain Python on integers, cached, and never touches a
tensor: it runs once per layer geometry, not once per step.

With zero padding every group is a single tap and a pattern is just a tap set: the row set
``R(a) = {i : 0 <= q < n}`` or the column set ``C(u)``. Circular, reflect and replicate padding can
carry several taps to one sample, which is why patterns hold groups.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial axis of a convolution, seen as a map from ``size`` inputs to ``out_size`` outputs.

    Output position ``a`` in ``[0, out_size)`` reads, through tap ``i`` in ``[0, kernel)``, the input
    sample at ``a*stride - pad_left + i*dilation``, mapped into ``[0, size)`` by ``mode``.
    ``out_size`` is explicit (not derived from the padding) so that the adjoint of a transposed
    convolution, whose output range is cut to the transposed layer's input size, fits too.
    """

    size: int
    out_size: int
    kernel: int
    stride: int
    pad_left: int
    dilation: int
    mode: str = "zeros"


@dataclass(frozen=True)
class Patterns:
    """Distinct tap patterns of the rows or the columns of one axis.

    Attributes:
        groups: the distinct tap groups used by any pattern, each a sorted tuple of taps.
        counts: ``counts[p][g]`` is how often group ``g`` occurs in pattern ``p``.
        positions: for each pattern, one position (output position for rows, input position for
            columns) that has it; ``-1`` when the input size is not known.
    """

    groups: tuple[tuple[int, ...], ...]
    counts: tuple[tuple[int, ...], ...]
    positions: tuple[int, ...]

    @property
    def singleton(self) -> bool:
        """True when no group holds two taps, so absolute values can be taken tap by tap."""
        return all(len(g) == 1 for g in self.groups)


def source_index(q: int, size: int, mode: str) -> int | None:
    """Input sample that padded position ``q`` (unpadded coordinates) reads, or None for a zero."""
    if 0 <= q < size:
        return q
    if mode == "zeros":
        return None
    if mode == "circular":
        return q % size
    if mode == "replicate":
        return min(max(q, 0), size - 1)
    if mode == "reflect":
        # PyTorch mirrors about the edge sample without repeating it; it requires pad < size,
        # so one reflection always lands inside.
        return -q if q < 0 else 2 * (size - 1) - q
    raise ValueError(f"unknown padding mode {mode!r}; expected one of {PADDING_MODES}")


def _taps_by_position(axis: AxisGeometry) -> list[dict[int, list[int]]]:
    """For every output position ``a``: {input sample u: taps carrying a to u}."""
    table = []
    for a in range(axis.out_size):
        by_source: dict[int, list[int]] = {}
        for i in range(axis.kernel):
            u = source_index(a * axis.stride - axis.pad_left + i * axis.dilation, axis.size, axis.mode)
            if u is not None:
                by_source.setdefault(u, []).append(i)
        table.append(by_source)
    return table


def _raw_patterns(axis: AxisGeometry, kind: str) -> list[tuple[tuple[tuple[int, ...], ...], int]]:
    """(pattern, position) for every row or every column; a pattern is a sorted tuple of groups."""
    table = _taps_by_position(axis)
    if kind == "rows":
        return [(tuple(sorted(tuple(g) for g in by_source.values())), a) for a, by_source in enumerate(table)]
    by_input: list[list[tuple[int, ...]]] = [[] for _ in range(axis.size)]
    for by_source in table:
        for u, taps in by_source.items():
            by_input[u].append(tuple(taps))
    return [(tuple(sorted(groups)), u) for u, groups in enumerate(by_input)]


def _is_submultiset(small: tuple, large: tuple) -> bool:
    remaining = list(large)
    for item in small:
        if item not in remaining:
            return False
        remaining.remove(item)
    return True


def _maximal(patterns: list[tuple[tuple, int]]) -> list[tuple[tuple, int]]:
    """Drop repeated patterns and those whose groups all occur in another pattern.

    A row or column sum is a sum of ``|sum of a group's weights|`` terms, so a pattern whose
    groups are a sub-multiset of another's can never have the larger sum. With zero padding this
    is plain tap-set inclusion, which leaves at most a handful of patterns per axis.
    """
    unique: dict[tuple, int] = {}
    for pattern, position in patterns:
        unique.setdefault(pattern, position)
    items = sorted(unique.items(), key=lambda item: -sum(len(g) for g in item[0]))
    kept: list[tuple[tuple, int]] = []
    for pattern, position in items:
        if not any(_is_submultiset(pattern, other) for other, _ in kept):
            kept.append((pattern, position))
    return kept


def _tables(patterns: list[tuple[tuple, int]], known: bool) -> Patterns:
    groups = tuple(sorted({g for pattern, _ in patterns for g in pattern}))
    index = {g: j for j, g in enumerate(groups)}
    counts = []
    for pattern, _ in patterns:
        row = [0] * len(groups)
        for g in pattern:
            row[index[g]] += 1
        counts.append(tuple(row))
    positions = tuple(position if known else -1 for _, position in patterns)
    return Patterns(groups, tuple(counts), positions)


@functools.lru_cache(maxsize=4096)
def axis_patterns(kind: str, axes: tuple[AxisGeometry, ...], known: bool = True) -> Patterns:
    """Maximal row (``kind="rows"``) or column (``kind="columns"``) patterns of one axis.

    Args:
        kind: ``"rows"`` or ``"columns"``.
        axes: one or more geometries of the same axis; the patterns of all are pooled, which gives
            the supremum of the norm over those input sizes (used for an unknown input size).
        known: whether positions refer to a real input; if not they are reported as -1.

    Example:
        >>> axis = AxisGeometry(size=5, out_size=3, kernel=3, stride=2, pad_left=1, dilation=1)
        >>> axis_patterns("columns", (axis,)).groups  # residue classes {0, 2} and {1}
        ((0,), (1,), (2,))
        >>> axis_patterns("columns", (axis,)).counts
        ((1, 0, 1), (0, 1, 0))
    """
    if kind not in ("rows", "columns"):
        raise ValueError(f"kind must be 'rows' or 'columns', not {kind!r}")
    pooled = [item for axis in axes for item in _raw_patterns(axis, kind)]
    return _tables(_maximal(pooled), known)
