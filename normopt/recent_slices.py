r"""The norm-decay gradient read from the recently written slices of ``h`` only.

With ``rule="paper"`` a layer's decay buffer ``h`` is a sum of arg-max slices of past steps, the
slice written ``a`` steps ago weighted by the product of the ``a`` gammas since (the slices of
one layer's channels are disjoint). With every gamma at most ``max_gamma``, a slice not written
for ``K`` steps weighs at most ``max_gamma ** K``; :func:`horizon` picks the smallest ``K`` that
puts this under half an ulp of the dtype (``2 ** -24`` for float32: ``K = 24`` at gamma 0.5). So
instead of a dense pass ``grad += beta / N * h`` over every weight, which costs a read of the
buffer and a read and a write of the gradient, each step adds ``h`` over the distinct slices
written in its last ``K`` steps only: one ``index_select``, one product and one ``index_add_``
per layer, over ``K`` slices (24 of the 512 rows of a 512x512x3x3 kernel). The terms left out
are each below ``2 ** -(p + 1)`` times the layer's largest entry of ``h`` (``p`` the dtype's
mantissa bits).

A ring per batch of layers, ``(layers, K)``, holds the channels written at the last ``K`` steps,
oldest first (``-1``: none yet); a channel written twice counts once, at its newest place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from normopt.batched import BatchPlan

# A layer reads its gradient through the ring only where K slices are an eighth of its weights or
# fewer (gathering and scattering cost about eight times a dense pass per entry on a CPU: 0.20 ms
# for 24 rows of a 512x512x3x3 kernel, 0.51 ms for the dense pass over all of it, 2 threads), and
# where it has at least RING_MIN_WEIGHTS: below, the three operations' fixed costs exceed the
# dense pass, which all small layers share (one foreach operation).
RING_SHARE = 8
RING_MIN_WEIGHTS = 1 << 18
RING_MAX_LENGTH = 256  # each step compares the K places of a ring pairwise
DENSE = -2  # the value a ring is filled with once its batch adds h densely


def horizon(max_gamma: float, dtype: torch.dtype) -> int | None:
    """The ring length ``K``: the fewest steps after which ``max_gamma ** K`` is at most half an
    ulp, ``finfo(dtype).eps / 2``; None where it would exceed ``RING_MAX_LENGTH`` (``max_gamma``
    above about 0.937 in float32, 1 included).

    Example:
        >>> horizon(0.5, torch.float32), horizon(0.5, torch.float64), horizon(0.0, torch.float32)
        (24, 53, 1)
    """
    if max_gamma >= 1:
        return None
    if max_gamma <= 0:
        return 1
    length = max(1, math.ceil(math.log(torch.finfo(dtype).eps / 2) / math.log(max_gamma)))
    return length if length <= RING_MAX_LENGTH else None


def covered(length: int, dtype: torch.dtype) -> float:
    """The largest gamma for which a ring of ``length`` holds every slice that counts: the largest
    ``g`` with ``horizon(g, dtype) <= length`` (so ``horizon(covered(K, dtype), dtype) == K``).

    Example:
        >>> covered(24, torch.float32), horizon(covered(75, torch.float32), torch.float32)
        (0.5, 75)
    """
    if not 0 < length <= RING_MAX_LENGTH:
        raise ValueError(f"a ring's length must be in [1, {RING_MAX_LENGTH}], got {length}")
    gamma = (torch.finfo(dtype).eps / 2) ** (1 / length)
    fits = lambda g: (horizon(g, dtype) or math.inf) <= length
    while not fits(gamma):  # the power rounds: a few ulps either way
        gamma = math.nextafter(gamma, 0.0)
    while fits(math.nextafter(gamma, 1.0)):
        gamma = math.nextafter(gamma, 1.0)
    return gamma


def ring_layers(plan: BatchPlan, length: int) -> tuple[int, ...]:
    """Positions, in ``plan``, of the layers whose decay gradient is read through a ring of ``length``.

    Rows (output channels, contiguous slices: l_inf norms, and l1 norms of transposed
    convolutions) of layers with at least
    ``RING_MIN_WEIGHTS`` weights, of which ``length`` slices are at most a ``1 / RING_SHARE``;
    batch norms are never worth it. Columns are not: an input channel's slice is strided, and
    gathering and scattering ``K`` of them measured as slow as the dense pass (0.68 ms each on a
    512x512x3x3 kernel, 2 threads; rows 0.20 ms against 0.51).
    """
    chosen = []
    for position, (p, numel) in enumerate(zip(plan.plans, plan.numels)):
        if not p.batchnorm and p.kind == "rows" and RING_MIN_WEIGHTS <= numel >= RING_SHARE * length * p.slice_size:
            chosen.append(position)
    return tuple(chosen)


class RingTables(NamedTuple):
    """Constant tables of one batch's ring (built once by :func:`ring_tables`)."""

    layers: tuple[int, ...]  # positions in the batch of the layers read through the ring
    positions: torch.Tensor  # (R,) the same positions, as a tensor
    scale_start: torch.Tensor  # (R, 1) each layer's start in the batch's flat scale buffer
    scale_stride: torch.Tensor  # (R, 1) scale entries between consecutive channels' slices
    newer: torch.Tensor  # (K, K) bool: place j is newer than place k


def ring_tables(plan: BatchPlan, layers: tuple[int, ...], length: int, device: torch.device) -> RingTables:
    """The tables of a ring of ``length`` over ``layers`` of ``plan``, on ``device``."""
    starts, start = [], 0
    for shape in plan.scale_shapes:
        starts.append(start)
        start += math.prod(shape)
    ints = lambda values: torch.tensor(values, dtype=torch.int64, device=device)
    places = torch.arange(length, device=device)
    return RingTables(
        layers=layers,
        positions=ints(list(layers)),
        # The scales of a slice's entries are equal (written and decayed together): read its first.
        scale_start=ints([starts[i] for i in layers]).unsqueeze(1),
        scale_stride=ints([plan.scale_slice(plan.plans[i])[1] for i in layers]).unsqueeze(1),
        newer=places.unsqueeze(0) > places.unsqueeze(1),
    )


def record(ring: torch.Tensor, channel: torch.Tensor, tables: RingTables) -> None:
    """Shift the ring by one step, in place, and put each layer's newly written ``channel`` last."""
    ring.copy_(torch.cat([ring[:, 1:], channel.index_select(0, tables.positions).unsqueeze(1)], 1))


def ring_coefficients(ring: torch.Tensor, scale: torch.Tensor, tables: RingTables) -> torch.Tensor:
    """``(R, K)``: the scale of the slice at each place of the ring, 0 at empty places and at all but
    the newest place of a channel written twice (so that no slice is added twice)."""
    repeated = ((ring.unsqueeze(2) == ring.unsqueeze(1)) & tables.newer).any(2)
    slices = ring.clamp_min(0)
    scales = scale.take(tables.scale_start + slices * tables.scale_stride)
    return torch.where((ring >= 0) & ~repeated, scales, 0.0)


def _add_rows(grad: torch.Tensor, channels: torch.Tensor, buffer: torch.Tensor, weights: torch.Tensor) -> None:
    """``grad[channels] += weights * buffer[channels]``, adding where ``channels`` repeats; in the
    gradient's dtype, which may differ from the buffer's (float32 gradients of bfloat16 weights)."""
    rows = buffer.index_select(0, channels) * weights.view(-1, *[1] * (buffer.dim() - 1))
    grad.index_add_(0, channels, rows.to(grad.dtype))


# Compiled, the same operation as an opaque operator: inductor lowers ``index_add_`` to an atomic
# add per element, which took 3.7 ms per step for the ring layers of torchvision's ResNet-18 (0.9
# eager, CPU; on a GPU, unmeasured); called as a custom operator, the compiled step runs torch's
# own kernel, without a graph break. The schema is spelled out: torch 2.4 cannot read this module's
# string annotations. A second import of this module (a reload) keeps the first registration.
if not hasattr(torch.library, "custom_op"):  # torch < 2.4: inductor's lowering, slower, same result
    _compiled_add_rows = _add_rows
elif hasattr(torch.ops.normopt, "add_recent_rows"):
    _compiled_add_rows = torch.ops.normopt.add_recent_rows
else:
    _compiled_add_rows = torch.library.custom_op(
        "normopt::add_recent_rows",
        mutates_args=("grad",),
        schema="(Tensor(a!) grad, Tensor channels, Tensor buffer, Tensor weights) -> ()",
    )(_add_rows)
    _compiled_add_rows.register_fake(lambda grad, channels, buffer, weights: None)


def add_recent(grads, buffers, ring: torch.Tensor, coefficients: torch.Tensor, tables: RingTables) -> None:
    """``grad += coefficient * buffer`` on the ring's rows of each layer (in place).

    ``grads`` and ``buffers`` hold one tensor per ring layer (a None gradient is left alone); the
    coefficients are :func:`ring_coefficients` times each layer's strength.
    """
    add = _compiled_add_rows if torch.compiler.is_compiling() else _add_rows
    rows = zip(ring.clamp_min(0).unbind(0), coefficients.unbind(0))
    for grad, buffer, (channels, weights) in zip(grads, buffers, rows):
        if grad is not None:
            add(grad, channels, buffer, weights)
