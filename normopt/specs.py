"""Plain, immutable descriptions of the linear pieces of a network.

A spec holds everything the norm functions need to know about a layer except its weights: kind,
geometry, input size and the keys of its tensors in a ``{name: tensor}`` mapping such as
``model.state_dict()``. Specs are frozen dataclasses, so they hash, compare and pickle, and a
geometry computed for one is cached for all equal ones.

An unknown input size (``input_size=None``) means the *large-input limit*: the supremum of the
norm over all large inputs, attained by interior positions (and, for circular, reflect and
replicate padding with stride > 1, by the edge positions of inputs of every size modulo the
stride). For zero padding it is an upper bound of the norm at every input size.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from normopt.geometry import PADDING_MODES, AxisGeometry


@dataclass(frozen=True)
class LinearSpec:
    """A fully connected layer ``y = W x``, ``W`` of shape ``(out_features, in_features)``."""

    name: str
    weight: str
    in_features: int
    out_features: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)


@dataclass(frozen=True)
class ConvSpec:
    """A convolution or transposed convolution with any number of spatial axes.

    Attributes:
        name: module name, used in error messages.
        weight: key of the kernel in the tensor mapping.
        in_channels, out_channels, groups: as in ``torch.nn.Conv2d``.
        kernel_size, stride, dilation: one int per spatial axis.
        padding: ``(left, right)`` per spatial axis, resolved from ints, tuples, ``'same'`` and
            ``'valid'``.
        padding_mode: ``'zeros'``, ``'circular'``, ``'reflect'`` or ``'replicate'``.
        input_size: spatial size of the input, or None for the large-input limit.
        transposed: True for ``ConvTranspose*``, whose kernel is ``(in, out/groups, *k)``.
        output_padding: per axis, for transposed convolutions.
    """

    name: str
    weight: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    input_size: tuple[int, ...] | None = None
    transposed: bool = False
    output_padding: tuple[int, ...] = field(default=())

    def __post_init__(self):
        n = len(self.kernel_size)
        # ``is not None``: an empty size (the shape[2:] of a 2-d tensor) is refused, not read as unknown.
        for attr in ("stride", "padding", "dilation") + (("input_size",) if self.input_size is not None else ()):
            if len(getattr(self, attr)) != n:
                raise ValueError(f"layer {self.name!r}: {attr} has {len(getattr(self, attr))} axes, kernel has {n}")
        if self.transposed and len(self.output_padding) != n:
            raise ValueError(f"layer {self.name!r}: output_padding has {len(self.output_padding)} axes, kernel has {n}")
        # What torch refuses to build is refused here too, by name: a hand-built spec otherwise
        # failed deep in the line sums (a division by a zero stride or groups), or gave a number
        # for a layer that cannot exist (dilation 0, negative padding).
        _check_ints(self, "in_channels", (self.in_channels,), 0)
        _check_ints(self, "out_channels", (self.out_channels,), 0)
        _check_ints(self, "groups", (self.groups,), 1)
        for attr in ("kernel_size", "stride", "dilation"):
            _check_ints(self, attr, getattr(self, attr), 1)
        _check_ints(self, "padding", [p for pads in self.padding for p in _pair(self, pads)], 0)
        _check_ints(self, "output_padding", self.output_padding, 0)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"layer {self.name!r}: groups={self.groups} does not divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        if not self.transposed and any(self.output_padding):
            raise ValueError(f"layer {self.name!r}: output_padding {self.output_padding} is for transposed convolutions only")
        for j, (extra, s, d) in enumerate(zip(self.output_padding, self.stride, self.dilation)):
            if extra >= max(s, d):  # torch's own rule
                raise ValueError(
                    f"layer {self.name!r}: output_padding {extra} on axis {j} must be smaller than stride {s} or dilation {d}"
                )
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(f"layer {self.name!r}: unknown padding_mode {self.padding_mode!r}")
        if self.transposed and self.padding_mode != "zeros":
            raise ValueError(f"layer {self.name!r}: transposed convolutions only support zero padding")
        if self.input_size is not None:
            for j, axis in enumerate(axis_geometries(self, self.input_size)):
                _check_axis(self, j, axis)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        lead = (
            (self.in_channels, self.out_channels // self.groups)
            if self.transposed
            else (self.out_channels, self.in_channels // self.groups)
        )
        return lead + tuple(self.kernel_size)

    @property
    def output_size(self) -> tuple[int, ...] | None:
        """Spatial size of the output, or None when the input size is unknown."""
        if self.input_size is None:
            return None
        axes = axis_geometries(self, self.input_size)
        return tuple(axis.size if self.transposed else axis.out_size for axis in axes)


@dataclass(frozen=True)
class BatchNormSpec:
    """Batch norm in eval mode: the diagonal map ``x_c -> gamma_c x_c / sqrt(running_var_c + eps)``.

    ``weight`` is None when the layer has no affine parameters (then ``gamma = 1``).
    """

    name: str
    weight: str | None
    running_var: str
    num_features: int
    eps: float


Spec = LinearSpec | ConvSpec | BatchNormSpec


def _axis(spec: ConvSpec, j: int, n: int) -> AxisGeometry:
    s, (pl, pr), d, k = spec.stride[j], spec.padding[j], spec.dilation[j], spec.kernel_size[j]
    if spec.transposed:
        # The adjoint runs from the transposed layer's output back to its n inputs.
        size, out_size = (n - 1) * s - pl - pr + d * (k - 1) + spec.output_padding[j] + 1, n
    else:
        size, out_size = n, (n + pl + pr - d * (k - 1) - 1) // s + 1
    return AxisGeometry(size, out_size, k, s, pl, d, spec.padding_mode)


def axis_geometries(spec: ConvSpec, input_size: tuple[int, ...]) -> tuple[AxisGeometry, ...]:
    """Per-axis geometry of the convolution whose matrix norms are those of ``spec``.

    For a transposed convolution this is its adjoint: the convolution with the same kernel from
    the transposed layer's output (size ``(n-1)s - 2p + d(k-1) + output_padding + 1``) back to its
    input, with output positions cut to the transposed layer's input size ``n``.
    """
    return tuple(_axis(spec, j, n) for j, n in enumerate(input_size))


def _check_ints(spec: ConvSpec, attr: str, values, minimum: int) -> None:
    """Refuse, naming the layer and ``attr``, values that are not ints of at least ``minimum``."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            given = getattr(spec, attr)
            what = "hold ints" if isinstance(given, (tuple, list)) else "be an int"
            raise ValueError(f"layer {spec.name!r}: {attr} must {what} of at least {minimum}, got {given!r}")


def _pair(spec: ConvSpec, pads) -> tuple:
    """One axis' ``(left, right)`` padding, refused by name if it is not a pair."""
    if not isinstance(pads, (tuple, list)) or len(pads) != 2:
        raise ValueError(f"layer {spec.name!r}: padding must be one (left, right) pair per axis, got {spec.padding!r}")
    return tuple(pads)


def _check_axis(spec: ConvSpec, j: int, axis: AxisGeometry) -> None:
    if axis.size < 1 or axis.out_size < 1:
        raise ValueError(
            f"layer {spec.name!r}: input size {spec.input_size} is too small for kernel {spec.kernel_size} "
            f"(stride {spec.stride}, dilation {spec.dilation}, padding {spec.padding}): the output would be empty"
        )
    pad = max(spec.padding[j])
    if spec.padding_mode == "reflect" and pad >= axis.size:
        raise ValueError(f"layer {spec.name!r}: reflect padding {pad} needs an input larger than {axis.size} on axis {j}")
    if spec.padding_mode == "circular" and pad > axis.size:
        raise ValueError(f"layer {spec.name!r}: circular padding {pad} needs an input of at least {pad} on axis {j}")


def large_input_geometries(spec: ConvSpec) -> tuple[tuple[AxisGeometry, ...], ...]:
    """Per axis, the geometries whose pooled patterns give the large-input limit.

    Far from the edges every position looks the same; near them, the patterns repeat with period
    ``stride`` in the input size. Sizes ``n0 .. n0 + stride - 1`` with ``n0`` several kernel reaches
    and paddings long therefore show every pattern any large input has, and no others.
    """
    per_axis = []
    for j, k in enumerate(spec.kernel_size):
        s, (pl, pr), d = spec.stride[j], spec.padding[j], spec.dilation[j]
        n0 = 3 * (pl + pr + d * (k - 1) + 2 * s) + 1
        per_axis.append(tuple(_axis(spec, j, n0 + r) for r in range(s)))
    return tuple(per_axis)


def check_weight_shape(weight, spec: LinearSpec | ConvSpec) -> None:
    """Refuse, naming the layer, a weight whose shape is not its spec's (another layer's weight)."""
    if tuple(weight.shape) != tuple(spec.weight_shape):
        raise ValueError(f"layer {spec.name!r}: weight of shape {tuple(weight.shape)}, its spec's is {tuple(spec.weight_shape)}")


def pads_with_copies(spec: ConvSpec) -> bool:
    """Whether the layer pads its input with copies of its values (circular, reflect, replicate)."""
    return spec.padding_mode != "zeros" and any(p for pads in spec.padding for p in pads)


def kernel_reach(kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...]:
    """Input samples one output sample spans, per axis: ``d (k - 1) + 1``.

    Example:
        >>> kernel_reach((3, 3), (1, 2))
        (3, 5)
    """
    return tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel_size))


def padding_pairs(module: nn.modules.conv._ConvNd) -> tuple[tuple[int, int], ...]:
    if module.padding == "valid":
        return tuple((0, 0) for _ in module.kernel_size)
    if module.padding == "same":
        # Same split as torch: the odd extra sample goes to the right.
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in module.padding)


def _whole_sizes(input_size, name: str) -> tuple[int, ...]:
    """``input_size`` as a tuple of whole numbers (a float is refused, not truncated), or a clear
    error naming the layer; :class:`ConvSpec` checks their number."""
    sizes = tuple(input_size) if isinstance(input_size, Iterable) and not isinstance(input_size, (str, bytes)) else None
    if sizes is None or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sizes):
        raise TypeError(f"layer {name!r}: input_size must be a tuple of whole numbers, one per spatial axis, got {input_size!r}")
    return tuple(int(n) for n in sizes)


def conv_spec(module: nn.modules.conv._ConvNd, name: str, weight: str, input_size=None, output_padding=None) -> ConvSpec:
    """Spec of a ``Conv*d`` or ``ConvTranspose*d`` module (``output_padding``: the one its calls used,
    for a transposed convolution called with ``output_size=``; default the module's own).

    Example:
        >>> from torch import nn
        >>> spec = conv_spec(nn.Conv2d(3, 8, 3, stride=2, padding="valid"), "c", "c.weight", (9, 9))
        >>> spec.padding, spec.output_size
        (((0, 0), (0, 0)), (4, 4))
    """
    return ConvSpec(
        name=name,
        weight=weight,
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=tuple(module.kernel_size),
        stride=tuple(module.stride),
        padding=padding_pairs(module),
        dilation=tuple(module.dilation),
        groups=module.groups,
        padding_mode=module.padding_mode,
        input_size=None if input_size is None else _whole_sizes(input_size, name),
        transposed=module.transposed,
        output_padding=tuple(output_padding or module.output_padding) if module.transposed else (),
    )
