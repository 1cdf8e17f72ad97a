"""The decay state in an optimizer's state dict: where it is saved, how a loaded one is checked,
and what the optimizer itself is handed to load.

A weight's decay state is ``h = buffer * scale`` (:mod:`normopt.transform`) and, for large
layers whose slices are rows, the channels of its recent slices (:mod:`normopt.recent_slices`).
Once the optimizer has stepped the weight, it sits in the weight's ``state`` entry under
:data:`DECAY_KEYS`, so the optimizer's own ``state_dict()`` saves it. Before that (no gradient so
far, a frozen layer, state loaded before the first step) it sits beside ``"state"``, under
:data:`PENDING`, by parameter index: an entry holding only decay keys would make an Adam-like
optimizer that loads the checkpoint take it for its own state (``KeyError: 'step'``).

These are pure functions of state dicts (they never change the one they are given):
:class:`normopt.NormDecay`'s state-dict hooks are thin callers of them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from normopt.lines import line_plan
from normopt.recent_slices import DENSE
from normopt.specs import Spec

BUFFER, SCALE, RECENT = "norm_decay_buffer", "norm_decay_scale", "norm_decay_recent"
# The norm whose decay state an entry holds, in the entry itself: an optimizer's own
# load_state_dict keeps its entries but drops the top-level ORDS.
ORD = "norm_decay_ord"
DECAY_KEYS = (BUFFER, SCALE, RECENT, ORD)
PENDING = "norm_decay_pending"
ORDS = "norm_decay_ords"

Entry = tuple  # (buffer, scale or None, recent or None)


def check_group_sizes(state_dict: Mapping, groups: list[dict]) -> None:
    """Refuse, as ``torch.optim.Optimizer.load_state_dict`` does and in its words, saved param groups
    that are not as many, or not as large, as ``groups``: the decay pairs the saved parameters with
    the optimizer's by position before torch looks, and named a layer's buffer instead.

    Example:
        >>> check_group_sizes({"param_groups": [{"params": [0, 1]}]}, [{"params": [torch.zeros(1)]}])
        Traceback (most recent call last):
        ...
        ValueError: loaded state dict contains a parameter group that doesn't match the size of optimizer's group
    """
    saved = state_dict.get("param_groups")
    if saved is None:
        return
    if len(saved) != len(groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")


def saved_entries(state_dict: Mapping, params: list[torch.Tensor], weights: Mapping[str, torch.Tensor]) -> dict:
    """``{layer: (index, the saved state of its weight)}``: each layer of ``weights`` (``{layer:
    weight}``) found by the optimizer's numbering (``params``, its parameters in group order), its
    saved ``state`` entry and its :data:`PENDING` one merged (the decay state is the pending
    one's, all of it: it is the newer).

    Example:
        >>> w = torch.zeros(2, 2)
        >>> saved_entries({"param_groups": [{"params": [7]}], "state": {7: {"step": 1}}}, [w], {"fc": w})
        {'fc': (7, {'step': 1})}
    """
    ids = [i for group in state_dict.get("param_groups", []) for i in group["params"]]
    index_of = {id(p): i for i, p in zip(ids, params)}
    entries = {}
    for name, weight in weights.items():
        index = index_of.get(id(weight))
        # ZeRO hands a rank None for the parameters another rank steps.
        saved = state_dict.get("state", {}).get(index) or {}
        pending = (state_dict.get(PENDING) or {}).get(index)
        if pending:  # the pending entry is the newer decay state: all of it, none of the saved one's
            saved = {**{key: value for key, value in saved.items() if key not in DECAY_KEYS}, **pending}
        entries[name] = (index, saved)
    return entries


def check_recent(recent, name: str, spec: Spec, ord: float) -> None:
    """Refuse a saved ring of recent slices that is not a 1-D tensor of the layer's channels (or a
    ring's markers, -1 and :data:`DENSE`)."""
    channels = line_plan(spec, ord).channels
    ok = isinstance(recent, torch.Tensor) and recent.dim() == 1 and not (recent.is_floating_point() or recent.is_complex())
    if not ok or (recent.numel() and not DENSE <= int(recent.min()) <= int(recent.max()) < channels):
        raise ValueError(f"recent slices of layer {name!r} must be a 1-D integer tensor of channels in [{DENSE}, {channels})")


def check_state_tensor(value, what: str) -> None:
    """Refuse decay state that is not a real floating-point tensor, or not finite: a run keeps ``h``
    finite (a layer with non-finite weights adds no subgradient), so a NaN there is a corrupt
    checkpoint, which would turn the weights NaN at the next step.

    Example:
        >>> check_state_tensor(torch.ones(2, dtype=torch.int64), "decay buffer of layer 'fc'")
        Traceback (most recent call last):
        ...
        TypeError: decay buffer of layer 'fc' must be a real floating-point tensor, got torch.int64
    """
    if not isinstance(value, torch.Tensor) or value.is_complex() or not value.is_floating_point():
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{what} must be a real floating-point tensor, got {got}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} is not finite (NaN or inf): a run keeps it finite, so the checkpoint is corrupt")


def checked_entry(name: str, saved: Mapping, weight: torch.Tensor, spec: Spec, ord: float) -> Entry:
    """``(buffer, scale, recent)`` of layer ``name``'s saved state (each None where absent; recent a
    copy), refused with the layer's name where it does not fit ``weight``, or was saved by a decay
    of another norm (:data:`ORD`; entries of earlier versions have none)."""
    buffer, scale, recent = saved.get(BUFFER), saved.get(SCALE), saved.get(RECENT)
    other = saved.get(ORD)
    if buffer is not None and other is not None and getattr(other, "device", None) != torch.device("meta"):
        try:
            other = float(other)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
            raise ValueError(f"decay state of layer {name!r}: {ORD} must be 1 or inf, got {other!r}") from None
        if other != float(ord):
            _refuse_other_norm(name, other, ord)
    for what, value in (("buffer", buffer), ("scale", scale)):
        if value is not None:
            check_state_tensor(value, f"decay {what} of layer {name!r}")
    if recent is not None:
        check_recent(recent, name, spec, ord)
        recent = recent.detach().clone()
    if buffer is not None and tuple(buffer.shape) != tuple(weight.shape):
        raise ValueError(f"decay buffer of layer {name!r} has shape {tuple(buffer.shape)}, the weight {tuple(weight.shape)}")
    if scale is not None:
        try:
            torch.broadcast_shapes(scale.shape, weight.shape)
        except RuntimeError:
            raise ValueError(
                f"decay scale of layer {name!r} has shape {tuple(scale.shape)}, not one for {tuple(weight.shape)}"
            ) from None
    return buffer, scale, recent


def without_decay_state(state_dict: Mapping, own: set) -> dict:
    """``state_dict`` as the optimizer is to load it: the decay keys of the entries numbered ``own``
    (taken by the decay) removed, and entries left empty dropped; entries of decay keys only of
    other weights (an earlier version's, of a layer not regularized here) moved to :data:`PENDING`,
    where another decay on the optimizer still finds them and the optimizer does not take them
    for its own (``KeyError: 'step'`` half-way through an Adam-like load).

    Example:
        >>> saved = {"state": {0: {"step": 1, BUFFER: 0}, 1: {BUFFER: 0}}, "param_groups": []}
        >>> without_decay_state(saved, own={0})
        {'state': {0: {'step': 1}}, 'param_groups': [], 'norm_decay_pending': {1: {'norm_decay_buffer': 0}}}
    """
    stripped = {**state_dict, "state": {}}
    moved = {}
    for index, entry in state_dict.get("state", {}).items():
        if index in own and isinstance(entry, Mapping):
            entry = {key: value for key, value in entry.items() if key not in DECAY_KEYS}
            if not entry:
                continue
        elif isinstance(entry, Mapping) and entry and set(entry) <= set(DECAY_KEYS):
            moved[index] = entry
            continue
        stripped["state"][index] = entry
    pending = {index: entry for index, entry in (state_dict.get(PENDING) or {}).items() if index not in own}
    pending = {**moved, **pending}
    if pending:
        stripped[PENDING] = pending
    else:
        stripped.pop(PENDING, None)
    return stripped


def compacted(state_dict: Mapping, indices: Iterable) -> Mapping:
    """``state_dict`` with the decay state of the entries numbered ``indices`` as copies, in new
    entries (torch's ``state_dict`` hands out the optimizer's own entry dicts). The optimizer's
    state holds views of one flat buffer per batch of layers, and a plain ``pickle`` writes a
    view's whole buffer once per view (``torch.save`` shares it).

    Example:
        >>> flat = torch.zeros(6)
        >>> saved = compacted({"state": {0: {BUFFER: flat[:2]}}}, [0])
        >>> saved["state"][0][BUFFER].untyped_storage().nbytes()
        8
    """
    saved = state_dict.get("state", {})
    compact = {}
    for i in indices:
        entry = saved.get(i)
        if isinstance(entry, Mapping) and any(isinstance(entry.get(key), torch.Tensor) for key in DECAY_KEYS):
            copies = {key: entry[key].clone() for key in DECAY_KEYS if isinstance(entry.get(key), torch.Tensor)}
            compact[i] = {**entry, **copies}
    return {**state_dict, "state": {**saved, **compact}} if compact else state_dict


def with_pending(state_dict: Mapping, entries: Mapping[int, Entry]) -> Mapping:
    """``state_dict`` with ``entries`` (``{index: (buffer, scale, recent)}``, copied) added under
    :data:`PENDING`, beside what another decay on the optimizer put there; a scale of None is 1.

    Example:
        >>> saved = with_pending({"state": {}}, {3: (torch.ones(2), None, None)})
        >>> sorted(saved[PENDING][3]), float(saved[PENDING][3][SCALE])
        (['norm_decay_buffer', 'norm_decay_scale'], 1.0)
    """
    if not entries:
        return state_dict
    pending = dict(state_dict.get(PENDING) or {})
    for i, (buffer, scale, recent) in entries.items():
        entry = {BUFFER: buffer.clone(), SCALE: (scale if scale is not None else torch.ones(())).clone()}
        if recent is not None:
            entry[RECENT] = recent.clone()
        pending[i] = entry
    return {**state_dict, PENDING: pending}


def with_ords(state_dict: Mapping, indices: Iterable[int], ord: float) -> Mapping:
    """``state_dict`` recording, under :data:`ORDS`, the norm whose decay state the entries numbered
    ``indices`` hold, beside what another decay on the optimizer recorded there.

    Example:
        >>> with_ords({"state": {}}, [0, 2], float("inf"))
        {'state': {}, 'norm_decay_ords': {0: inf, 2: inf}}
    """
    return {**state_dict, ORDS: {**(state_dict.get(ORDS) or {}), **dict.fromkeys(indices, float(ord))}}


def check_ords(state_dict: Mapping, entries: Mapping[str, tuple[int, Mapping]], ord: float) -> None:
    """Refuse decay state saved by a norm decay of another norm (``entries``: :func:`saved_entries`):
    its h is a running sum of that norm's subgradients, which the next steps would go on adding.
    Checkpoints without :data:`ORDS` (earlier versions) are taken as they are.

    Example:
        >>> saved = {"norm_decay_ords": {0: 1.0}}
        >>> check_ords(saved, {"fc": (0, {BUFFER: torch.zeros(1)})}, float("inf"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: the decay state of layer 'fc' was saved by an l1 norm decay, and this one is l_inf: ...
    """
    saved_ords = state_dict.get(ORDS) or {}
    for layer, (index, saved) in entries.items():
        other = saved_ords.get(index)
        if other is not None and saved.get(BUFFER) is not None and float(other) != float(ord):
            _refuse_other_norm(layer, other, ord)


def _refuse_other_norm(layer: str, other: float, ord: float) -> None:
    name = lambda o: "l1" if o == 1 else "l_inf" if o == math.inf else f"ord={o}"
    raise ValueError(
        f"the decay state of layer {layer!r} was saved by an {name(other)} norm decay, and this one is "
        f"{name(ord)}: its h (a running sum of {name(other)} subgradients) would go on being added. Resume "
        f"with ord={'1' if other == 1 else 'math.inf'}, or start h at zero: load the checkpoint without its "
        f"{BUFFER!r}, {SCALE!r}, {RECENT!r} and {ORD!r} entries, {PENDING!r} and {ORDS!r}"
    )


def check_buffers(buffers: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse decay buffers ``{layer: h}`` that do not fit ``weights`` (``{layer: weight}`` of the
    regularized layers), naming the layer."""
    for name, h in buffers.items():
        if name not in weights:
            raise ValueError(f"checkpoint has a decay buffer for layer {name!r}, which is not regularized here")
        check_state_tensor(h, f"decay buffer of layer {name!r}")
        if tuple(h.shape) != tuple(weights[name].shape):
            raise ValueError(
                f"decay buffer of layer {name!r} has shape {tuple(h.shape)}, the weight {tuple(weights[name].shape)}"
            )
