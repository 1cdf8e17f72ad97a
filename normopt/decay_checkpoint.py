"""How :class:`normopt.NormDecay` keeps its state where torch keeps optimizer state, and carries it
through the optimizer's own ``state_dict()`` and ``load_state_dict()`` (its hooks there).

The pure part, what a state dict holds and how a loaded one is checked, is
:mod:`normopt.decay_state_dict`; this is the part that reads and writes the decay's own
attributes: :class:`CheckpointHooks`, a base of :class:`normopt.NormDecay`. Its methods use what
NormDecay keeps: the optimizer, the layers (``decayed``, ``specs``, ``ord``, ``_weight``,
``_frozen_decayed()``), the pending and live state (``_pending``, ``_held_back``, ``_state``,
``_transform``, ``_recorder``; ``_loaded_decay`` and ``_hyper_before_load``, this class's own, set
up by NormDecay's constructor) and how NormDecay chooses and lays them out (``add_params()``,
``_selection_changed()``, ``_lay_out()``, ``_write()``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from normopt.decay_options import BETA, GAMMA, check_group
from normopt.decay_state_dict import (
    BUFFER,
    DECAY_KEYS,
    ORD,
    RECENT,
    SCALE,
    check_buffers,
    check_group_sizes,
    check_ords,
    checked_entry,
    compacted,
    saved_entries,
    with_ords,
    with_pending,
    without_decay_state,
)
from normopt.lines import line_plan

try:
    from torch.distributed.optim import ZeroRedundancyOptimizer as ZERO
except ImportError:  # torch built without distributed
    ZERO = ()


def put_decay_state(entry: dict, buffer: torch.Tensor, scale: torch.Tensor, recent: torch.Tensor | None, ord: float) -> None:
    """Write a weight's decay state, of the norm ``ord``, into its ``optimizer.state`` entry; without
    a ring, take out one an earlier selection left there (a layout that reads the layer densely)."""
    # A 0-d tensor, as every other value of the entry: code that walks an optimizer's state moving
    # or comparing its tensors (and torch's own load, which casts them) takes it as it takes those.
    entry[BUFFER], entry[SCALE], entry[ORD] = buffer, scale, buffer.new_tensor(float(ord))
    if recent is not None:
        entry[RECENT] = recent
    else:
        entry.pop(RECENT, None)


def drop_decay_state(homes, weights) -> None:
    """Take the decay keys out of the state entries of ``weights`` in each of ``homes`` (an
    optimizer's state mappings); entries left empty go."""
    for weight in weights:
        for home in homes:
            entry = home.get(weight)
            if isinstance(entry, dict):
                for key in DECAY_KEYS:
                    entry.pop(key, None)
                if not entry:
                    del home[weight]


class CheckpointHooks:
    """The decay state's homes in the optimizer (ZeRO's local state included), and the hooks on its
    ``state_dict()`` and ``load_state_dict()``: check a load before the optimizer takes any of it,
    adopt it after, save what ``optimizer.state`` does not hold."""

    def _home(self, weight: torch.Tensor, zero_local: tuple[dict, set[int]] | None) -> dict:
        """The state mapping that keeps ``weight``'s decay state: ZeRO's local one for the weights
        this rank steps (``zero_local``, from :meth:`_zero_local`), else the optimizer's."""
        return zero_local[0] if zero_local is not None and id(weight) in zero_local[1] else self.optimizer.state

    def _zero_local(self) -> tuple[dict, set[int]] | None:
        """For ZeRO, its local optimizer's state and the ids of the weights this rank steps: the
        decay state of those lives there (ZeRO's consolidated checkpoint takes every entry from
        the rank that steps it, and only from its local state); None for any other optimizer."""
        if not isinstance(self.optimizer, ZERO):
            return None
        local = self.optimizer.optim
        return local.state, {id(p) for group in local.param_groups for p in group["params"]}

    def _check_loaded(self, optimizer, state_dict):
        """Before the optimizer loads anything: refuse decay state that does not fit, naming the
        layer, and take this decay's keys out of what the optimizer loads (an entry holding only
        them, of a weight not stepped yet, would make Adam-like optimizers take it for their own)."""
        if self._selection_changed():  # since the last step: choose the layers as that step will
            self.add_params()
        for i, group in enumerate(state_dict.get("param_groups", [])):
            check_group(group, f"param group {i} of the checkpoint")
        check_group_sizes(state_dict, self.optimizer.param_groups)
        # Each group's beta and gamma now: a checkpoint of a plain optimizer has none, and torch
        # replaces the groups with the saved ones (it fills in its own missing options alike).
        self._hyper_before_load = [(group.get(BETA), group.get(GAMMA)) for group in optimizer.param_groups]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        ours = {name: self._weight[name] for name in (*self.decayed, *self._frozen_decayed())}
        entries = saved_entries(state_dict, params, ours)
        check_ords(state_dict, entries, self.ord)
        self._loaded_decay = {
            name: checked_entry(name, saved, self._weight[name], self.specs[name], self.ord)
            for name, (_, saved) in entries.items()
        }
        # Another decay on the optimizer keeps its keys; never the caller's checkpoint changed.
        return without_decay_state(state_dict, own={index for index, _ in entries.values()})

    def _adopt_loaded(self, optimizer) -> None:
        """After the optimizer loaded a state dict: take its decay state (zero h where it had none)."""
        loaded, self._loaded_decay = self._loaded_decay, {}
        for group, (beta, gamma) in zip(optimizer.param_groups, self._hyper_before_load):
            group.setdefault(BETA, beta if beta is not None else optimizer.defaults.get(BETA))
            group.setdefault(GAMMA, gamma if gamma is not None else optimizer.defaults.get(GAMMA))
        zero_local = self._zero_local()
        if zero_local is not None:  # ZeRO copied its entries into the local optimizer before any hook ran
            drop_decay_state([zero_local[0]], [self._weight[name] for name in loaded])
        # As a load before the first step: the next step lays the state out anew from what was
        # loaded. Copied into the live layout, a checkpoint's rings of another length, or a batch
        # of it that was sparse where the live one had turned dense, would resume otherwise than
        # the run that wrote it (a rollback after a gamma spike; torch.distributed.checkpoint's
        # load, which steps first).
        had_state = self._state is not None
        self._transform = self._state = None
        self._take(loaded, zero_fill=True)
        if not had_state:
            return  # the first step lays it out; until then _save_pending saves it
        # A checkpoint taken before the next step (by a trainer at its resume step, or through
        # torch.distributed.checkpoint or ZeRO, which read "state" only) carries it in the state
        # entries, as before the load: laid out now, or, while convolutions wait for the input
        # sizes that the next forward records (the next step describes them anew, and would drop
        # the checkpoint's rings with a layout made now), as loaded.
        if self.decayed and (self._recorder is None or not self._recorder.watching) and not self._selection_changed():
            self._lay_out()
            joined = {name: (*views, self._state.recent.get(name)) for name, views in self._state.views.items()}
        else:
            ones = lambda scale, like: scale if scale is not None else torch.ones((), dtype=like.dtype, device=like.device)
            joined = {name: (buffer, ones(scale, buffer), recent) for name, (buffer, scale, recent) in self._pending.items()}
        zero_local = self._zero_local()
        for name, (buffer, scale, recent) in joined.items():
            saved = self._home(self._weight[name], zero_local).get(self._weight[name])
            if saved:  # the optimizer's own state of the weight came back: the decay's joins it
                put_decay_state(saved, buffer, scale, recent, self.ord)

    def _take(self, loaded: Mapping[str, tuple], zero_fill: bool) -> None:
        """Make ``loaded`` (``{layer: (buffer, scale, recent)}``, checked) the decay state that the next
        step lays out: copies on each weight's device and dtype; with ``zero_fill``, a zero h for
        the regularized layers it lacks (a load replaces all of it)."""
        if zero_fill:
            self._held_back, self._pending = {}, {}
        for name in (*self._frozen_decayed(), *self.decayed):
            weight = self._weight[name]
            as_weight = lambda t, weight=weight: None if t is None else t.detach().to(weight.device, weight.dtype, copy=True)
            buffer, scale, recent = loaded.get(name, (None, None, None))
            if name in self.decayed and (buffer is not None or zero_fill):
                buffer = as_weight(buffer) if buffer is not None else torch.zeros_like(weight)
                self._pending[name] = (buffer, as_weight(scale), recent)
            elif name not in self.decayed and buffer is not None:
                self._held_back[name] = (as_weight(buffer), as_weight(scale), recent)

    def _state_present(self) -> dict[str, tuple]:
        """The decay state that the optimizer holds already for this decay's layers, checked: it
        loaded a checkpoint of a regularized run (its own ``load_state_dict``, or a copy of a
        hooked optimizer) before this decay was made. Taken as a load after it would be, where the
        first step would otherwise start h at zero and write over it."""
        zero_local = self._zero_local()
        present = {}
        for name in (*self._frozen_decayed(), *self.decayed):
            weight = self._weight[name]
            entry = self._home(weight, zero_local).get(weight)
            if isinstance(entry, Mapping) and entry.get(BUFFER) is not None:
                recent = entry.get(RECENT)
                if isinstance(recent, torch.Tensor) and recent.is_floating_point():
                    # The optimizer's own load cast the ring to the weight's dtype: its channels
                    # are exact there up to 2 / eps (2 ** 24 in float32, 256 in bfloat16); else h
                    # rebuilds it.
                    exact = line_plan(self.specs[name], self.ord).channels <= 2 / torch.finfo(recent.dtype).eps
                    entry = {key: value for key, value in entry.items() if key != RECENT}
                    if exact and bool((recent == recent.round()).all()):
                        entry[RECENT] = recent.to(torch.int64)
                present[name] = checked_entry(name, entry, weight, self.specs[name], self.ord)
        return present

    def _settle_adopted(self, adopted: Mapping[str, tuple]) -> None:
        """Leave the state adopted at construction in the optimizer's entries as it was checked: a
        ring that torch's load cast to a float dtype back to channel numbers (or out, where h
        rebuilds it), so that a checkpoint taken before the first step, of ``"state"`` alone too
        (``torch.distributed.checkpoint``), saves what the decay resumes from."""
        zero_local = self._zero_local()
        for name, (_, _, recent) in adopted.items():
            entry = self._home(self._weight[name], zero_local).get(self._weight[name])
            if recent is None:
                entry.pop(RECENT, None)
            else:
                entry[RECENT] = recent.clone()

    def _save_pending(self, optimizer, state_dict):
        """Put into the state dict the decay state that is not in ``optimizer.state`` (under
        :data:`~normopt.decay_state_dict.PENDING`): loaded before the first step, of frozen layers,
        or of weights the optimizer has not stepped yet (no gradient so far, or none since the
        layers were chosen anew), whose h moves all the same; and the decay state inside ``state``
        as compact copies (:func:`~normopt.decay_state_dict.compacted`)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        state_dict = compacted(state_dict, [index[id(w)] for w in self._weight.values() if id(w) in index])
        unsaved = {}
        if self._state is not None:
            zero_local = self._zero_local()
            for name, (buffer, scale) in self._state.views.items():
                weight = self._weight[name]
                # Where after_step keeps it (under ZeRO every rank has every layer's h, and the same gradients).
                entry = self._home(weight, zero_local).get(weight)
                if entry is None or entry.get(BUFFER) is not buffer:
                    unsaved[name] = (buffer, scale, self._state.recent.get(name))
        entries = {**self._held_back, **self._pending, **unsaved}
        state_dict = with_ords(state_dict, [index[id(w)] for w in self._weight.values() if id(w) in index], self.ord)
        return with_pending(
            state_dict, {index[id(self._weight[n])]: e for n, e in entries.items() if id(self._weight[n]) in index}
        )

    def check_buffers(self, buffers: Mapping[str, torch.Tensor]) -> None:
        """Refuse decay buffers ``{layer: h}`` that do not fit this model, naming the layer."""
        check_buffers(buffers, {name: self._weight[name] for name in self.decayed})

    def load_buffers(self, buffers: Mapping[str, torch.Tensor]) -> None:
        """Set decay buffers ``{layer: h}`` (e.g. from a checkpoint written before the state moved into
        the optimizer); every buffer is checked before any is set."""
        self.check_buffers(buffers)
        for name, h in buffers.items():
            h = h.detach().to(device=self._weight[name].device, dtype=self._weight[name].dtype)
            if self._state is None:
                self._pending[name] = (h.clone(), None, None)
            else:
                self._write(name, h, None)
