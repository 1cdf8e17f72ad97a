r"""Norm decay as one gradient transformation: an ``init`` and an ``update``, optax-style.

For each regularized layer with weight ``W``, decay buffer ``h`` and subgradient ``p`` of its l1 or
l_inf norm (see :mod:`normopt.decay`), one ``update`` does

* ``rule="paper"`` (Algorithm 1 of Liang & Huang, 2021): :math:`h \leftarrow \gamma h + (1-\gamma) p`,
  :math:`\nabla W \mathrel{+}= (\beta / N) h`, with ``N`` the number of regularized layers
  (``layer_count`` of :func:`norm_decay`: by default those of ``specs``);
* ``rule="reference"`` (the authors' released code): :math:`h \leftarrow \gamma h`, the arg-max
  line of ``h`` set to ``p``, :math:`\nabla W \mathrel{+}= \beta h`. Columns are summed in the
  released code's order (see :class:`normopt.lines.LinePlan`), so that near-ties resolve as there.

Every layer of one device and dtype is computed together (:mod:`normopt.batched`): the number of
operations grows by about three per layer, nothing is read back to the host, and the update
compiles with ``torch.compile(fullgraph=True)``.

**How h is stored.** ``h = buffer * scale``, with ``scale`` one number per channel slice of the
kernel (broadcast against it). Decaying ``h`` by ``gamma`` multiplies the small ``scale`` only; the
slice that holds the arg-max line is rewritten, its scale reset to 1. A step then reads each
buffer once, to add it to the gradient, instead of rewriting it first (the same trick as Bottou's
scaled weight decay). With ``gamma = 0.5`` every scale is a power of two, so the reference rule
gives the released code's numbers bit for bit.

**Which slices are read.** With ``rule="paper"`` a slice not rewritten for ``K`` steps weighs at
most ``max_gamma ** K`` of its value, under half an ulp after ``K = 24`` steps at gamma 0.5 in
float32. Where the slices are rows (the l_inf norm; the l1 norm of a transposed convolution),
large layers therefore add to their gradient only the slices written in their last ``K`` steps
(the terms left out each under half an ulp of the layer's largest entry of ``h``), kept in a ring of channels
(:mod:`normopt.recent_slices`), instead of a dense pass over ``h``; the other layers share one
``torch._foreach_addcmul_``. A step whose gamma exceeds what a batch's ring holds (the largest
gamma whose ``K`` is the ring's length: ``max_gamma``, or a little above it) turns that batch dense
for good (its ring filled with ``DENSE``).

``update`` changes the gradient tensors and the state's buffers in place (as torch.optim's
functional optimizers do) and returns them, so no step allocates a weight-sized tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from normopt.batched import (
    BatchPlan,
    BatchTables,
    all_line_sums,
    argmax_slices,
    batch_plan,
    batch_tables,
    batchnorm_factors,
    padded_line_sums,
    slice_subgradients,
)
from normopt.deterministic import put
from normopt.lines import check_specs, checked, lookup, parse_ord, resolve, weight_shape
from normopt.recent_slices import (
    DENSE,
    RingTables,
    add_recent,
    covered,
    horizon,
    record,
    ring_coefficients,
    ring_layers,
    ring_tables,
)
from normopt.specs import BatchNormSpec, Spec

RULES = ("paper", "reference")


def _layer_views(buffer: torch.Tensor, scale: torch.Tensor, members, plan: BatchPlan) -> dict:
    """``{layer: (its h buffer, its scale)}``: views of one batch's flat buffer and scales."""
    views, b, s = {}, 0, 0
    for name, p, numel, shape in zip(members, plan.plans, plan.numels, plan.scale_shapes):
        size = math.prod(shape)
        views[name] = (buffer[b : b + numel].view(p.shape), scale[s : s + size].view(shape))
        b, s = b + numel, s + size
    return views


# Why a state is refused whose views no longer view its buffers (by pickle and by update).
CUT_VIEWS = (
    "this NormDecayState's views are not views of its buffers: copied leaf by leaf (a pytree tree_map, or each "
    "tensor cloned), the decay would read a stale h; copy it with copy.deepcopy, or torch.save / pickle"
)


def _place(view: torch.Tensor, bases) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """Where ``view`` lies in the one of ``bases`` it views: ``(index, offset, shape, stride)``."""
    index = next((i for i, base in enumerate(bases) if base is not None and view._base is base), None)
    if index is None:
        raise ValueError(CUT_VIEWS)
    return index, view.storage_offset() - bases[index].storage_offset(), tuple(view.shape), tuple(view.stride())


def _check_views(state: NormDecayState, batches) -> None:
    """Refuse a state whose views no longer share its buffers (``batches``: each batch's layers in
    order): an update writes h into the buffers and reads it through the views, so a state copied
    leaf by leaf (``torch.utils._pytree.tree_map``, a NamedTuple being a pytree) decayed with a
    frozen h, silently. One view per batch tells (a copy cuts them all); host metadata only."""
    for members, buffer, scale, ring in zip(batches, state.buffers, state.scales, state.rings):
        own_buffer, own_scale = state.views[members[0]]
        row = next((state.recent[n] for n in members if n in state.recent), None)
        if own_buffer._base is not buffer or own_scale._base is not scale or (row is not None and row._base is not ring):
            raise ValueError(CUT_VIEWS)


def _viewed(bases, place) -> torch.Tensor:
    index, offset, shape, stride = place
    return bases[index].as_strided(shape, stride, bases[index].storage_offset() + offset)


def _rebuilt(buffers, scales, tables, scratch_shapes, views, rings, ring_tables, recent, sparse) -> NormDecayState:
    """A :class:`NormDecayState` from its buffers and the places of its views in them."""
    scratch = []
    for buffer, shapes in zip(buffers, scratch_shapes):
        work = torch.empty(max(math.prod(shape) for shape in shapes), device=buffer.device, dtype=buffer.dtype)
        scratch.append(tuple(work[: math.prod(shape)].view(shape) for shape in shapes))
    return NormDecayState(
        buffers,
        scales,
        tables,
        tuple(scratch),
        {name: (_viewed(buffers, b), _viewed(scales, s)) for name, (b, s) in views.items()},
        rings,
        ring_tables,
        {name: _viewed(rings, row) for name, row in recent.items()},
        sparse,
    )


class NormDecayState(NamedTuple):
    """Decay state of every batch of layers (one per device and dtype).

    Attributes:
        buffers: per batch, the flat decay buffers of its layers.
        scales: per batch, the flat per-slice scales of its layers.
        tables: per batch, its index tables (constant).
        scratch: per batch, weight-shaped work buffers, views of one buffer as large as the largest
            weight (their content is not state).
        views: ``{layer: (buffer, scale)}``: views of ``buffers`` and ``scales``, the buffer shaped
            like the layer's weight and the scale broadcastable against it: ``h = buffer * scale``.
        rings: per batch, the channels written at the last K steps of the layers whose gradient
            is read through a ring (:mod:`normopt.recent_slices`), or None.
        ring_tables: per batch, its ring's constant tables, or None.
        recent: ``{layer: its row of the ring}`` for the layers read through one.
        sparse: per batch, whether its ring is in use (False for good once a step's gamma
            exceeded the one it was sized for).
    """

    buffers: tuple[torch.Tensor, ...]
    scales: tuple[torch.Tensor, ...]
    tables: tuple[BatchTables, ...]
    scratch: tuple[tuple[torch.Tensor, ...], ...]
    views: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rings: tuple[torch.Tensor | None, ...]
    ring_tables: tuple[RingTables | None, ...]
    recent: dict[str, torch.Tensor]
    sparse: tuple[bool, ...]

    def decay_buffer(self, layer: str) -> torch.Tensor:
        """The dense decay buffer ``h`` of ``layer`` (a new tensor)."""
        buffer, scale = self.views[layer]
        return buffer * scale

    def __reduce__(self):
        # The views share their batch's buffers, and an update writes through them: a plain pickle
        # would give each view a copy of its own, which the next update would read stale. They
        # travel as places in the buffers (and the scratch, whose content is not state, as shapes).
        views = {name: (_place(b, self.buffers), _place(s, self.scales)) for name, (b, s) in self.views.items()}
        recent = {name: _place(row, self.rings) for name, row in self.recent.items()}
        scratch = tuple(tuple(tuple(t.shape) for t in batch) for batch in self.scratch)
        args = (self.buffers, self.scales, self.tables, scratch, views, self.rings, self.ring_tables, recent, self.sparse)
        return _rebuilt, args


class NormDecayTransform(NamedTuple):
    """Norm decay as a pair of functions (see :func:`norm_decay`).

    Attributes:
        init: ``init(tensors) -> NormDecayState``: zero buffers, and the index tables on the weights' device.
        update: ``update(grads, state, tensors, *, beta, gamma, check=True) -> (grads, state, norms)``.
        layers: the regularized layers' names, in order.
        load: ``load(state, layer, buffer, scale=None, recent=None) -> state``: set one layer's
            decay state (from a checkpoint); without ``recent``, or with one of another length, its
            ring is rebuilt from ``h``; a ring marked ``DENSE`` keeps the layer's batch dense.
    """

    init: Callable[[Mapping[str, torch.Tensor]], NormDecayState]
    update: Callable[..., tuple[Mapping[str, torch.Tensor | None], NormDecayState, dict[str, torch.Tensor]]]
    layers: tuple[str, ...]
    load: Callable[..., NormDecayState]


def _decayed(spec: Spec) -> None:
    if isinstance(spec, BatchNormSpec) and spec.weight is None:
        raise ValueError(f"layer {spec.name!r}: batch norm without affine weights has nothing to regularize")


BETA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor_beta(beta: torch.Tensor, where: str, device: torch.device | None = None) -> torch.Tensor:
    """Refuse a tensor beta that a step could not use as it is: not 0-d, not of a float dtype of
    :data:`BETA_DTYPES`, requiring grad, on the meta device, or on neither the CPU nor ``device``
    (a CPU scalar multiplies accelerator tensors without a copy). Its value is not read."""
    if beta.dim() != 0 or beta.dtype not in BETA_DTYPES:
        got = f"{beta.dtype} {tuple(beta.shape)}"
        raise TypeError(f"{where} as a tensor must be 0-d and of dtype float16/bfloat16/float32/float64, got {got}")
    if beta.requires_grad:
        raise TypeError(f"{where} as a tensor must not require grad (norm decay is not differentiated through beta)")
    if beta.device.type == "meta" or not (beta.device.type == "cpu" or device is None or beta.device == device):
        raise ValueError(f"{where} is a tensor on {beta.device}: put it on the CPU or on the weights' device ({device})")
    return beta


def plain_number(value):
    """A NumPy scalar (a ``numbers.Real`` that is no Python number) as a float; anything else as it is.

    The checks below then refuse bools, tensors and non-numbers alike, whatever array library
    the value came from.
    """
    if not isinstance(value, (int, float)) and isinstance(value, numbers.Real):
        return float(value)
    return value


def _where(what: str, name) -> str:
    return what if name is None else f"{what} of layer {name!r}"


def _per_layer(value, names, what: str, device_of=None, interval=(-math.inf, math.inf)) -> list:
    """``value`` (a number, or ``{layer: number}``) per layer, as floats, each refused unless in
    ``interval`` (closed; the default: finite); with ``device_of`` (layer name -> its weight's
    device), 0-d floating-point tensors are kept as they are (never read back to the host)."""
    low, high = interval

    def one(v, name):
        if isinstance(v, torch.Tensor):
            if device_of is None:
                raise TypeError(f"{_where(what, name)} must be a number, not a tensor")
            return check_tensor_beta(v, _where(what, name), device_of(name))
        v = plain_number(v)
        # Comparisons, not math.isfinite: they refuse NaN too, and a float that dynamo made
        # symbolic goes through them without a graph break.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low <= v <= high and -math.inf < v < math.inf):
            within = "" if interval == (-math.inf, math.inf) else f" in [{low}, {high}]"
            raise ValueError(f"{_where(what, name)} must be a finite number{within}, got {v!r}")
        return float(v)

    if isinstance(value, Mapping):
        missing = [n for n in names if n not in value]
        if missing:
            raise KeyError(f"{what} has no value for layers {missing}")
        if torch.compiler.is_compiling():  # each checked: id() of an input makes dynamo guard on the
            # object itself, and a dict of the same values built anew recompiled at every call
            return [one(value[n], n) for n in names]
        # Each number once: a param group's value is one object for all its layers.
        known: dict[int, float] = {}
        out = []
        for n in names:
            v = value[n]
            if isinstance(v, torch.Tensor):
                out.append(one(v, n))
            else:
                if id(v) not in known:
                    known[id(v)] = one(v, n)
                out.append(known[id(v)])
        return out
    if isinstance(value, torch.Tensor):
        return [one(value, n) for n in names]
    return [one(value, None)] * len(names)


def _common(values: list):
    """The value every entry of ``values`` holds (equal numbers, or one and the same tensor), else None."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return first if all(v is first for v in values) else None
    return first if all(not isinstance(v, torch.Tensor) and v == first for v in values) else None


def _times(tensors: list[torch.Tensor], values: list) -> list[torch.Tensor]:
    """``tensors[i] * values[i]``, in the tensors' dtype: one foreach operation where the values are
    numbers, or one 0-d tensor on the tensors' device; else a product each (a CPU scalar beside
    accelerator tensors, which foreach operations refuse)."""
    first = values[0]
    if not any(isinstance(v, torch.Tensor) for v in values):
        return list(torch._foreach_mul(tensors, values))
    if all(v is first for v in values) and first.device == tensors[0].device:
        return list(torch._foreach_mul(tensors, first))
    return [t * v for t, v in zip(tensors, values)]


def _layout_of(state: NormDecayState) -> tuple:
    """What tells the layout a state was made for: its layers in order (which fixes where each sits
    in its batch's buffers), the shapes of their buffer and scale views, and which batches have
    rings. Buffer sizes alone let a state of another transformation over the same layers (in
    another order, or for the other norm) be taken, each layer then decayed with another's h.
    Shapes only, no storage offsets: dynamo traces those."""
    views = tuple((name, tuple(buffer.shape), tuple(scale.shape)) for name, (buffer, scale) in state.views.items())
    return views, tuple(ring is None for ring in state.rings)


def _check_step(members, weights, grads, plan: BatchPlan, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, by layer, a weight that is not what ``init`` made the state for, and a gradient
    that does not fit its weight (its dtype may differ: float32 gradients of bfloat16 weights);
    host-side metadata only, no value is read."""
    for name, weight, grad, p in zip(members, weights, grads, plan.plans):
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"layer {name!r}: its weight is a {type(weight).__name__}, not a tensor")
        if weight.dtype is not dtype or weight.shape != p.shape or weight.device != device:
            raise ValueError(
                f"layer {name!r}: weight of shape {tuple(weight.shape)}, {weight.dtype} on {weight.device}; the state was "
                f"made for {p.shape}, {dtype} on {device} (call init again for new weights)"
            )
        if grad is not None and (grad.shape != weight.shape or grad.device != device or not grad.is_floating_point()):
            raise ValueError(
                f"layer {name!r}: gradient of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device}, for a weight of "
                f"shape {tuple(weight.shape)} on {weight.device}"
            )


def norm_decay(
    specs: Mapping[str, Spec],
    *,
    ord=1,
    rule: str = "paper",
    max_gamma: float = 0.5,
    sparse: bool = True,
    layer_count: int | None = None,
) -> NormDecayTransform:
    r"""Norm decay of the layers in ``specs`` as an ``(init, update)`` pair.

    Args:
        specs: ``{layer name: spec}`` of the layers to regularize (conv, linear, affine batch norm).
        ord: ``1``/``"l1"`` or ``float("inf")``/``"linf"``.
        rule: ``"paper"`` or ``"reference"`` (see the module docstring).
        max_gamma: with ``rule="paper"``, the largest gamma the rings of recent slices are sized for
            (:mod:`normopt.recent_slices`); a step with a gamma above what a ring of that length
            holds (``normopt.recent_slices.covered``) adds ``h`` densely, and so do all later steps.
        sparse: False adds ``h`` to the gradients in dense passes only.
        layer_count: with ``rule="paper"``, the ``N`` of ``beta / N``: ``len(specs)`` by default; more
            where layers regularized at other times share the beta (:class:`normopt.NormDecay`
            counts its frozen layers, so that freezing one leaves the others' decay as it is).

    ``update(grads, state, tensors, *, beta, gamma)`` takes ``grads`` keyed like ``tensors`` (or
    without a DDP or compiled model's prefix; a missing or None gradient is left alone), ``tensors``
    holding every weight (and batch norm's running variance) as ``init`` saw them (shape, dtype,
    device; ``check=False`` skips that check, about a microsecond per layer, for a caller that
    watches its weights itself), and ``beta``/``gamma`` as numbers or ``{layer: number}``: beta finite (a negative one
    grows the norms, as a maximizing optimizer needs), gamma in [0, 1]. ``beta``, or its values,
    may also be 0-d floating-point tensors: a compiled ``update`` then takes them as inputs and does
    not recompile when their values change. It runs under ``torch.no_grad``. It adds the decay to
    the gradients and updates the state, both in place, and returns ``(grads, state, norms)`` with
    ``norms`` the layers' norms as 0-d tensors (NaN or inf for a layer with non-finite weights,
    which then contributes no new subgradient).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import normopt
        >>> model = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        >>> decay = norm_decay(normopt.layer_specs(model), ord="linf", rule="reference")
        >>> state = decay.init(model.state_dict())
        >>> grads = {"weight": torch.zeros(2, 2)}
        >>> grads, state, norms = decay.update(grads, state, model.state_dict(), beta=0.1, gamma=0.5)
        >>> norms[""], grads["weight"]  # row 1 (|3| + |4|) attains the norm: beta * sign there
        (tensor(7.), tensor([[0.0000, 0.0000],
                [0.1000, 0.1000]]))
    """
    ord = parse_ord(ord)
    if ord not in (1, math.inf):
        raise ValueError(f"norm decay supports ord 1 ('l1') and inf ('linf'), not {ord!r}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {list(RULES)}")
    check_specs(specs)
    if not specs:
        raise ValueError("no layer to regularize: specs is empty")
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be True or False, got {sparse!r}")
    if layer_count is None:
        layer_count = len(specs)
    if isinstance(layer_count, numbers.Integral) and not isinstance(layer_count, bool):
        layer_count = int(layer_count)
    if not (isinstance(layer_count, int) and not isinstance(layer_count, bool) and layer_count >= len(specs)):
        raise ValueError(f"layer_count must be an int of at least the {len(specs)} layers of specs, got {layer_count!r}")
    if isinstance(max_gamma, bool) or not isinstance(max_gamma, (int, float)) or not 0 <= max_gamma <= 1:
        raise ValueError(f"max_gamma must be a number in [0, 1], got {max_gamma!r}")
    for spec in specs.values():
        _decayed(spec)
    names = tuple(specs)
    # (layer names in batch order, plan, ring length) per device and dtype, fixed by init from the weights it gets.
    layout: list[tuple[tuple[str, ...], BatchPlan, int | None]] = []
    # per batch, the largest gamma its ring holds every slice for (a larger one turns it dense)
    limits: list[float] = []
    made: list[tuple] = [()]  # the _layout_of the state the last init made, to know it again

    def init(tensors: Mapping[str, torch.Tensor]) -> NormDecayState:
        by_batch: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name, spec in specs.items():
            weight = checked(tensors, spec.weight, spec, weight_shape(spec))
            if weight.is_complex() or not weight.is_floating_point():
                raise TypeError(f"layer {name!r}: norm decay needs real floating-point weights, not {weight.dtype}")
            if weight.numel() == 0:
                raise ValueError(f"layer {name!r} has an empty weight {tuple(weight.shape)}: it has no norm to regularize")
            by_batch.setdefault((weight.device, weight.dtype), []).append(name)
        layout.clear()
        limits.clear()
        buffers, scales, tables, scratch, views = [], [], [], [], {}
        rings, all_ring_tables, recent, sparse_batches = [], [], {}, []
        for (device, dtype), members in by_batch.items():
            order, plan = batch_plan(tuple(specs[n] for n in members), ord, rule == "reference")
            members = tuple(members[i] for i in order)
            length = horizon(max_gamma, dtype) if rule == "paper" and sparse else None
            # A gamma too large for any ring makes the batch dense from the start; its rings are
            # kept all the same, marked DENSE, so that a checkpoint says so, as it does of a batch
            # that turned dense later (a run resumed at a smaller gamma went sparse).
            dense = rule == "paper" and sparse and length is None
            if dense:
                length = horizon(0.5, dtype)
            chosen = ring_layers(plan, length) if length is not None else ()
            layout.append((members, plan, length))
            limits.append(covered(length, dtype) if chosen else max_gamma)
            tables.append(batch_tables(plan, device, dtype))
            buffer = torch.zeros(sum(plan.numels), device=device, dtype=dtype)
            scale = torch.ones(sum(math.prod(s) for s in plan.scale_shapes), device=device, dtype=dtype)
            views.update(_layer_views(buffer, scale, members, plan))
            buffers.append(buffer)
            scales.append(scale)
            work = torch.empty(plan.max_numel, device=device, dtype=dtype)
            scratch.append(tuple(work[: math.prod(p.shape)].view(p.shape) for p in plan.plans))
            if chosen:
                ring = torch.full((len(chosen), length), DENSE if dense else -1, dtype=torch.int64, device=device)
                recent.update({members[i]: row for i, row in zip(chosen, ring.unbind(0))})
                rings.append(ring)
                all_ring_tables.append(ring_tables(plan, chosen, length, device))
            else:
                rings.append(None)
                all_ring_tables.append(None)
            sparse_batches.append(bool(chosen) and not dense)
        state = NormDecayState(
            tuple(buffers),
            tuple(scales),
            tuple(tables),
            tuple(scratch),
            {n: views[n] for n in names},
            tuple(rings),
            tuple(all_ring_tables),
            recent,
            tuple(sparse_batches),
        )
        made[0] = _layout_of(state)
        return state

    def update(grads, state: NormDecayState, tensors, *, beta, gamma, check: bool = True):
        # Under no_grad whatever the caller's mode, as torch.optim's steps: weights that require
        # grad (model.named_parameters()) would otherwise chain every step's buffers into one
        # autograd graph, and a compiled update with fullgraph=True would fail. (Entered only when
        # needed: an optimizer's step is under no_grad already.)
        if torch.is_grad_enabled():
            with torch.no_grad():
                return _update(grads, state, tensors, beta=beta, gamma=gamma, check=check)
        return _update(grads, state, tensors, beta=beta, gamma=gamma, check=check)

    def _update(grads, state: NormDecayState, tensors, *, beta, gamma, check: bool):
        if not layout:
            raise RuntimeError("norm_decay: call init before update")
        for what, given in (("grads", grads), ("tensors", tensors)):
            if not isinstance(given, Mapping):
                raise TypeError(f"norm_decay.update: {what} must be a mapping {{name: tensor}}, got {type(given).__name__}")
        if (
            len(state.buffers) != len(layout)
            or any(b.numel() != sum(plan.numels) for b, (_, plan, _) in zip(state.buffers, layout))
            or (check and _layout_of(state) != made[0])
        ):
            raise ValueError("norm_decay: this state was not made by this transformation's init (or not by its last one)")
        if check and not torch.compiler.is_compiling():  # compiled, the views are rebuilt from the buffers
            _check_views(state, [members for members, _, _ in layout])
        # The key each weight has in ``tensors`` (a DDP or compiled model's prefix included): its
        # gradient has the same one in ``grads``.
        keys = {n: resolve(tensors, specs[n].weight, specs[n]) for n in names}
        # Every batch's weights and gradients, all checked before any is changed: a refusal in a
        # later batch (another dtype or device) left the earlier ones decayed.
        batch_weights, batch_grads = [], []
        for (members, plan, _), buffer in zip(layout, state.buffers):
            weights = [tensors[keys[n]] for n in members]
            # Keyed like ``tensors``, or without the wrapper's prefix.
            layer_grads = [grads.get(keys[n]) for n in members]
            if any(keys[n] != specs[n].weight for n in members):
                layer_grads = [g if g is not None else grads.get(specs[n].weight) for g, n in zip(layer_grads, members)]
            if check:
                _check_step(members, weights, layer_grads, plan, buffer.device, buffer.dtype)  # init made it so
            batch_weights.append(weights)
            batch_grads.append(layer_grads)
        betas = dict(zip(names, _per_layer(beta, names, "beta", lambda n: tensors[keys[n]].device)))
        gammas = dict(zip(names, _per_layer(gamma, names, "gamma", interval=(0, 1))))
        count = layer_count if rule == "paper" else 1  # the paper's beta is shared among the layers
        # beta / count once per beta (a tensor beta shared by the layers stays one tensor, so that
        # its layers keep sharing one operation below).
        divided: list[tuple[object, object]] = []
        strengths = {}
        for n in names:
            b = betas[n]
            if isinstance(b, torch.Tensor):
                known = [s for obj, s in divided if obj is b]
                if not known:  # divided in float32 at least, as a float beta is
                    known = [b.to(torch.promote_types(b.dtype, torch.float32)) / count if count != 1 else b]
                    divided.append((b, known[0]))
                strengths[n] = known[0]
            else:
                strengths[n] = b / count
        norms: dict[str, torch.Tensor] = {}
        all_views = state.views
        if torch.compiler.is_compiling():
            # Views carved inside the graph: the state's own views would enter it as inputs aliasing
            # the buffers they are mutated through, which AOTAutograd turns into a copy of every
            # buffer and a copy back (two passes over all weights per step on ResNet-18).
            all_views = {}
            for (members, plan, _), buffer, scale in zip(layout, state.buffers, state.scales):
                all_views.update(_layer_views(buffer, scale, members, plan))
        sparse_now = list(state.sparse)
        for batch, ((members, plan, _), buffer, scale, tables, scratch) in enumerate(
            zip(layout, state.buffers, state.scales, state.tables, state.scratch)
        ):
            member_specs = [specs[n] for n in members]
            weights, layer_grads = batch_weights[batch], batch_grads[batch]
            bn = [lookup(tensors, s.running_var, s) for s in member_specs if isinstance(s, BatchNormSpec)]
            factors = batchnorm_factors(bn, tables) if bn else None
            lines = all_line_sums(weights, factors, plan, tables, scratch)
            found = argmax_slices(padded_line_sums(lines, plan, tables), tables)
            values, counts = slice_subgradients(weights, found, factors, plan, tables)
            decays = [gammas[n] for n in members]
            # Compared, never hashed: compiled, a gamma that changed is a symbol, and a set of
            # symbols fixed their values (a recompile at every new gamma).
            shared = _common(decays)
            if shared is not None:  # h <- gamma h, on the scales only
                scale.mul_(shared)
            else:
                torch._foreach_mul_([all_views[n][1] for n in members], decays)
            current = buffer.take(found.buffer) * scale.take(found.scales)  # h on the arg-max slices
            finite = torch.isfinite(found.norms).index_select(0, tables.entry_layer)
            if rule == "paper":
                step = torch.where(finite, values, 0.0)
                if shared is not None:
                    step = step * (1 - shared)
                else:
                    blend = [1 - gammas[n] for n in members]
                    sizes = [p.slice_size for p in plan.plans]
                    step = torch.cat(torch._foreach_mul(step.split(sizes), blend))
                new = current + step
            else:
                new = torch.where((counts > 0) & finite, values, current)
            put(buffer, found.buffer, new)
            put(scale, found.scales, tables.ones)
            ring, ring_table = state.rings[batch], state.ring_tables[batch]
            if sparse_now[batch] and max(decays) > limits[batch]:  # the ring no longer holds every slice that counts
                sparse_now[batch] = False
                ring.fill_(DENSE)  # so that a checkpoint says so too
            through_ring = ring_table.layers if sparse_now[batch] else ()
            if through_ring:
                record(ring, found.channel, ring_table)
            dense = [i for i in range(len(members)) if i not in through_ring]
            have = [i for i in dense if layer_grads[i] is not None]
            if have:
                layer_scales = [all_views[members[i]][1] for i in have]
                values_of = [strengths[members[i]] for i in have]
                value = _common(values_of)
                if not isinstance(value, float):  # a tensor beta's scaled scales are rounded to
                    # their dtype before the product: with reduced-precision weights, one rounding
                    # more than a float beta's
                    layer_scales, value = _times(layer_scales, values_of), 1.0
                buffers = [all_views[members[i]][0] for i in have]
                torch._foreach_addcmul_([layer_grads[i] for i in have], buffers, layer_scales, value=value)
            if through_ring and any(layer_grads[i] is not None for i in through_ring):
                coefficients = ring_coefficients(ring, scale, ring_table)
                values_of = [strengths[members[i]] for i in through_ring]
                common = _common(values_of)
                if common is not None:
                    coefficients = coefficients * common
                else:
                    coefficients = torch.stack(_times(coefficients.unbind(0), values_of))
                ring_grads = [layer_grads[i] for i in through_ring]
                ring_buffers = [all_views[members[i]][0] for i in through_ring]
                add_recent(ring_grads, ring_buffers, ring, coefficients, ring_table)
            norms.update(zip(members, found.norms.unbind(0)))
        if sparse_now != list(state.sparse):
            state = state._replace(sparse=tuple(sparse_now))
        return grads, state, {n: norms[n] for n in names}

    @torch.no_grad()
    def load(state: NormDecayState, layer: str, buffer: torch.Tensor, scale=None, recent=None) -> NormDecayState:
        if layer not in state.views:
            raise KeyError(f"norm_decay.load: no layer {layer!r} here; the layers are {list(names)}")
        own_buffer, own_scale = state.views[layer]
        for what, given, own in (("buffer", buffer, own_buffer), ("scale", scale, own_scale)):
            if given is None and what == "scale":
                continue
            if not isinstance(given, torch.Tensor) or given.is_complex() or not given.is_floating_point():
                raise TypeError(f"layer {layer!r}: the decay {what} must be a real floating-point tensor, got {given!r:.60}")
            if given.shape != own.shape:
                # h itself (scale=None) for a scale of another layout
                raise ValueError(f"layer {layer!r}: decay {what} of shape {tuple(given.shape)}, expected {tuple(own.shape)}")
            # In the state's dtype: a float64 1e300 became inf in a float32 state.
            if not bool(torch.isfinite(given.to(own.dtype)).all()):
                raise ValueError(f"layer {layer!r}: the decay {what} has values that are not finite in {own.dtype}")
        own_buffer.copy_(buffer)
        own_scale.copy_(scale if scale is not None else torch.ones_like(own_scale))
        own_ring = state.recent.get(layer)
        if own_ring is None:
            return state
        batch = next(i for i, (members, _, _) in enumerate(layout) if layer in members)
        if not state.sparse[batch]:  # dense already: stays so (dense adds every slice, whatever the ring says)
            return state
        # A ring of another length was kept for another dtype or gamma: a longer one may hold
        # slices that still count, a shorter one may miss some; h itself tells which count. A
        # ring marked dense stays so, whatever its length, so that a run resumes bit for bit.
        if recent is None or (recent.numel() != own_ring.numel() and not bool((recent == DENSE).any())):
            recent = _recent_from_h(state.decay_buffer(layer), layer)
        if recent is None or bool((recent == DENSE).any()):  # more slices count than a ring holds
            state.rings[batch].fill_(DENSE)
            return state._replace(sparse=tuple(False if i == batch else f for i, f in enumerate(state.sparse)))
        recent = recent.to(own_ring)
        own_ring.fill_(-1)
        own_ring[own_ring.numel() - recent.numel() :] = recent
        return state

    def _recent_from_h(h: torch.Tensor, layer: str) -> torch.Tensor | None:
        """The ring of a layer whose ``h`` came without one: its slices that count, oldest (smallest) first."""
        _, _, length = next(entry for entry in layout if layer in entry[0])
        largest = h.abs().flatten(1).amax(1)  # of each row
        # A slice counts while its weight exceeds max_gamma ** length of the largest.
        counted = torch.nonzero(largest > largest.max() * max_gamma**length).flatten()
        if counted.numel() > length:
            return None
        return counted[torch.argsort(largest[counted], stable=True)]

    return NormDecayTransform(init, update, names, load)
