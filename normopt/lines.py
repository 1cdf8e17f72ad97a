r"""The lines of a layer's matrix: which kernel weights meet in each row or column, as small tables.

A *line* is a row (for the l_inf norm) or a column (for the l1 norm) of a layer's matrix. Seen as a
convolution with kernel ``W`` of shape ``(D, C/g, k_1 .. k_N)`` (a linear layer is one without
spatial axes; a transposed convolution is the adjoint of one, so its rows are that convolution's
columns), every line lives on one *channel slice* of the kernel:

* a row of output channel ``o`` reads the slice ``W[o]``: its group's input channels, every tap;
* a column of input channel ``c`` reads ``W[o, c mod C/g]`` for the output channels ``o`` of ``c``'s
  group, every tap.

Which taps of its slice a line reads, and how often, depends on where the line sits; per spatial
axis, :mod:`normopt.geometry` lists the distinct maximal *patterns*. This module turns those into
one table over the flattened taps (the Kronecker product of the axes' tables), so that the absolute
sums of every candidate line of a layer are one abs-and-reduce pass over the kernel followed by one
small matrix product, and the subgradient of a line is the sign of its slice times one row of a
table.

:class:`LinePlan` is host-side and hashable, built once per spec and norm order;
:class:`LineTables` holds a plan's tables as tensors on one device, built once by whoever keeps them
(a transformation's state, a :class:`~normopt.LayerSpecs`), so no step copies tables to the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from normopt.deterministic import matmul
from normopt.discovery import WRAPPER_PREFIXES
from normopt.geometry import Patterns, axis_patterns
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec, Spec, axis_geometries, large_input_geometries

_ORDS = {1: 1, "l1": 1, math.inf: math.inf, "inf": math.inf, "linf": math.inf, 2: 2, "l2": 2}

Table = tuple[tuple[int, ...], ...]


def parse_ord(ord) -> float:
    """Normalise a norm order: ``1``/``"l1"``, ``float("inf")``/``"linf"``, or ``2``/``"l2"``.

    Example:
        >>> parse_ord("linf")
        inf
    """
    try:
        if not isinstance(ord, (str, numbers.Real)) or isinstance(ord, bool):  # True == 1 (NumPy's too) read as l1
            raise TypeError
        return _ORDS[ord.lower() if isinstance(ord, str) else ord]
    except (KeyError, TypeError):
        raise ValueError(f"unknown norm order {ord!r}; use 1 or 'l1', float('inf') or 'linf', 2 or 'l2'") from None


_ACCUMULATION = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype that line sums are accumulated in: at least float32, because half-precision sums over
    thousands of weights lose digits."""
    # A table, not torch.promote_types, which would dispatch an operator on every call of a step.
    return _ACCUMULATION.get(dtype) or torch.promote_types(dtype, torch.float32)


# The prefixes wrappers put before a model's keys, alone or stacked (torch.compile of a DDP model:
# "_orig_mod.module."), longest first.
_PREFIXES = tuple(
    sorted({a + b for a in ("", *WRAPPER_PREFIXES) for b in ("", *WRAPPER_PREFIXES) if a != b}, key=len, reverse=True)
)


# torch's activation-checkpoint (and CPU-offload) wrapper: named_parameters() keep its name inside
# the key, and its state_dict hook takes it out.
_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."


def resolve(tensors: Mapping[str, torch.Tensor], key: str, spec: Spec) -> str:
    """The key under which ``tensors`` holds ``key``: itself, or under a DDP ``module.`` and/or a
    ``torch.compile`` ``_orig_mod.`` prefix, or without an activation-checkpoint wrapper's name."""
    if key in tensors:
        return key
    for candidate in (key, key.replace(_CHECKPOINT_WRAPPED, "")) if _CHECKPOINT_WRAPPED in key else (key,):
        for prefix in ("", *_PREFIXES):
            if prefix + candidate in tensors:
                return prefix + candidate
    raise KeyError(
        f"layer {spec.name!r}: no tensor {key!r} in the mapping; pass model.state_dict() or "
        "{**dict(model.named_parameters()), **dict(model.named_buffers())}"
    )


def lookup(tensors: Mapping[str, torch.Tensor], key: str, spec: Spec) -> torch.Tensor:
    """``tensors[key]``, also under a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix (or both)."""
    tensor = tensors[resolve(tensors, key, spec)]
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"layer {spec.name!r}: {key!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_complex() or tensor.dtype == torch.bool:  # no norm of these maps here, and no silent cast
        raise TypeError(f"layer {spec.name!r}: {key!r} is {tensor.dtype}; norms are of real weights")
    return tensor


def check_specs(specs) -> None:
    """Refuse specs that are not a mapping ``{layer name: spec}``."""
    if not isinstance(specs, Mapping):
        kind = type(specs).__name__
        raise TypeError(f"specs must be a mapping {{layer name: spec}} (normopt.layer_specs gives one), got {kind}")


def check_spec(spec, caller: str, every: str | None = None) -> None:
    """Refuse anything but one layer's spec, naming what ``caller`` was given instead (and ``every``,
    the function that takes the specs of every layer, if there is one)."""
    if isinstance(spec, (LinearSpec, ConvSpec, BatchNormSpec)):
        return
    kind = type(spec).__name__
    if isinstance(spec, Mapping):
        instead = f", or {every}(tensors, specs) for every layer" if every else ""
        raise TypeError(f"{caller} takes one layer's spec, got a {kind} of {len(spec)} layers: pass specs[name]{instead}")
    shown = repr(spec) if len(repr(spec)) <= 60 else repr(spec)[:57] + "..."
    raise TypeError(
        f"{caller}: spec must be a LinearSpec, ConvSpec or BatchNormSpec (normopt.layer_specs(model, x)[name]), "
        f"got {kind} {shown}"
    )


def checked(tensors: Mapping[str, torch.Tensor], key: str, spec: Spec, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`lookup`, refusing a tensor of the wrong shape with the layer's name."""
    tensor = lookup(tensors, key, spec)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"layer {spec.name!r}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def weight_shape(spec: Spec) -> tuple[int, ...]:
    """Shape of the tensor that norm decay regularizes: the kernel, or batch norm's gamma."""
    return (spec.num_features,) if isinstance(spec, BatchNormSpec) else spec.weight_shape


def line_kind(spec: Spec, ord: float) -> str:
    """``"rows"`` or ``"columns"`` of the kernel seen as a convolution (transposed layers swap them)."""
    return "rows" if (ord == math.inf) != getattr(spec, "transposed", False) else "columns"


def _kron(tables: list[Table]) -> Table:
    """Kronecker product of integer matrices, the first one varying slowest (row-major flattening)."""
    result: Table = ((1,),)
    for table in tables:
        result = tuple(tuple(a * b for a in row_a for b in row_b) for row_a in result for row_b in table)
    return result


def _axis_tables(patterns: Patterns, kernel: int) -> tuple[Table | None, Table]:
    """(membership groups x taps, or None when every group is one tap; counts patterns x groups-or-taps)."""
    if not patterns.singleton:
        membership = tuple(tuple(int(i in group) for i in range(kernel)) for group in patterns.groups)
        return membership, patterns.counts
    per_tap = []
    for counts in patterns.counts:
        row = [0] * kernel
        for (tap,), c in zip(patterns.groups, counts):
            row[tap] += c
        per_tap.append(tuple(row))
    return None, tuple(per_tap)


class _Reduction(NamedTuple):
    """How :func:`_channel_sum` reduces the kernel of one plan: decided once, not on every step."""

    unflatten: tuple[int, int] | None  # split the output channels into (groups, per group) first
    first: tuple[int, ...]  # axes of the first sum
    second: tuple[int, ...] | None  # axes of a second sum of its result
    shape: tuple[int, ...] | None  # the result's shape (None: as it comes)


def _reduction(shape: tuple[int, ...], kind: str, groups: int, released_order: bool, keep_taps: bool, ndim: int) -> _Reduction:
    """How to sum an ``ndim``-dimensional ``|x|`` laid out like the kernel of ``shape`` over the
    channels of each line, keeping the taps apart or not."""
    channels = shape[0] if kind == "rows" else groups * shape[1]
    taps = tuple(range(2, ndim))
    if kind == "rows" or (shape[0] == groups and shape[1] == 1):
        # Rows; or columns of a depthwise kernel (one output channel per input channel), the same
        # slices: the rows' contiguous reduction measured 1.7x faster than the grouped one for them.
        return _Reduction(None, (1,) if keep_taps else (1, *taps), None, (channels, -1) if keep_taps else None)
    grouped = groups != 1
    unflatten = (groups, shape[0] // groups) if grouped else None  # (g, D/g, C/g, *k)
    out = int(grouped)  # the axis of a group's output channels
    tap_axes = tuple(t + out for t in taps)
    result = (channels, -1) if keep_taps else ((channels,) if grouped else None)
    if keep_taps:
        return _Reduction(unflatten, (out,), None, result)
    if released_order or math.prod(shape[2:]) == 1 or shape[0] == groups:
        # One reduction: as the released code adds (bit identity), or where it reads contiguous
        # runs anyway (1x1 kernels; one output channel per group).
        return _Reduction(unflatten, (out, *tap_axes), None, result)
    # Output channels first, an outer-axis sum that vectorises, then the taps of the small result:
    # one reduction over both axes measured 2-7x slower on 3x3 kernels, small ones too (22.5
    # against 6.3 us for 32x128x3x3, 81 against 11 for 256x64x3x3, 1 thread).
    return _Reduction(unflatten, (out,), tuple(a - 1 for a in tap_axes), result)


def _unread_taps(kernel: tuple[int, ...], counts: Table) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...] | None]:
    """``(read, box)``: the flat taps that some line reads, where some taps are read by none (else
    ``()``), and per spatial axis the ``(first, stop)`` of the box they form (None where they form
    none, or every tap is read).

    A kernel larger than its input (ImageNet models on 32x32 images: the last stage of a ResNet-18
    sees 1x1 maps) has taps that no line reads: they are no entry of the layer's matrix.
    """
    read = tuple(t for t in range(math.prod(kernel)) if any(row[t] for row in counts))
    if len(read) in (0, math.prod(kernel)):
        return (), None
    where = [[(t // math.prod(kernel[a + 1 :])) % k for t in read] for a, k in enumerate(kernel)]
    box = tuple((min(axis), max(axis) + 1) for axis in where)
    return read, (box if math.prod(stop - first for first, stop in box) == len(read) else None)


@dataclass(frozen=True)
class LinePlan:
    """Where the candidate lines of one layer sit on its kernel (host-side, hashable).

    Attributes:
        name: the layer's name, for messages.
        kind: ``"rows"`` or ``"columns"`` of the kernel seen as a convolution.
        shape: the regularized tensor's shape (kernel, linear weight, or batch-norm gamma).
        groups: the convolution's groups (1 otherwise).
        membership: ``G x K`` 0/1 table of the taps that land on one input sample (non-zero
            padding folds several); None when every sample is reached by at most one tap.
        counts: ``P x G`` (with membership) or ``P x K`` table: how often each tap group enters each
            of the ``P`` candidate patterns; None when there is one pattern holding every tap once.
        positions: per spatial axis, one position that has each of that axis' patterns (``-1``
            when the input size is unknown), for reporting where a norm is attained.
        batchnorm: whether the layer is an eval-mode batch norm (a diagonal map).
        released_order: add the weights of each column in the order the authors' released code
            does (one reduction over output channels and taps; a strided pattern's taps gathered
            column by column), so that near-ties between columns resolve as there and
            ``rule="reference"`` reproduces its weights bit for bit. Slower for stride-1 columns.
        reduction, merged_reduction: derived, how :func:`flat_line_sums` reduces ``|kernel|`` (and,
            with membership, the absolute sums of merged taps) over channels; None where unused.
        read, read_counts: derived, where some taps of the kernel are read by no line (a kernel
            larger than its input): the flat taps some line reads and :attr:`counts` on them; else
            ``()`` and None.
        read_taps, read_reduction, read_alone: derived, for rows whose read taps form a box: its
            index (slices), how it is summed, and whether it is one tap; else None, None, False
            (see :func:`flat_line_sums`).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    groups: int = 1
    membership: Table | None = None
    counts: Table | None = None
    positions: tuple[tuple[int, ...], ...] = ()
    batchnorm: bool = False
    released_order: bool = False
    # Derived once in __post_init__: a step runs flat_line_sums for every layer, and deciding there
    # cost more than the sums of a small kernel.
    reduction: _Reduction | None = field(init=False, compare=False, repr=False)
    merged_reduction: _Reduction | None = field(init=False, compare=False, repr=False)
    read_taps: tuple[slice, ...] | None = field(init=False, compare=False, repr=False)
    read: tuple[int, ...] = field(init=False, compare=False, repr=False)
    read_counts: Table | None = field(init=False, compare=False, repr=False)
    read_reduction: _Reduction | None = field(init=False, compare=False, repr=False)
    read_alone: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        conv = not self.batchnorm
        how = (self.kind, self.groups, self.released_order)
        derived = {
            "reduction": _reduction(self.shape, *how, self.counts is not None, len(self.shape)) if conv else None,
            "merged_reduction": _reduction(self.shape, *how, True, 3) if conv and self.membership is not None else None,
            "read_taps": None,
            "read": (),
            "read_counts": None,
            "read_reduction": None,
            "read_alone": False,
        }
        # Not with folding (tables per tap group) nor in the released order (bit identity).
        read, box = (), None
        if conv and self.counts is not None and self.membership is None and not self.released_order:
            read, box = _unread_taps(self.shape[2:], self.counts)
        if read:
            derived.update(read=read, read_counts=tuple(tuple(row[t] for t in read) for row in self.counts))
        # Rows only: a compiled sum over the output channels of a strided box measured slower than
        # the whole kernel's.
        if box is not None and self.kind == "rows":
            shape = (*self.shape[:2], *(stop - first for first, stop in box))
            counts = derived["read_counts"]
            plain = len(counts) == 1 and all(c == 1 for c in counts[0])  # one pattern reading each tap once
            derived.update(
                read_taps=(slice(None), slice(None), *(slice(first, stop) for first, stop in box)),
                read_reduction=_reduction(shape, *how, not plain, len(shape)),
                read_alone=len(read) == 1,
            )
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        # Filled now, not at first use: a first use inside a compiled region would take
        # cached_property's lock, which dynamo cannot trace (Python < 3.12).
        for name in _CACHED:
            getattr(self, name)

    @functools.cached_property
    def taps(self) -> int:
        """Number of kernel taps ``K`` (1 for linear and batch-norm layers)."""
        return math.prod(self.shape[2:])

    @functools.cached_property
    def channels(self) -> int:
        """Number of channel slices: output channels for rows, input channels for columns."""
        if self.batchnorm or self.kind == "rows":
            return self.shape[0]
        return self.groups * self.shape[1]

    @functools.cached_property
    def patterns(self) -> int:
        """Number ``P`` of candidate patterns per channel."""
        return 1 if self.counts is None else len(self.counts)

    @functools.cached_property
    def lines(self) -> int:
        """Number of candidate lines, ``channels * patterns``; line ``j`` is channel ``j // P``, pattern ``j % P``."""
        return self.channels * self.patterns

    @functools.cached_property
    def slice_size(self) -> int:
        """Entries of one channel slice: ``C/g * K`` for rows, ``D/g * K`` for columns, 1 for batch norm."""
        if self.batchnorm:
            return 1
        if self.kind == "rows":
            return self.shape[1] * self.taps
        return self.shape[0] // self.groups * self.taps

    @functools.cached_property
    def slice_base(self) -> tuple[int, int, int]:
        """``(a, b, c)``: the slice of channel ``ch`` starts at flat index ``(ch // a) * b + (ch % a) * c``."""
        if self.batchnorm:
            return self.channels, 0, 1
        if self.kind == "rows":
            return self.channels, 0, self.shape[1] * self.taps
        cg = self.shape[1]
        return cg, self.shape[0] // self.groups * cg * self.taps, self.taps

    @functools.cached_property
    def slice_offsets(self) -> tuple[int, ...]:
        """Flat offsets, from the slice's start, of its entries; entry ``e`` is tap ``offsets[e] % K``."""
        if self.batchnorm or self.kind == "rows":
            return tuple(range(self.slice_size))
        stride = self.shape[1] * self.taps  # between consecutive output channels
        return tuple(o * stride + i for o in range(self.shape[0] // self.groups) for i in range(self.taps))

    @functools.cached_property
    def released_taps(self) -> tuple[tuple[int, ...], ...] | None:
        """Per pattern, its taps in the released code's gathering order (column by column), when
        :attr:`released_order` applies: a 2-D convolution's columns, each tap at most once per line."""
        if not self.released_order or self.kind != "columns" or self.groups != 1 or len(self.shape) != 4:
            return None
        if self.counts is None or self.membership is not None or any(c > 1 for row in self.counts for c in row):
            return None
        width = self.shape[3]
        column_by_column = lambda i: (i % width, i // width)
        return tuple(tuple(sorted((i for i, c in enumerate(row) if c), key=column_by_column)) for row in self.counts)

    @functools.cached_property
    def tap_counts(self) -> Table:
        """``P x K``: how often each tap of a slice enters each pattern's line (after folding)."""
        if self.counts is None:
            return ((1,) * self.taps,)
        if self.membership is None:
            return self.counts
        return tuple(
            tuple(sum(c * member[i] for c, member in zip(row, self.membership)) for i in range(self.taps)) for row in self.counts
        )

    def slice_index(self, channel: torch.Tensor) -> torch.Tensor:
        """Flat indices (in the tensor's logical row-major order) of the slice of ``channel`` (0-d)."""
        a, b, c = self.slice_base
        offsets = torch.tensor(self.slice_offsets, device=channel.device)
        return torch.div(channel, a, rounding_mode="floor") * b + torch.remainder(channel, a) * c + offsets


_CACHED = tuple(name for name, value in vars(LinePlan).items() if isinstance(value, functools.cached_property))


def _conv_plan(spec: LinearSpec | ConvSpec, kind: str) -> LinePlan:
    if isinstance(spec, LinearSpec):
        return LinePlan(spec.name, kind, spec.weight_shape)
    if spec.input_size is None:
        per_axis = tuple(axis_patterns(kind, axes, known=False) for axes in large_input_geometries(spec))
    else:
        per_axis = tuple(axis_patterns(kind, (axis,)) for axis in axis_geometries(spec, spec.input_size))
    tables = [_axis_tables(p, k) for p, k in zip(per_axis, spec.kernel_size)]
    folded = any(membership is not None for membership, _ in tables)
    identity = lambda k: tuple(tuple(int(i == j) for j in range(k)) for i in range(k))
    membership = _kron([m if m is not None else identity(k) for (m, _), k in zip(tables, spec.kernel_size)]) if folded else None
    counts = _kron([c for _, c in tables])
    if not folded and counts == ((1,) * len(counts[0]),):
        counts = None  # one pattern, every tap once: a plain sum
    positions = tuple(p.positions for p in per_axis)
    return LinePlan(spec.name, kind, spec.weight_shape, spec.groups, membership, counts, positions)


@functools.lru_cache(maxsize=4096)
def line_plan(spec: Spec, ord, released_order: bool = False) -> LinePlan:
    """The plan of a layer's rows (``ord=inf``) or columns (``ord=1``); cached, a step pays none of it.

    ``released_order``: sum columns in the released code's order (see :class:`LinePlan`).

    Example:
        >>> from normopt.specs import ConvSpec
        >>> spec = ConvSpec("c", "c.weight", 1, 1, (3,), (2,), ((1, 1),), (1,), input_size=(8,))
        >>> plan = line_plan(spec, 1)  # columns of a stride-2 conv: taps {0, 2} or {1}
        >>> plan.counts, plan.lines
        (((1, 0, 1), (0, 1, 0)), 2)
    """
    ord = parse_ord(ord)
    if isinstance(spec, BatchNormSpec):
        return LinePlan(spec.name, "rows", (spec.num_features,), batchnorm=True)
    if not isinstance(spec, (LinearSpec, ConvSpec)):
        raise TypeError(f"no operator-norm rule for spec {type(spec).__name__} of layer {getattr(spec, 'name', '?')!r}")
    plan = _conv_plan(spec, line_kind(spec, ord))
    return dataclasses.replace(plan, released_order=True) if released_order else plan


class LineTables(NamedTuple):
    """A plan's tables as tensors on one device.

    Attributes:
        membership: ``K x G`` (transposed) in the accumulation dtype, or None.
        reduce: ``(G or K) x P`` (transposed counts) in the accumulation dtype; None without patterns or with :attr:`read_index`.
        read_index, read_reduce: with :attr:`LinePlan.read`, the taps some line reads (int64) and
            their transposed counts ``(read taps) x P``; else None.
        tap_counts: ``P x K`` in the accumulation dtype: the subgradient's multiplicities.
        positions: per spatial axis, the positions of its patterns (int64).
        released_taps: per pattern, :attr:`LinePlan.released_taps` (int64), or None.
    """

    membership: torch.Tensor | None
    reduce: torch.Tensor | None
    tap_counts: torch.Tensor
    positions: tuple[torch.Tensor, ...]
    released_taps: tuple[torch.Tensor, ...] | None = None
    read_index: torch.Tensor | None = None
    read_reduce: torch.Tensor | None = None


def line_tables(plan: LinePlan, device: torch.device, dtype: torch.dtype) -> LineTables:
    """Build ``plan``'s tables on ``device`` (one small host-to-device copy each; keep the result).

    Example:
        >>> from normopt.specs import LinearSpec
        >>> line_tables(line_plan(LinearSpec("fc", "w", 3, 2), 1), torch.device("cpu"), torch.float32).tap_counts
        tensor([[1.]])
    """
    acc = accumulation_dtype(dtype)

    def tensor(table):
        return None if table is None else torch.tensor(table, dtype=acc, device=device).reshape(len(table), -1).T

    return LineTables(
        membership=tensor(plan.membership),
        reduce=None if plan.read else tensor(plan.counts),  # with unread taps, read_reduce serves
        tap_counts=torch.tensor(plan.tap_counts, dtype=acc, device=device).reshape(plan.patterns, -1),
        positions=tuple(torch.tensor(p, dtype=torch.int64, device=device) for p in plan.positions),
        released_taps=None
        if plan.released_taps is None
        else tuple(torch.tensor(t, dtype=torch.int64, device=device) for t in plan.released_taps),
        read_index=torch.tensor(plan.read, dtype=torch.int64, device=device) if plan.read else None,
        read_reduce=tensor(plan.read_counts),
    )


def _channel_sum(x: torch.Tensor, how: _Reduction, acc: torch.dtype) -> torch.Tensor:
    """Sum non-negative ``x`` (kernel layout) over the channels a line adds up, as ``how`` (a plan's
    :attr:`~LinePlan.reduction`) says: ``(channels, K)`` or ``(channels,)``.

    Rows of output channel o add its input channels; columns of input channel c add the output
    channels of c's group. Works on any memory layout (channels-last included): only the results,
    never ``x``, are reshaped.
    """
    if how.unflatten is not None:
        x = x.unflatten(0, how.unflatten)
    summed = x.sum(how.first, dtype=acc)
    if how.second is not None:
        summed = summed.sum(how.second)
    return summed if how.shape is None else summed.reshape(how.shape)


def functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is running."""
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def forward_ad_active() -> bool:
    """Whether forward-mode AD is on (``torch.func.jvp``/``jacfwd``, or ``forward_ad.dual_level``)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _abs(weight: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``|weight|``, written into ``scratch`` (weight-shaped) when one is given and no gradient is wanted.

    A fresh weight-sized tensor every step costs more than the abs itself on a CPU: the allocator
    hands large blocks back to the system, and every page of the next one faults in again.
    """
    # Whole, not chunk by chunk through a cache-sized part of the scratch (a path removed): with a
    # 32 MB L3 the chunks bought nothing, and their extra operations made the l_inf step of
    # ResNet-18 5.5% slower, caches flushed or not, on one thread or two.
    if scratch is None or torch.compiler.is_compiling() or (weight.requires_grad and torch.is_grad_enabled()):
        return weight.abs()
    return torch.abs(weight, out=scratch)


# Compiled, a row's few patterns are summed each over the whole row, masked by its tap counts:
# inductor vectorises a reduction along the contiguous row, but runs a sum over the input channels
# that keeps the taps apart one output channel and tap at a time. Measured apart on four
# 256x256x3x3 and two 512x512x3x3 kernels (7.1 million weights), rows reading one of four corners
# of the kernel (3x3 kernels on 2x2 maps) took 4.6 ms against 7.5 for the taps kept apart; nine
# patterns took 10.8: each pattern adds a pass over the row, from cache.
MASKED_PATTERNS = 4


def _masked_row_sums(weight: torch.Tensor, counts: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Row sums ``(channels * P,)`` of ``|weight|`` for the ``P x K`` tap ``counts`` (no folding), one
    masked reduction per pattern; a tap that no pattern counts is never added, even if not finite."""
    magnitude, axes = weight.abs().to(acc), tuple(range(1, weight.dim()))
    rows = counts.view(-1, *weight.shape[2:]).unbind(0)
    return torch.stack([torch.where(row > 0, magnitude * row, 0.0).sum(axes) for row in rows], 1).reshape(-1)


def flat_line_sums(weight: torch.Tensor, plan: LinePlan, tables: LineTables, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`line_sums` flattened: line ``j`` is channel ``j // P``, pattern ``j % P``.

    ``scratch``: an optional weight-shaped buffer of the weight's dtype for ``|weight|``.

    Taps that no line reads (:attr:`LinePlan.read`; zero padding, not in the released order) are
    left out of the sums, so a non-finite weight there leaves them finite, as it leaves the
    layer's matrix: the kernel is summed keeping its taps apart and the unread taps' sums dropped.
    Where the rows read a box of taps (:attr:`LinePlan.read_taps`), compiled, the others are not
    even read: inductor sums the box in one loop, where its sum over the channels of a whole
    kernel, keeping the taps apart, measured 7x slower than eager on a 512x512x3x3 kernel. Eager,
    so is a box of one tap (a 3x3 kernel on 1x1 maps: the l_inf decay of torchvision's ResNet-18
    at 32x32 took 10% less time); a larger box is read whole, because an abs of its short strided
    runs measured slower than one of the contiguous kernel. Compiled, other rows of at most
    ``MASKED_PATTERNS`` patterns are not summed with their taps kept apart but pattern by pattern
    over the whole row, each pattern's taps masked (``_masked_row_sums``): unread taps are masked
    out there, not dropped.
    """
    acc = accumulation_dtype(weight.dtype)
    if plan.membership is not None:
        merged = matmul(weight.reshape(-1, plan.taps).to(acc), tables.membership)  # signed sums of the taps on one sample
        x = merged.abs().reshape(*weight.shape[:2], -1)
        return matmul(_channel_sum(x, plan.merged_reduction, acc), tables.reduce).reshape(-1)
    if plan.read_taps is not None and (plan.read_alone or torch.compiler.is_compiling()):
        box = weight[plan.read_taps]
        if scratch is not None:  # contiguous where the library makes it: a view, not a copy
            scratch = scratch.reshape(-1)[: box.numel()].view(box.shape)
        summed = _channel_sum(_abs(box, scratch), plan.read_reduction, acc)
        return summed if plan.read_reduction.shape is None else matmul(summed, tables.read_reduce).reshape(-1)
    keep_taps = plan.counts is not None
    if keep_taps and torch.compiler.is_compiling():
        if plan.kind == "rows" and plan.patterns <= MASKED_PATTERNS and not plan.released_order:
            return _masked_row_sums(weight, tables.tap_counts, acc)
    if not keep_taps:
        return _channel_sum(_abs(weight, scratch), plan.reduction, acc)
    if tables.released_taps is not None:  # each pattern's taps gathered and added as the released code does
        flat = _abs(weight, scratch).reshape(plan.shape[0], plan.shape[1], plan.taps)
        return torch.stack([flat.index_select(2, t).sum((0, 2), dtype=acc) for t in tables.released_taps], 1).reshape(-1)
    summed = _channel_sum(_abs(weight, scratch), plan.reduction, acc)
    if tables.read_index is not None:
        return matmul(summed.index_select(1, tables.read_index), tables.read_reduce).reshape(-1)
    return matmul(summed, tables.reduce).reshape(-1)


def line_sums(weight: torch.Tensor, plan: LinePlan, tables: LineTables) -> torch.Tensor:
    """Absolute sums of every candidate line, ``(channels, P)``, in the accumulation dtype.

    For a conv or linear kernel ``W`` and pattern table ``T`` (``P x K``): rows
    ``S[o, p] = sum_{c, i} |W[o, c, i]| T[p, i]``; columns
    ``S[c, p] = sum_{o in group(c), i} |W[o, c mod C/g, i]| T[p, i]``. With folding padding, the taps of
    a group are added before the absolute value. Differentiable in ``weight``.

    Example:
        >>> from normopt.specs import LinearSpec
        >>> plan = line_plan(LinearSpec("fc", "w", 2, 2), "linf")
        >>> w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        >>> line_sums(w, plan, line_tables(plan, w.device, w.dtype))
        tensor([[3.],
                [7.]])
    """
    return flat_line_sums(weight, plan, tables).reshape(plan.channels, plan.patterns)


def slice_subgradient(slice_weights: torch.Tensor, counts: torch.Tensor, plan: LinePlan, tables: LineTables) -> torch.Tensor:
    """Subgradient of a line on its channel slice: each entry's multiplicity times the sign it enters with.

    ``slice_weights`` is ``(..., M)`` (the slice's entries in :attr:`LinePlan.slice_offsets` order) and
    ``counts`` ``(..., P)``-indexed rows of the pattern table already picked: ``(..., K)`` tap
    multiplicities (no folding) or ``(..., G)`` group multiplicities (folding). Without folding the
    value is ``count(tap) * sign(w)``; with folding, ``sum over groups g of count(g) * sign(sum of g's
    weights)`` for each tap in g.
    """
    taps = plan.taps
    w = slice_weights.unflatten(-1, (-1, taps))  # (..., slice channels, K)
    if plan.membership is None:
        return (torch.sign(w) * counts.unsqueeze(-2).to(w.dtype)).flatten(-2)
    acc = tables.membership.dtype
    merged = matmul(w.to(acc), tables.membership)  # (..., channels, G)
    per_group = torch.sign(merged) * counts.unsqueeze(-2)
    return matmul(per_group, tables.membership.T).to(slice_weights.dtype).flatten(-2)
