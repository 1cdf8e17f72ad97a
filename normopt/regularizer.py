"""NormDecay: norm decay of one model around one optimizer's steps, the shell of :func:`normopt.norm_decay`.

:class:`normopt.NormDecayOptimizer` wraps an optimizer around it; :func:`attach_norm_decay` hooks
it onto an optimizer that cannot be replaced (ZeRO, Accelerate, fused optimizers). Everything it
computes is a pure function (:mod:`normopt.transform`, :mod:`normopt.projection`); this class
finds the layers, keeps the decay state where torch keeps optimizer state, and reads ``beta`` and
``gamma`` from the param groups:

* ``optimizer.state[weight]["norm_decay_buffer"]`` and ``["norm_decay_scale"]``: the layer's decay
  buffer ``h = buffer * scale`` (see :mod:`normopt.transform`), and ``["norm_decay_recent"]``,
  the channels of its last slices written (large layers whose slices are rows: l_inf norms, l1 of
  transposed convolutions; :mod:`normopt.recent_slices`), and ``["norm_decay_ord"]``, the norm
  they belong to, so the optimizer's own ``state_dict()`` saves them and ``load_state_dict()``
  restores them: all or nothing through :class:`~normopt.NormDecayOptimizer`, whose
  ``load_state_dict`` puts everything back where the inner optimizer refuses a checkpoint half-way;
  with hooks alone (:func:`attach_norm_decay`) as atomic as the optimizer's own load (torch's is
  not: a refusal of one entry, Adam's missing ``"step"``, leaves the groups and the entries before
  it loaded; the decay keeps its state from before the load, and a good checkpoint loaded then
  resumes). The state
  of a weight the optimizer has not stepped yet (no gradient so far, frozen, loaded before the
  first step) is not in ``optimizer.state``, where Adam-like optimizers would take it for theirs:
  ``state_dict()`` saves it under a key of its own, ``"norm_decay_pending"`` (by parameter index),
  and, under ``"norm_decay_ords"``, each layer's norm: decay state of the other norm is refused
  (through the optimizer's own load too, which keeps the entries' ``"norm_decay_ord"``);
* ``group["norm_decay_beta"]`` and ``group["norm_decay_gamma"]``: set like ``weight_decay``,
  changeable between steps by hand or by a scheduler, per group.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from normopt.decay_checkpoint import ZERO, CheckpointHooks, drop_decay_state, put_decay_state
from normopt.decay_options import (
    BETA,
    BN_PROJECTIONS,
    GAMMA,
    KINDS,
    check_beta,
    check_cap,
    check_gamma,
    check_group,
    refuse_sharded,
    scaled_betas,
    signed_beta,
)
from normopt.decay_state_dict import BUFFER, DECAY_KEYS
from normopt.discovery import (
    UNRECORDED_HINT,
    InputSizeRecorder,
    LayerSpecs,
    layer_specs,
    module_names,
    quiet_overriding,
    unwrap,
    user_stacklevel,
    warn_overriding,
)
from normopt.layer_choice import choose_layers
from normopt.lines import parse_ord
from normopt.nonfinite import NonFiniteReporter
from normopt.projection import project_batchnorm, project_batchnorm_argmax, project_layer, tap_tables
from normopt.recent_slices import DENSE, RING_MAX_LENGTH, covered, horizon
from normopt.replicas import first_rank_copies, replica_group
from normopt.specs import BatchNormSpec, ConvSpec
from normopt.transform import RULES, NormDecayState, NormDecayTransform, norm_decay

# Each optimizer's decays whose hooks are on it, to refuse a second decay of one weight.
_DECAYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Each optimizer's {(param group index, or None for its defaults), key} of the norm_decay_beta and
# norm_decay_gamma that its decays wrote (not the user): the last decay detached takes them out.
_INSERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_NonFiniteReporter = NonFiniteReporter  # its name before it had a module: optimizers pickled whole then still load


class NormDecay(CheckpointHooks):
    r"""Norm decay of ``model``'s layers around ``optimizer``'s steps.

    :meth:`before_step` adds to each regularized weight's gradient the decayed subgradient of the
    layer's l1 or l_inf norm; :meth:`after_step` keeps the decay state in ``optimizer.state`` and
    applies the optional caps. :class:`normopt.NormDecayOptimizer` and :func:`attach_norm_decay`
    call them; see the former for the options. A frozen weight (``requires_grad=False``) is left
    alone: its layer is not chosen (at construction with ``example_input``, else at the first
    step, and at ``add_param_group``), and freezing or unfreezing a weight chooses the layers anew
    at the next step. A frozen layer keeps its ``h`` (from the run, or from a checkpoint, which
    carries it) unchanged until it is unfrozen. A step compiled with ``torch.compile`` does not
    see ``requires_grad`` change (dynamo does not guard it there): after freezing or unfreezing
    layers, call :meth:`add_params` once.

    Attributes:
        specs: every linear piece of the model (input sizes recorded from the first forward when no
            ``example_input`` was given).
        decayed: ``{layer: spec}`` of the regularized layers.
        skipped: ``{module: reason}`` for the layers left alone.
        last_norms: ``{layer: norm}`` from the last step, of the weights it started from (before
            its update and any cap), 0-d tensors (no host sync).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> decay = NormDecay(optimizer, model, beta=0.1)
        >>> model(torch.randn(4, 1, 3, 3)).sum().backward()
        >>> decay.before_step()
        >>> sorted(decay.last_norms), optimizer.param_groups[0]["norm_decay_beta"]
        (['0', '2'], 0.1)
    """

    _detached = False  # set by detach(): the steps of a wrapper around it are plain ones from then on
    _warned_unrecorded = False  # set once a step has warned that no forward recorded the conv input sizes
    _overriding_warned: frozenset = frozenset()  # (layer, class) pairs named in an OverriddenForwardWarning
    _agreed: dict = {}  # noqa: RUF012  replaced, never changed in place: this step's running variances under DDP
    _replicas = None  # a DDP model's (normopt.replicas), set at construction (unset in copies of earlier versions)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        ord=1,
        beta: float | torch.Tensor = 1e-3,
        gamma: float = 0.5,
        rule: str = "paper",
        layers: Iterable[str] = ("conv", "linear"),
        exclude: Iterable[str] = (),
        max_norm: float | None = None,
        bn_max_norm: float | None = None,
        bn_projection: str = "exact",
        example_input=None,
    ):
        self.ord = parse_ord(ord)
        if self.ord not in (1, math.inf):
            raise ValueError(f"norm decay supports ord 1 ('l1') and inf ('linf'), not {ord!r}")
        beta, gamma = check_beta(beta), check_gamma(gamma)
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {list(RULES)}")
        if isinstance(layers, str):
            layers = (layers,)
        if not isinstance(layers, Iterable):
            raise TypeError(f"layers must be an iterable of layer kinds (some of {sorted(KINDS)}), got {layers!r}")
        layers = tuple(layers)
        unknown = [kind for kind in layers if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown layer kinds {unknown}; expected some of {sorted(KINDS)}")
        check_cap("max_norm", max_norm)
        check_cap("bn_max_norm", bn_max_norm)
        if bn_projection not in BN_PROJECTIONS:
            raise ValueError(f"unknown bn_projection {bn_projection!r}; expected one of {list(BN_PROJECTIONS)}")
        self.model, self._replicas = unwrap(model), replica_group(model)
        refuse_sharded(self.model)
        if isinstance(optimizer, ZERO) and getattr(optimizer, "_overlap_with_ddp", False):
            raise ValueError(
                "ZeroRedundancyOptimizer(overlap_with_ddp=True) steps inside DDP's communication hook, where no "
                "optimizer step hook runs: norm decay cannot join it (use overlap_with_ddp=False)"
            )
        self.exclude = module_names(exclude, "exclude", self.model)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not held & {id(p) for p in self.model.parameters()}:
            raise ValueError("the optimizer holds none of the model's parameters: pass model.parameters() to it")
        self.optimizer = optimizer
        self.rule, self.kinds, self.layers = rule, tuple(KINDS[k] for k in layers), layers
        self.max_norm, self.bn_max_norm, self.bn_projection = max_norm, bn_max_norm, bn_projection
        with quiet_overriding():
            self._select(layer_specs(self.model, example_input))
        self._refuse_shared()
        if not self.decayed and not self.bn_projected:
            kinds = "/".join(layers) or "(no kinds: layers=())"
            raise ValueError(
                f"no layer to regularize: none of the model's {kinds} layers has a trainable weight in "
                f"the optimizer (skipped modules: {self.skipped}; excluded: {sorted(self.exclude)})"
            )
        self._refuse_other_hyperparameters(beta, gamma)
        present = self._state_present()  # checked before anything changes
        inserted = _INSERTED.setdefault(self._registry_key(), set())
        for i, options in (*enumerate(optimizer.param_groups), (None, optimizer.defaults)):
            for key, value in ((BETA, beta), (GAMMA, gamma)):
                if key not in options:  # a value the user set in a group stays: its per-group override
                    options[key] = value
                    inserted.add((i, key))
        self.last_norms: dict[str, torch.Tensor] = {}
        self._transform: NormDecayTransform | None = None
        self._state: NormDecayState | None = None
        # {layer: (buffer, scale, recent)} loaded before the state exists
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        # {layer: (buffer, scale, recent)} of frozen layers, kept until they are chosen again
        self._held_back: dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        # {layer: (buffer, scale, recent)} of the state dict being loaded, taken out of it by the
        # pre-hook before torch casts it (its cast to a bfloat16 or float16 weight's dtype would
        # round the ring's channels)
        self._loaded_decay: dict[str, tuple] = {}
        self._hyper_before_load: list[tuple] = []  # each group's (beta, gamma) before a load
        self._take(present, zero_fill=False)
        self._reporter = NonFiniteReporter()
        self._handles = self._hook_optimizer()
        self._settle_adopted(present)
        # Hooks go on the user's model only once nothing can fail any more.
        self._recorder = None if example_input is not None else InputSizeRecorder(self.model)

    def __getstate__(self) -> dict:
        # The transformation's functions are closures, which pickle refuses and copy.deepcopy
        # shares (a copy choosing its layers anew would rebuild the original's layout). A copy
        # carries the decay state as a checkpoint loaded before the first step does, and its next
        # step builds the transformation anew from it, as a resumed run does: bit for bit.
        state = self.__dict__.copy()
        if self._state is not None:
            state["_pending"] = self._carried()
            state["_transform"] = state["_state"] = None
        return state

    def _carried(self) -> dict[str, tuple]:
        """``{layer: (buffer, scale, ring)}`` of the live decay state, as a copy or a checkpoint
        carries it: views, as optimizer.state holds them (torch.save and deepcopy keep one copy of
        their flat buffer), and not their product h, which rounds unless gamma is a power of two."""
        views, recent = self._state.views, self._state.recent
        return {name: (buffer, scale, recent.get(name)) for name, (buffer, scale) in views.items()}

    def _hook_optimizer(self) -> list:
        """Register the checkpoint hooks on the optimizer (load: check, then adopt the decay state;
        save: add the decay state that is not in ``optimizer.state``) and return their handles. Called at
        construction, and again by a copy of :class:`~normopt.NormDecayOptimizer`, whose inner
        optimizer torch copies without hooks."""
        _DECAYS.setdefault(self._registry_key(), weakref.WeakSet()).add(self)
        return [
            self.optimizer.register_load_state_dict_pre_hook(self._check_loaded),
            self.optimizer.register_load_state_dict_post_hook(self._adopt_loaded),
            self.optimizer.register_state_dict_post_hook(self._save_pending),
        ]

    def _registry_key(self) -> torch.optim.Optimizer:
        """The optimizer whose state this decay writes: a NormDecayOptimizer's inner one (a decay
        attached to a wrapper writes there too)."""
        return self.optimizer.optimizer if isinstance(getattr(self.optimizer, "norm_decay", None), NormDecay) else self.optimizer

    def _others(self) -> list[NormDecay]:
        """The other decays whose hooks are on the same optimizer."""
        return [decay for decay in _DECAYS.get(self._registry_key(), ()) if decay is not self]

    def _refuse_shared(self) -> None:
        """Refuse layers that another decay on the optimizer regularizes already (``_select`` set
        them aside): the state of a weight has one place for decay state, so checkpoints would
        hold one decay's h only."""
        if self._shared:
            other = next(d for d in self._others() if any(id(w) in d._decayed_weights() for w in self._shared.values()))
            raise ValueError(
                f"layers {list(self._shared)} have a norm decay on this optimizer already (ord {other.ord}, rule "
                f"{other.rule!r}): a weight keeps one decay state, so a checkpoint would hold only one of them; "
                f"detach that decay first (its detach(); a NormDecayOptimizer's .norm_decay.detach(), after which "
                f"that wrapper steps as its inner optimizer), or leave these layers to it (exclude={tuple(self._shared)!r})"
            )

    def _layer_groups(self) -> set[int]:
        """Indices of the param groups that hold this decay's layers (trainable, or frozen ones it
        regularizes once unfrozen)."""
        index = {id(p): i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"]}
        weights = [self._weight[name] for name in (*self.decayed, *self._frozen_decayed())]
        return {index[id(w)] for w in weights if id(w) in index}

    def _refuse_other_hyperparameters(self, beta, gamma) -> None:
        """Refuse a beta or gamma other than the one that a param group holding this decay's layers
        has from another decay on the optimizer (it wrote it there, or that decay's layers share the
        group): a group has one of each for all its layers, so this decay would silently take the
        other's. A value the user set in a group of this decay's own is its per-group override."""
        others = self._others()
        if not others:
            return
        theirs = set().union(*(decay._layer_groups() for decay in others))
        inserted = _INSERTED.get(self._registry_key(), set())
        for i in sorted(self._layer_groups()):
            group = self.optimizer.param_groups[i]
            for key, given in ((BETA, beta), (GAMMA, gamma)):
                held = group.get(key, given)
                numbers_alike = not isinstance(held, torch.Tensor) and not isinstance(given, torch.Tensor) and held == given
                if held is not given and not numbers_alike and (i in theirs or (i, key) in inserted):
                    raise ValueError(
                        f"param group {i} holds {key}={held!r} from the other norm decay on this optimizer, and "
                        f"this one was given {given!r}: a param group has one {key} for all its layers. Pass "
                        f"{key.removeprefix('norm_decay_')}={held!r}, or give this decay's layers param groups of "
                        f"their own, set their {key!r} to the value you want, and pass that"
                    )

    def _decayed_weights(self) -> set[int]:
        """Ids of the weights this decay keeps state for (regularized now, or once unfrozen)."""
        return {id(self._weight[name]) for name in (*self.decayed, *self._frozen_decayed())}

    # -- which layers -----------------------------------------------------------------------------

    def _held(self) -> dict[int, int]:
        """``{id(parameter): group index}`` of the optimizer's trainable parameters."""
        return {id(p): i for i, group in enumerate(self.optimizer.param_groups) for p in group["params"] if p.requires_grad}

    def _select(self, specs: LayerSpecs) -> None:
        """Split the model's layers into those decayed, those whose batch norm is projected, and the
        rest (:func:`~normopt.layer_choice.choose_layers`; a refusal changes nothing here)."""
        modules = dict(self.model.named_modules())
        choice = choose_layers(
            specs,
            modules,
            self.optimizer.param_groups,
            kinds=self.kinds,
            exclude=self.exclude,
            taken=set().union(*(decay._decayed_weights() for decay in self._others())),
            ord=self.ord,
            max_norm=self.max_norm,
            bn_max_norm=self.bn_max_norm,
        )
        self.specs, self._modules = specs, modules
        self._note_added_groups()
        self._groups_seen = len(self.optimizer.param_groups)
        self.decayed, self.bn_projected, self.skipped = choice.decayed, choice.bn_projected, choice.skipped
        self._warn_overriding()
        # Held but frozen now, and {layer: weight} that another decay on the optimizer has (a layer
        # added since to both).
        self._frozen, self._shared = choice.frozen, choice.shared
        # Each chosen layer's weight as chosen: what the state is kept under, even once a
        # parametrization has moved it (until the next step chooses the layers anew).
        self._weight = {name: self._modules[name].weight for name in (*self.decayed, *self.bn_projected)}
        self._weight.update(self._frozen)
        # What the step checks is still so (_layers_changed): each chosen module's registered weight,
        # trainable, of the dtype and on the device the decay state was made for.
        self._watched = tuple(
            (self._modules[name]._parameters, weight, weight.dtype, weight.device)
            for name, weight in self._weight.items()
            if name not in self._frozen
        )
        # Groups keep their order (load_state_dict replaces the dicts, not their order).
        held = self._held()
        self._group_of = {name: held[id(self._weight[name])] for name in self.decayed}
        self._tensors = {}
        for name, spec in {**self.decayed, **self.bn_projected}.items():
            module = self._modules[name]
            self._tensors[spec.weight] = module.weight
            if isinstance(spec, BatchNormSpec):
                self._tensors[spec.running_var] = module.running_var
        self._taps = {}

    def _note_added_groups(self) -> None:
        """Record as the decays' own the beta and gamma that torch copied from the defaults (which a
        decay wrote) into the param groups added since the layers were chosen."""
        inserted = _INSERTED.get(self._registry_key(), set())
        groups, defaults = self.optimizer.param_groups, self.optimizer.defaults
        for i in range(getattr(self, "_groups_seen", len(groups)), len(groups)):
            for key in (BETA, GAMMA):
                if (None, key) in inserted and key in groups[i] and groups[i][key] is defaults.get(key):
                    inserted.add((i, key))

    def add_params(self, params: Iterable[torch.Tensor] = ()) -> None:
        """Choose the layers anew after the optimizer got new parameters (``add_param_group``; the
        wrapper calls this itself, a hooked optimizer should, before the next forward), a frozen
        weight was unfrozen or a chosen one replaced or cast (the next step sees those itself).

        Where the model's modules changed (a new head, a block of another stride), their layers are
        described anew: a new convolution first with the large-input limit, then with the input
        size that the next forward records (for the convolutions kept as well)."""
        del params  # the optimizer's param groups are the source of truth
        if self._detached:
            return
        for i, group in enumerate(self.optimizer.param_groups):  # a group added with a bad beta, named now
            check_group(group, f"param group {i}")
        self._choose_anew(during_step=False)

    def _choose_anew(self, during_step: bool) -> None:
        # A parametrization's own modules (registered on a layer since) change no map's input size.
        def layered(modules):
            return {name: module for name, module in modules.items() if "parametrizations" not in name.split(".")}

        modules = layered(dict(self.model.named_modules()))
        changed = sorted(name for name, module in modules.items() if self._modules.get(name) is not module)
        if not changed and modules.keys() == layered(self._modules).keys():
            self._reselect(self.specs)
            return
        with quiet_overriding():
            fresh = layer_specs(self.model)
        specs = {
            name: self.specs[name] if isinstance(spec, ConvSpec) and name not in changed and name in self.specs else spec
            for name, spec in fresh.items()
        }
        # Any change may move a convolution's input size (a pooling layer replaced), not only its own.
        if any(isinstance(spec, ConvSpec) for spec in fresh.values()):
            if self._recorder is not None:
                self._recorder.remove()
            self._recorder = InputSizeRecorder(self.model)
            if during_step:  # the forward of this step ran before the recorder: its sizes are lost
                warnings.warn(
                    f"the model's modules {changed[:4]} changed since the layers were chosen, and this step is the "
                    "first to see it: its convolutions keep the input sizes recorded before (a new one the "
                    "large-input limit) until the next forward; call add_params() after add_param_group, before "
                    "the forward, to have them recorded by it",
                    stacklevel=4,
                )
        self._reselect(LayerSpecs(specs, fresh.skipped))

    def _reselect(self, specs: LayerSpecs) -> None:
        """Select the layers of ``specs`` anew, keeping the decay state of those still regularized."""
        if self._state is None:  # what was loaded before the first step, all of it
            kept = self._pending
        else:  # as a copy or a checkpoint carries it: a run that resumes or is copied and then
            # reselects goes on bit for bit as the one that reselected live (a scale of another
            # layout makes _write take h)
            kept = self._carried()
        kept = {**self._held_back, **kept}
        owners = dict(self._weight)  # as chosen, each kept h's weight (a parametrization may have moved it)
        decayed_before, shared_before = set(self.decayed), set(self._shared)
        self._select(specs)
        self._transform = self._state = None
        now = {name: module._parameters.get("weight") for name, module in self._modules.items()}
        kept = {name: entry for name, entry in kept.items() if now.get(name) is owners.get(name)}  # not a new module's
        dropped = [name for name in decayed_before - set(self.decayed) if name not in self._frozen and name in self.skipped]
        for name in dropped:
            warnings.warn(f"layer {name!r} is no longer regularized: {self.skipped[name]}", stacklevel=3)
        for name in self._shared.keys() - decayed_before - shared_before:  # added since, and another decay took it first
            warnings.warn(f"layer {name!r} is left to the other norm decay on this optimizer, which regularizes it", stacklevel=3)
        zero_local = self._zero_local()
        for name in decayed_before:  # a state entry the layer left would keep the old buffers alive
            weight = owners[name]
            if name in self.decayed and now[name] is weight:
                continue
            for home in (self.optimizer.state, *([zero_local[0]] if zero_local is not None else [])):
                entry = home.get(weight)
                if isinstance(entry, dict):
                    for key in DECAY_KEYS:
                        entry.pop(key, None)
        self._pending = {name: entry for name, entry in kept.items() if name in self.decayed}
        self._held_back = {name: entry for name, entry in kept.items() if name in self._frozen_decayed()}

    def _refresh(self) -> None:
        """Lazy discovery and re-selection, outside the per-step computation (where :meth:`_stale`)."""
        if self._recorder is not None and self._replicas is not None:
            self._replicas.warn_join("Gathering the recorded input sizes", "at the first step")
            self._recorder.gather(self._replicas)  # every replica at the same step (see _stale)
        if self._recorder is not None and self._recorder.called:
            with quiet_overriding():
                self._reselect(self._recorder.specs())
            self._recorder = None  # only now: a refused selection is refused again at the next step
        if self._selection_changed():
            self._choose_anew(during_step=True)
        if self._transform is None and self.decayed:
            self._lay_out()

    def _lay_out(self) -> None:
        """Build the transformation and its state for the layers chosen, from the decay state pending."""
        _, gammas = self._hyper()
        # Rings sized for the default gamma, or the largest one set now: a scheduler that
        # raises gamma above it makes the steps from then on add h densely.
        max_gamma = max([0.5, *gammas.values()])
        # Rings loaded from a checkpoint keep their length whatever gamma is now (it may have
        # changed between the checkpoint and this step), so that the run goes on sparse or turns
        # dense as the one that wrote them would have. A ring shorter than any this dtype is
        # sized for came from another dtype: the load rebuilds it from h.
        loaded = [
            covered(recent.numel(), dtype)
            for name, (_, _, recent) in self._pending.items()
            if recent is not None
            and horizon(0.5, dtype := self._weight[name].dtype) <= recent.numel() <= RING_MAX_LENGTH
            and not bool((recent == DENSE).any())
        ]
        if loaded:
            max_gamma = min(loaded)
        # N counts the frozen layers too, as it counts those of a group whose beta is 0: freezing a
        # backbone, or unfreezing it for fine-tuning, leaves the head's beta / N as it is.
        counted = len(self.decayed) + len(self._frozen_decayed())
        self._transform = norm_decay(self.decayed, ord=self.ord, rule=self.rule, max_gamma=max_gamma, layer_count=counted)
        self._state = self._transform.init(self._tensors)
        for name, (buffer, scale, recent) in self._pending.items():
            self._write(name, buffer, scale, recent)
        self._pending = {}

    # -- the step ---------------------------------------------------------------------------------

    def _hyper(self) -> tuple[dict[str, float], dict[str, float]]:
        """Each regularized layer's beta and gamma, read from its param group now (checked once per group)."""
        defaults = self.optimizer.defaults
        per_group = [
            (
                signed_beta(
                    check_beta(group.get(BETA, defaults.get(BETA)), f"{BETA} of param group {i}"), group.get("maximize", False)
                ),
                check_gamma(group.get(GAMMA, defaults.get(GAMMA)), f"{GAMMA} of param group {i}"),
            )
            for i, group in enumerate(self.optimizer.param_groups)
        ]
        return (
            {name: per_group[i][0] for name, i in self._group_of.items()},
            {name: per_group[i][1] for name, i in self._group_of.items()},
        )

    def _selection_changed(self) -> bool:
        """Whether the layers must be chosen anew: param groups added, or :meth:`_layers_changed`."""
        return len(self.optimizer.param_groups) != self._groups_seen or self._layers_changed()

    def _layers_changed(self) -> bool:
        """Whether a weight that was frozen when the layers were chosen is trainable now, or a
        chosen one is frozen now (it then keeps its h, unchanged, until it is unfrozen), replaced
        (a parametrization registered on its module, a new ``nn.Parameter``), or cast or moved
        (``model.double()``, ``model.to(device)``): then the layers are chosen anew."""
        return any(weight.requires_grad for weight in self._frozen.values()) or not all(
            params.get("weight") is weight and weight.requires_grad and weight.dtype is dtype and weight.device == device
            for params, weight, dtype, device in self._watched
        )

    def _stale(self) -> bool:
        """Whether the layers or the decay state must be set up (anew) before this step."""
        # DDP replicas decide together (normopt.replicas): one whose forward ran no convolution yet
        # gathers the others' sizes all the same, where it used to leave them waiting in the gather.
        waiting = self._recorder is not None and (
            self._recorder.called or (self._replicas is not None and self._recorder.watching)
        )
        return waiting or self._selection_changed() or (self._transform is None and bool(self.decayed))

    @torch.no_grad()
    def before_step(self) -> None:
        """Update the decay buffers from the current weights and add them to the gradients."""
        if self._detached:
            return
        recorder = self._recorder  # one made during this step (a module replaced) missed its forward
        if self._stale():
            # Compiled, the first step or the first after add_param_group sets up outside the graph
            # (a graph break in that step's trace only; the steps after it trace without one).
            (torch.compiler.disable(self._refresh) if torch.compiler.is_compiling() else self._refresh)()
        if recorder is not None and self._recorder is recorder and not self._warned_unrecorded and self._replicas is None:
            (torch.compiler.disable(self._warn_unrecorded) if torch.compiler.is_compiling() else self._warn_unrecorded)()
        self._agreed = self._agreed_running_vars()
        if self._transform is not None:
            betas, gammas = self._hyper()
            # GradScaler hands an optimizer that unscales inside its own step (fused ones) the
            # gradients still scaled, and their scale as ``grad_scale`` for that step: the decay
            # is scaled alike, so that the kernel's unscaling gives beta * h.
            grad_scale = getattr(self.optimizer, "grad_scale", None)
            if isinstance(grad_scale, torch.Tensor):
                betas = scaled_betas(betas, grad_scale)
            grads = {spec.weight: self._tensors[spec.weight].grad for spec in self.decayed.values()}
            tensors = {**self._tensors, **self._agreed} if self._agreed else self._tensors
            # Unchecked: _layers_changed has seen to the weights' dtype, device and identity, and
            # torch keeps each .grad like its parameter.
            _, self._state, norms = self._transform.update(grads, self._state, tensors, beta=betas, gamma=gammas, check=False)
            self.last_norms = norms
            if not torch.compiler.is_compiling():
                self._reporter.push(list(norms), torch.isfinite(torch.stack(list(norms.values()))))
        if self.bn_projection == "released":
            self._project_batchnorms(project_batchnorm_argmax)

    def _warn_overriding(self) -> None:
        """Warn, once per layer and class, of the decayed or capped layers whose class overrides how
        the stock layer applies its weight (layer_specs' warning, which this decay silences, names
        every such layer of the model, excluded ones too)."""
        layers = {name: self._modules[name] for name in (*self.decayed, *self.bn_projected)}
        self._overriding_warned = warn_overriding(layers, self._overriding_warned, "norm decay regularizes")

    def _warn_unrecorded(self) -> None:
        """Warn, once, of a step that no forward of the model's convolutions preceded: their input
        sizes stay unknown, and the decay keeps the large-input limit, until one runs."""
        # torch.distributed.checkpoint's set_optimizer_state_dict sets up a fresh optimizer's state
        # by one step of zero gradients at lr 0, before any forward: no step of training.
        lrs = [group.get("lr", 1.0) for group in self.optimizer.param_groups]
        lr_zero = all(
            (lr.device.type == "cpu" and not bool(lr.ne(0).any())) if isinstance(lr, torch.Tensor) else lr == 0 for lr in lrs
        )
        if self._recorder.called or not self._recorder.watching or lr_zero:
            return
        self._warned_unrecorded = True
        warnings.warn(
            "norm decay stepped before any forward of the model ran its convolutions, so it uses their "
            f"large-input limit until one does; {UNRECORDED_HINT}",
            stacklevel=user_stacklevel(),
        )

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep the decay state in ``optimizer.state`` and apply the caps (``max_norm``, exact ``bn_max_norm``)."""
        if self._detached:
            return
        if self._state is not None:
            zero_local = self._zero_local()
            for name, (buffer, scale) in self._state.views.items():
                weight = self._weight[name]
                home = self._home(weight, zero_local)
                state = home.get(weight)
                # In place already: .grad is not read (compiled, a read of a gradient that
                # zero_grad then freed made dynamo recompile the hook path of attach_norm_decay
                # at every step).
                if state is not None and state.get(BUFFER) is buffer:
                    continue
                # Only once the optimizer has stepped the weight: a key written earlier would keep
                # Adam-like optimizers from initialising their own state. (An entry that holds the
                # state of a load, or of an earlier layout, is brought up to date all the same.)
                if weight.grad is not None or (state is not None and BUFFER in state):
                    state = home[weight]
                    if state is None:  # ZeRO loads None for the parameters another rank steps
                        state = home[weight] = {}
                    put_decay_state(state, buffer, scale, self._state.recent.get(name), self.ord)
        if self.max_norm is not None:
            for name, spec in self.decayed.items():
                if isinstance(spec, BatchNormSpec):
                    continue
                weight = self._weight[name]
                if weight.device not in self._taps.setdefault(name, {}):
                    self._taps[name][weight.device] = tap_tables(spec, self.ord, weight.device)
                weight.copy_(project_layer(weight, spec, self.ord, self.max_norm, self._taps[name][weight.device]))
        if self.bn_projection == "exact":
            self._project_batchnorms(project_batchnorm)

    def _agreed_running_vars(self) -> dict[str, torch.Tensor]:
        """``{running_var key: copy}`` of the first rank's running variances of the batch norms this
        step decays or caps, for the replicas of a DDP model (:mod:`normopt.replicas`): each rank's
        own forward has just updated its own. Empty elsewhere: the step reads the buffers."""
        if self._replicas is None:
            return {}
        keys = sorted(
            {
                spec.running_var
                for spec in (*self.decayed.values(), *self.bn_projected.values())
                if isinstance(spec, BatchNormSpec)
            }
        )
        if not keys:
            return {}
        self._replicas.warn_join("Decaying or capping batch norms")
        return dict(zip(keys, first_rank_copies([self._tensors[key] for key in keys], self._replicas)))

    def _project_batchnorms(self, projection) -> None:
        for name, spec in self.bn_projected.items():
            module = self._modules[name]
            running_var = self._agreed.get(spec.running_var, module.running_var)
            capped = projection(module.weight, running_var, spec, self.bn_max_norm)
            module.weight.copy_(torch.where(torch.isfinite(capped), capped, module.weight))

    # -- state --------------------------------------------------------------------------------------

    def decay_buffers(self) -> dict[str, torch.Tensor]:
        """``{layer: h}``: each regularized layer's dense decay buffer (new tensors)."""
        if self._state is None:
            return {name: h if scale is None else h * scale for name, (h, scale, _) in self._pending.items()}
        return {name: self._state.decay_buffer(name) for name in self._state.views}

    def nonfinite_layers(self) -> list[str]:
        """Names of the layers whose last norm was NaN or infinite (reads the norms once)."""
        from normopt.norms import nonfinite_layers

        return nonfinite_layers(self.last_norms)

    def _write(self, name: str, buffer: torch.Tensor, scale: torch.Tensor | None, recent: torch.Tensor | None = None) -> None:
        if scale is not None and tuple(scale.shape) != tuple(self._state.views[name][1].shape):
            buffer, scale, recent = buffer * scale, None, None  # another layout: keep h itself
        self._state = self._transform.load(self._state, name, buffer, scale, recent)

    def _frozen_decayed(self) -> list[str]:
        """The frozen layers that are regularized once unfrozen."""
        return [name for name in self._frozen if isinstance(self.specs[name], self.kinds)]

    def detach(self) -> None:
        """Remove every hook this object installed (optimizer step and load hooks, model forward hooks)
        and stop: :meth:`before_step` and :meth:`after_step` do nothing from then on, so that a
        :class:`~normopt.NormDecayOptimizer` around it steps as its inner optimizer, and another
        decay may take its layers. Its decay state leaves the optimizer's ``state`` (a plain
        optimizer then saves none, and a decay attached later starts from zero). The last decay on
        an optimizer takes ``norm_decay_beta`` and ``norm_decay_gamma`` out of its param groups and
        defaults too: a decay attached later sets its own."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        # The values decays wrote (never the user's) go with the last one, so that one attached later
        # sets its own; before, those of the groups that only this decay's layers use.
        others = self._others()
        theirs = set().union(*(decay._layer_groups() for decay in others))
        inserted = _INSERTED.get(self._registry_key(), set())
        for i, key in list(inserted):
            if others and (i is None or i in theirs or i not in self._layer_groups()):
                continue  # still used (a group without any decay's layers keeps them for schedulers)
            groups = self.optimizer.param_groups
            options = self.optimizer.defaults if i is None else groups[i] if i < len(groups) else {}
            options.pop(key, None)
            inserted.discard((i, key))
        # Its state goes too: a plain optimizer would carry it in every checkpoint (as views of
        # one flat buffer, which pickle writes whole once per view), and a decay made later would
        # resume from it.
        zero_local = self._zero_local()
        homes = [self.optimizer.state, *([zero_local[0]] if zero_local is not None else [])]
        drop_decay_state(homes, [self._weight[name] for name in (*self.decayed, *self._frozen_decayed())])
        self._transform = self._state = None
        self._pending, self._held_back = {}, {}
        _DECAYS.get(self._registry_key(), weakref.WeakSet()).discard(self)
        self._detached = True
        if self._recorder is not None:
            self._recorder.remove()


def attach_norm_decay(optimizer: torch.optim.Optimizer, model: nn.Module, **options) -> NormDecay:
    """Add norm decay to an existing optimizer through its step hooks, without replacing it.

    For optimizers that cannot be swapped for :class:`normopt.NormDecayOptimizer` (ZeRO, Accelerate,
    fused). The decay state lives in ``optimizer.state`` and ``beta``/``gamma`` in its param groups,
    so the optimizer's own ``state_dict()`` carries everything (with ``ZeroRedundancyOptimizer``,
    each weight's decay state lives in the local optimizer of the rank that steps it, so that
    ``consolidate_state_dict`` gathers it). Under ``GradScaler`` a fused optimizer, which unscales
    inside its step, gets the decay scaled alike. (A step that such an optimizer then skips for
    non-finite gradients has already advanced ``h``, and, with ``bn_projection="released"``, projected
    the batch norms' gammas, which that projection does before the step: an unfused one is not
    called at all.) The
    pre-hook runs before the optimizer evaluates a closure, so closures are refused. After
    ``optimizer.add_param_group``, call ``decay.add_params()`` before the next forward (the wrapper's
    ``add_param_group`` does it): a module replaced meanwhile then gets its input size from that
    forward. Call ``decay.detach()`` to remove it. Like every optimizer hook, it is not copied with the
    optimizer (``copy.deepcopy``): attach it to the copy. Each weight takes one decay per optimizer:
    decays of other layers may share an optimizer (``exclude`` splits them), one of a layer that
    another decay on the optimizer regularizes is refused until that one is detached, and a layer
    added later goes to the first decay that chooses it (the other warns).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> decay = attach_norm_decay(optimizer, model, beta=0.01)
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> optimizer.step()
        >>> list(decay.last_norms), sorted(optimizer.state[model.weight])
        ([''], ['norm_decay_buffer', 'norm_decay_ord', 'norm_decay_scale'])
        >>> decay.detach()
    """
    decay = NormDecay(optimizer, model, **options)

    def before(_optimizer, args, kwargs):
        # torch passes (optimizer, *step_args): anything after the optimizer is a closure.
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError("attach_norm_decay cannot run with a closure: use NormDecayOptimizer instead")
        decay.before_step()

    decay._handles += [
        optimizer.register_step_pre_hook(before),
        optimizer.register_step_post_hook(lambda *_: decay.after_step()),
    ]
    return decay
