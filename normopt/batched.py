r"""Many layers at once: line sums, arg-max lines and sparse subgradients in a fixed number of operations.

Per layer this reads each kernel once (``abs`` and a channel reduction, plus one small matrix
product for strided or edge-limited patterns) and gathers the entries of one channel slice; all
else runs on every layer together. The candidate line sums of every layer are laid side by side
in one padded ``(layers, max lines)`` matrix, so one ``max`` gives every layer's norm and arg-max
line; index tables built once turn those into the flat positions of every layer's arg-max slice,
its tap multiplicities and the scale entries it uses. The number of operations per step thus
grows with the layers by about three, not by the seventy of a per-layer loop, and none reads a
value back to the host.

A batch holds layers of one device and one dtype. :class:`BatchPlan` is host-side and hashable;
:class:`BatchTables` holds its index tables on the device, built once by the caller.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from normopt.lines import (
    LinePlan,
    LineTables,
    accumulation_dtype,
    flat_line_sums,
    forward_ad_active,
    functorch_active,
    line_plan,
    line_tables,
    slice_subgradient,
)
from normopt.specs import BatchNormSpec, Spec


@dataclass(frozen=True)
class BatchPlan:
    """The line plans of a batch of layers, batch norms last, and the layout of their buffers.

    Attributes:
        plans: one :class:`~normopt.lines.LinePlan` per layer.
        eps: each batch norm's epsilon (None for the other layers).
        batchnorms: number of batch norms (the last layers of the batch).
        max_lines, max_numel: the most lines and weights of any layer.
        numels: each layer's number of weights.
    """

    plans: tuple[LinePlan, ...]
    eps: tuple[float | None, ...]
    # Derived in __post_init__ (plain attributes: torch.compile traces them as constants).
    batchnorms: int = field(init=False, compare=False)
    max_lines: int = field(init=False, compare=False)
    numels: tuple[int, ...] = field(init=False, compare=False)
    max_numel: int = field(init=False, compare=False)

    def __post_init__(self):
        flags = [plan.batchnorm for plan in self.plans]
        if flags != sorted(flags):
            raise ValueError("a batch lists its batch norms after every other layer")
        numels = tuple(math.prod(plan.shape) for plan in self.plans)
        derived = {
            "batchnorms": sum(flags),
            "max_lines": max(plan.lines for plan in self.plans),
            "numels": numels,
            "max_numel": max(numels),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @property
    def scale_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shape of each layer's decay-buffer scale, broadcastable against its weight.

        One scale per channel slice for rows (output channels). For columns one per input channel
        and tap, ``(1, C, *k)``: repeating the scale over the taps lets the gradient update run
        over long contiguous rows (a scale that changes every ``K`` entries halves its speed).
        Grouped columns, whose slices do not line up with a weight axis: one per (output, input)
        channel pair.
        """
        shapes = []
        for plan in self.plans:
            trailing = (1,) * (len(plan.shape) - 2)
            if plan.batchnorm:
                shapes.append(plan.shape)
            elif plan.kind == "rows":
                shapes.append((plan.shape[0], 1, *trailing))
            elif plan.groups == 1:
                shapes.append((1, *plan.shape[1:]))
            else:
                shapes.append((plan.shape[0], plan.shape[1], *trailing))
        return tuple(shapes)

    @staticmethod
    def scale_slice(plan: LinePlan) -> tuple[int, int, tuple[int, ...]]:
        """``(b, c, offsets)``: the entries of channel ``ch``'s slice use the scales at
        ``(ch // a) * b + (ch % a) * c + offsets``, ``a`` as in :attr:`LinePlan.slice_base`."""
        if plan.batchnorm or plan.kind == "rows":
            return 0, 1, (0,) * plan.slice_size
        if plan.groups == 1:
            return 0, plan.taps, tuple(e % plan.taps for e in range(plan.slice_size))
        cg, dg = plan.shape[1], plan.shape[0] // plan.groups
        return dg * cg, 1, tuple(o * cg for o in range(dg) for _ in range(plan.taps))


@functools.lru_cache(maxsize=256)
def batch_plan(specs: tuple[Spec, ...], ord: float, released_order: bool = False) -> tuple[tuple[int, ...], BatchPlan]:
    """The batch of ``specs`` (one device and dtype): the order it keeps them in (batch norms last) and its plan."""
    order = tuple(sorted(range(len(specs)), key=lambda i: isinstance(specs[i], BatchNormSpec)))
    plans = tuple(line_plan(specs[i], ord, released_order) for i in order)
    eps = tuple(specs[i].eps if isinstance(specs[i], BatchNormSpec) else None for i in order)
    return order, BatchPlan(plans, eps)


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


class BatchTables(NamedTuple):
    """A batch's index tables on one device (built once by :func:`batch_tables`).

    The entries of every layer's channel slice are packed one layer after another (``S`` entries
    in all, no padding): each per-step operation on the arg-max slices touches ``S`` entries.
    """

    lines: tuple[LineTables, ...]
    padded_lines: torch.Tensor  # (L * max_lines,) of -inf, the canvas the line sums are put on
    line_positions: torch.Tensor  # where each line of each layer lands on the canvas
    line_counts: torch.Tensor  # (L,) lines per layer
    patterns: torch.Tensor  # (L,) patterns per layer
    slice_a: torch.Tensor  # (L,) the a, b, c of LinePlan.slice_base, and the scale's b and c
    slice_b: torch.Tensor
    slice_c: torch.Tensor
    scale_b: torch.Tensor
    scale_c: torch.Tensor
    entry_layer: torch.Tensor  # (S,) the layer of each packed slice entry
    entry_offset: torch.Tensor  # (S,) its flat offset from its slice's start, in the layer's weight
    entry_buffer: torch.Tensor  # (S,) the layer's start in the flat decay buffer
    entry_scale: torch.Tensor  # (S,) its scale's offset from the slice's first scale, plus the layer's start
    entry_tap: torch.Tensor  # (S,) its tap index
    ones: torch.Tensor  # (S,) of 1, the scale of a freshly written slice
    tap_counts: torch.Tensor  # flat concatenation of every layer's P x K multiplicities
    tap_counts_offset: torch.Tensor  # (L,) where each layer's table starts
    taps: torch.Tensor  # (L,) K per layer
    bn_eps: torch.Tensor | None  # eps of each batch-norm channel, concatenated
    bn_offset: torch.Tensor | None  # (batch norms,) start of each batch norm's channels


def batch_tables(plan: BatchPlan, device: torch.device, dtype: torch.dtype) -> BatchTables:
    """Build ``plan``'s index tables on ``device`` for weights of ``dtype`` (keep the result: one copy per table)."""
    acc = accumulation_dtype(dtype)
    layers = len(plan.plans)
    ints = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
    positions = [layer * plan.max_lines + j for layer, p in enumerate(plan.plans) for j in range(p.lines)]
    buffer_starts = _offsets(plan.numels)
    scale_starts = _offsets([math.prod(s) for s in plan.scale_shapes])
    entry_layer, entry_offset, entry_buffer, entry_scale, entry_tap = [], [], [], [], []
    for layer, p in enumerate(plan.plans):
        entry_layer += [layer] * p.slice_size
        entry_offset += p.slice_offsets
        entry_buffer += [buffer_starts[layer]] * p.slice_size
        entry_scale += [scale_starts[layer] + o for o in plan.scale_slice(p)[2]]
        entry_tap += [o % p.taps for o in p.slice_offsets]
    counts = [c for p in plan.plans for row in p.tap_counts for c in row]
    bn = [(p.channels, eps) for p, eps in zip(plan.plans, plan.eps) if p.batchnorm]
    return BatchTables(
        lines=tuple(line_tables(p, device, dtype) for p in plan.plans),
        padded_lines=torch.full((layers * plan.max_lines,), -math.inf, dtype=acc, device=device),
        line_positions=ints(positions),
        line_counts=ints([p.lines for p in plan.plans]),
        patterns=ints([p.patterns for p in plan.plans]),
        slice_a=ints([p.slice_base[0] for p in plan.plans]),
        slice_b=ints([p.slice_base[1] for p in plan.plans]),
        slice_c=ints([p.slice_base[2] for p in plan.plans]),
        scale_b=ints([plan.scale_slice(p)[0] for p in plan.plans]),
        scale_c=ints([plan.scale_slice(p)[1] for p in plan.plans]),
        entry_layer=ints(entry_layer),
        entry_offset=ints(entry_offset),
        entry_buffer=ints(entry_buffer),
        entry_scale=ints(entry_scale),
        entry_tap=ints(entry_tap),
        ones=torch.ones(len(entry_layer), dtype=dtype, device=device),
        tap_counts=torch.tensor(counts, dtype=acc, device=device),
        tap_counts_offset=ints(_offsets([p.patterns * p.taps for p in plan.plans])),
        taps=ints([p.taps for p in plan.plans]),
        bn_eps=torch.tensor([e for c, e in bn for _ in range(c)], dtype=acc, device=device) if bn else None,
        bn_offset=ints(_offsets([c for c, _ in bn])) if bn else None,
    )


def batchnorm_factors(running_vars: Sequence[torch.Tensor], tables: BatchTables) -> torch.Tensor:
    r"""``1 / sqrt(running_var + eps)`` of every batch-norm channel of the batch, concatenated."""
    var = torch.cat(list(running_vars)).to(tables.bn_eps.dtype)
    return torch.rsqrt(var + tables.bn_eps)


def all_line_sums(
    weights: Sequence[torch.Tensor],
    bn_factors: torch.Tensor | None,
    plan: BatchPlan,
    tables: BatchTables,
    scratch: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every layer's candidate line sums, concatenated in the plan's order.

    ``weights`` are the layers' kernels (gamma for batch norms), in the plan's order; ``scratch``
    optional weight-shaped buffers for their absolute values (views of one buffer will do).
    Differentiable (without ``scratch``).
    """
    convs = len(plan.plans) - plan.batchnorms
    # vmap and grad of torch.func hand in wrapped tensors, and forward AD dual ones, which cannot be
    # written into a plain buffer
    if scratch is None or (not torch.compiler.is_compiling() and (functorch_active() or forward_ad_active())):
        scratch = [None] * convs
    flat = [flat_line_sums(w, p, t, s) for w, p, t, s in zip(weights[:convs], plan.plans, tables.lines, scratch)]
    if plan.batchnorms:
        gammas = torch.cat(list(weights[convs:])).to(bn_factors.dtype)
        flat.append(gammas.abs() * bn_factors)
    return torch.cat(flat)


def batch_norms(lines: torch.Tensor, tables: BatchTables) -> torch.Tensor:
    """Each layer's norm, the largest of its lines (of :func:`all_line_sums`): ``(L,)``, NaN-propagating."""
    # From 0: a layer without lines (an empty weight) is the zero map, whose norm is 0, not -inf.
    if not torch.compiler.is_compiling() and forward_ad_active():
        # segment_reduce has no forward-mode derivative: the max of each layer's row of a canvas
        # padded with -inf instead (clamp_min keeps NaN, as segment_reduce does).
        canvas = tables.padded_lines.index_put((tables.line_positions,), lines)
        return canvas.view(tables.line_counts.shape[0], -1).amax(1).clamp_min(0.0)
    return torch.segment_reduce(lines, "max", lengths=tables.line_counts, initial=0.0)


def padded_line_sums(lines: torch.Tensor, plan: BatchPlan, tables: BatchTables) -> torch.Tensor:
    """The lines of :func:`all_line_sums` on one ``(layers, max_lines)`` canvas, ``-inf`` past each layer's."""
    canvas = tables.padded_lines.index_put((tables.line_positions,), lines)
    return canvas.view(len(plan.plans), plan.max_lines)


class ArgmaxSlices(NamedTuple):
    """Where each layer of a batch attains its norm, and the slice of the kernel its line lives on.

    Attributes:
        norms: ``(L,)`` the layers' norms.
        channel: ``(L,)`` the arg-max line's channel; ``pattern``: its pattern.
        entries: ``(S,)`` each layer's slice entries, packed: flat indices into the layer's weight.
        buffer: ``(S,)`` the same entries' flat indices into the batch's decay buffer.
        scales: ``(S,)`` flat index, into the batch's scale buffer, of each entry's scale.
    """

    norms: torch.Tensor
    channel: torch.Tensor
    pattern: torch.Tensor
    entries: torch.Tensor
    buffer: torch.Tensor
    scales: torch.Tensor


def argmax_slices(canvas: torch.Tensor, tables: BatchTables) -> ArgmaxSlices:
    """Norms and arg-max lines of the canvas of :func:`padded_line_sums`; ties go to the first line."""
    norms, line = torch.max(canvas, dim=1)
    channel = torch.div(line, tables.patterns, rounding_mode="floor")
    pattern = line - channel * tables.patterns
    quotient = torch.div(channel, tables.slice_a, rounding_mode="floor")
    remainder = channel - quotient * tables.slice_a
    entries = (quotient * tables.slice_b + remainder * tables.slice_c).index_select(0, tables.entry_layer) + tables.entry_offset
    scales = (quotient * tables.scale_b + remainder * tables.scale_c).index_select(0, tables.entry_layer) + tables.entry_scale
    return ArgmaxSlices(norms, channel, pattern, entries, entries + tables.entry_buffer, scales)


def slice_subgradients(
    weights: Sequence[torch.Tensor],
    found: ArgmaxSlices,
    bn_factors: torch.Tensor | None,
    plan: BatchPlan,
    tables: BatchTables,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each layer's subgradient on its arg-max slice, packed ``(S,)``, and each entry's multiplicity.

    Conv and linear layers: ``count * sign(w)`` per entry (counts from the pattern's tap table;
    folding padding adds the taps of a group before the sign). Batch norm:
    ``sign(gamma_c) / sqrt(var_c + eps)`` at the arg-max channel.
    """
    sizes = [p.slice_size for p in plan.plans]
    slices = torch.cat([torch.take(w, e) for w, e in zip(weights, found.entries.split(sizes))])
    counts_at = (tables.tap_counts_offset + found.pattern * tables.taps).index_select(0, tables.entry_layer)
    counts = tables.tap_counts.take(counts_at + tables.entry_tap)
    if plan.batchnorms:  # one entry each, the last ones
        factors = bn_factors.take(tables.bn_offset + found.channel[len(sizes) - plan.batchnorms :])
        counts = torch.cat([counts[: counts.numel() - plan.batchnorms], factors])
    values = torch.sign(slices) * counts.to(slices.dtype)
    start = 0
    for layer, (p, t) in enumerate(zip(plan.plans, tables.lines)):
        if p.membership is not None:  # rare: reflect / replicate / wrapping circular padding
            group_counts = t.reduce.T.index_select(0, found.pattern[layer : layer + 1])[0]
            values[start : start + p.slice_size] = slice_subgradient(slices[start : start + p.slice_size], group_counts, p, t)
        start += p.slice_size
    return values, counts
