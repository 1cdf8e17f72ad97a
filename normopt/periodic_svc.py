"""Singular value clipping of every conv layer of a model, every N optimizer steps (the paper's SVC baseline)."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from normopt.arguments import finite_number, positive_int
from normopt.discovery import (
    UNRECORDED_HINT,
    InputSizeRecorder,
    _weight_reason,
    layer_specs,
    module_names,
    quiet_overriding,
    unwrap,
    warn_overriding,
    within,
)
from normopt.replicas import replica_group
from normopt.specs import ConvSpec, kernel_reach
from normopt.svc import INPUT_SIZES, clip_input_size, clip_layer_counted, conv_spectral_norm, pads_with_copies, raw_input_size


@dataclass(frozen=True)
class ClipReport:
    """How much work one clip of a model took.

    Attributes:
        layers: conv layers looked at.
        layers_clipped: layers with at least one frequency above the bound (the others are left
            untouched: their circular spectral norm is already at most the bound).
        frequencies: per-group transfer matrices of all layers (one frequency of each conjugate
            pair; with ``method="svd"``, the real-FFT half).
        frequencies_clipped: those whose largest singular value exceeded the bound.
    """

    layers: int
    layers_clipped: int
    frequencies: int
    frequencies_clipped: int


def _weight_sources(conv: _ConvNd) -> list[torch.Tensor]:
    """The parameters a conv's weight is: the weight itself, or those it is computed from (a
    parametrization's originals; a hook's ``weight_orig`` of pruning, ``weight_g`` and ``weight_v``)."""
    if parametrize.is_parametrized(conv, "weight"):
        return list(conv.parametrizations.weight.parameters())
    return [p for name, p in conv.named_parameters(recurse=False) if name == "weight" or name.startswith("weight_")]


class PeriodicSVC:
    """Clips the singular values of every conv layer at ``bound`` after every ``every``-th step.

    Installs a step post-hook on ``optimizer`` (any ``torch.optim.Optimizer``, NormDecayOptimizer
    included). Each layer is clipped as the circular convolution on its padded input size, which
    bounds the zero-padded, strided layer (see :mod:`normopt.svc`). Input sizes come from
    ``example_input`` or, without it, from the training forward (hooks). Under
    ``torch.distributed`` the clipped kernels are broadcast from rank 0, so every replica holds the
    same bits whatever its LAPACK does; given the DDP model (not its module), the replicas also
    take the input sizes that every rank recorded (:mod:`normopt.replicas`), so that they clip the
    same layers at the same sizes (given the module, pass ``example_input``). With
    ``report=True`` each clip records, in ``last_norms``, every layer's circular spectral norm
    after the crop, at the size it was clipped at (one more SVD per layer), which shows how far
    above ``bound`` the crop to the kernel's support left it. Every clip records a
    :class:`ClipReport` in ``last_report``: how many layers and frequencies needed work. A clip
    writes every layer or none: every kernel is clipped first, and one that raises or comes out
    not finite leaves the model as it was.

    ``input_size="padded"`` (default) clips each layer at input + padding (a sound bound);
    ``"raw"`` at the input size without padding, as the released code does, which also skips a
    layer whose raw input is smaller than its kernel (VGG's 3x3 convolutions on 2x2 maps): so does
    this, naming it in ``skipped``. A layer whose input size no forward recorded (a training-only
    head under ``example_input``'s eval-mode probe) is refused before any clip. Convolutions added
    or replaced later (``add_param_group``) are described anew once a forward has recorded their
    input sizes, and left alone until then. ``threads`` sizes the
    thread pool of the clip (default ``torch.get_num_threads()`` at clip time); ``method`` and
    ``precision`` as in :func:`normopt.svc.clip_singular_values`.
    ``exclude`` names modules to leave alone, each with every conv layer inside it. A conv whose
    weight ``optimizer`` does not hold, or does not require grad, is not clipped either.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> svc = PeriodicSVC(optimizer, model, bound=0.5, every=2, example_input=torch.zeros(1, 1, 4, 4))
        >>> for _ in range(2):
        ...     model(torch.randn(3, 1, 4, 4)).sum().backward()
        ...     optimizer.step()
        >>> svc.clips
        1
    """

    _replicas = None  # a DDP model's (normopt.replicas), set at construction (unset in copies of earlier versions)
    _recorded = None  # {conv: input size or sizes} the forwards recorded, once described from them
    _from_example = None  # whether described from example_input (None: a copy made by an earlier version)
    _overriding_warned: frozenset = frozenset()  # (layer, class) pairs named in an OverriddenForwardWarning

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        bound: float,
        *,
        every: int = 100,
        iterations: int = 1,
        exclude: Iterable[str] = (),
        example_input=None,
        report: bool = False,
        input_size: str = "padded",
        threads: int | None = None,
        method: str = "gram",
        precision: str | None = None,
    ):
        if isinstance(bound, torch.Tensor) and bound.dim() == 0 and bound.is_floating_point():
            bound = float(bound)  # read once: the clips compare it on the host
        bound = finite_number(bound, "bound")
        every, iterations = positive_int(every, "every"), positive_int(iterations, "iterations")
        if input_size not in INPUT_SIZES:
            raise ValueError(f"input_size must be one of {INPUT_SIZES}, got {input_size!r}")
        threads = positive_int(threads, "threads", none=True)
        if method not in ("gram", "svd"):
            raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
        if precision not in (None, "single", "double"):
            raise ValueError(f"precision must be None, 'single' or 'double', got {precision!r}")
        self.input_size = input_size
        self._options = {"threads": threads, "method": method, "precision": precision}
        self.last_report: ClipReport | None = None
        self.model, self._replicas = unwrap(model), replica_group(model)
        self.bound, self.every, self.iterations = float(bound), every, iterations
        self.exclude = module_names(exclude, "exclude", self.model)
        self.report = report
        self.last_norms: dict[str, float] = {}
        self.steps = self.clips = 0
        self._optimizer = optimizer
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        convs = [m for n, m in self.model.named_modules() if isinstance(m, _ConvNd) and not within(n, self.exclude)]
        if not convs:
            outside = f" outside exclude={sorted(self.exclude)}" if self.exclude else ""
            raise ValueError(f"the model has no conv layers{outside}: PeriodicSVC has nothing to clip")
        # Frozen ones may be unfrozen later; these never.
        if not any(id(p) in held for conv in convs for p in _weight_sources(conv)):
            raise ValueError(
                f"the optimizer holds none of the model's {len(convs)} conv layers (excluded: {sorted(self.exclude)}): "
                "pass model.parameters() to it"
            )
        self._recorder = None if example_input is not None else InputSizeRecorder(self.model)
        self._from_example = example_input is not None
        with quiet_overriding():  # the clip names the overriding layers it clips (warn_overriding)
            self.specs = layer_specs(self.model, example_input) if example_input is not None else None
        # {layer: reason} of the conv layers left alone (raw input smaller than the kernel's reach)
        self.skipped: dict[str, str] = {}
        self._convs = self._conv_modules()  # as described by self.specs
        self._warned: set[str] = set()
        if self.specs is not None:
            self._conv_specs()  # refuse now what the first clip would
        # A bound method, not a closure: a copy of the optimizer (copy.deepcopy of a
        # NormDecayOptimizer keeps its hooks) clips the copy's model, not this one's.
        self._handle = optimizer.register_step_post_hook(self._step_hook)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        # torch copies (and unpickles) a plain optimizer without its hooks: the copy's steps need
        # this one's. A NormDecayOptimizer's copy keeps them, bound to this copy: it is being
        # copied through them (its state not set yet) or holds one already.
        hooks = getattr(self._optimizer, "_optimizer_step_post_hooks", None)
        if hooks is not None and not any(getattr(hook, "__self__", None) is self for hook in hooks.values()):
            self._handle = self._optimizer.register_step_post_hook(self._step_hook)

    def _step_hook(self, optimizer, args, kwargs) -> None:
        self._after_step()

    def _after_step(self) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.clip()

    def _conv_modules(self) -> dict[str, _ConvNd]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, _ConvNd)}

    def _conv_specs(self) -> dict[str, ConvSpec]:
        """The layers to clip now, each with its spec; refused, before any is clipped, what no clip can take."""
        if self.specs is None:  # then no example input was given, and the recorder runs
            if self._replicas is not None:  # every replica at the same clip
                self._recorder.gather(self._replicas)
            if not self._recorder.called:
                raise RuntimeError(
                    f"PeriodicSVC needs conv input sizes: run a forward first or pass example_input ({UNRECORDED_HINT})"
                )
            with quiet_overriding():
                self._recorded = self._recorder.sizes
                self.specs, self._recorder, self._convs = self._recorder.specs(), None, self._conv_modules()
        # Convolutions added or replaced since the model was described (a new head given to
        # add_param_group) are described anew from the input sizes the next forward records;
        # until then they are left alone.
        current = self._conv_modules()
        changed = sorted(name for name, module in current.items() if self._convs.get(name) is not module)
        if changed and self._recorder is not None and self._replicas is not None:
            self._recorder.gather(self._replicas)
        if changed and self._recorder is not None and self._recorder.called:
            with quiet_overriding():
                self._recorded = self._recorder.sizes
                self.specs, self._recorder, self._convs, changed = self._recorder.specs(), None, current, []
        elif changed:
            if self._recorder is None:
                self._recorder = InputSizeRecorder(self.model)
            if set(changed) - self._warned:
                self._warned.update(changed)
                warnings.warn(
                    f"conv layers {changed} were added or replaced since PeriodicSVC described the model: they are "
                    "clipped from the first clip after a forward has recorded their input sizes",
                    stacklevel=4,
                )
        # Only the weights the optimizer trains: a frozen backbone, or a layer held by another
        # optimizer, is left as it is, as the optimizer leaves it (asked at every clip, since a
        # layer may be frozen or unfrozen between clips).
        held = {id(p) for group in self._optimizer.param_groups for p in group["params"]}

        def trained_through_sources(module: _ConvNd) -> bool:  # its weight, or what the weight is computed from
            return any(p.requires_grad and id(p) in held for p in _weight_sources(module))

        convs = {
            n: s
            for n, s in self.specs.items()
            if isinstance(s, ConvSpec)
            and n in current
            and n not in changed
            and not within(n, self.exclude)
            and current[n].weight.requires_grad
            and id(current[n].weight) in held
        }
        unknown = [name for name, spec in convs.items() if spec.input_size is None]
        # A trained conv that layer_specs skipped (one padded with copies and called at several
        # input sizes; a parametrized or pruned weight, trained through the parameters it is
        # computed from): no spec describes it, and left out silently it would never be clipped.
        skipped = [
            name
            for name in getattr(self.specs, "skipped", {})
            if name in current
            and name not in changed
            and not within(name, self.exclude)
            and trained_through_sources(current[name])
        ]
        reasons = {name: self.specs.skipped[name] for name in skipped}
        # A described conv whose weight is computed now (parametrized or pruned since), trained
        # through the parameters it is computed from: dropped from `convs` above, it would never
        # be clipped either.
        for name, spec in self.specs.items():
            if isinstance(spec, ConvSpec) and name in current and name not in changed and not within(name, self.exclude):
                reason = _weight_reason(current[name])
                if reason is not None and trained_through_sources(current[name]):
                    reasons[name] = reason
        if reasons:
            names, why = sorted(reasons), "; ".join(f"{name!r}: {reasons[name]}" for name in sorted(reasons))
            raise ValueError(f"conv layers {names} cannot be clipped ({why}); exclude them (exclude={tuple(names)!r})")
        if unknown:
            raise ValueError(self._unknown_sizes_message(unknown))
        if self.input_size == "padded":  # before any layer is clipped
            refused = [name for name, spec in convs.items() if pads_with_copies(spec)]
            if refused:
                raise ValueError(
                    f"layers {refused} pad with copies of their input (circular, reflect or replicate): the circular "
                    f"convolution on the padded input does not bound them; exclude them (exclude={tuple(refused)!r})"
                )
        else:  # as the released code, which skips a layer whose raw input is smaller than its kernel
            for name, spec in list(convs.items()):
                reach = kernel_reach(spec.kernel_size, spec.dilation)  # as the clip would refuse it
                size = raw_input_size(spec)  # a transposed layer's is its adjoint's: the layer's output
                if any(r > n for r, n in zip(reach, size)):
                    what = "the raw input of its adjoint (its output)" if spec.transposed else "its raw input"
                    self.skipped[name] = f"kernel reach {reach} is larger than {what} {size}"
                    del convs[name]
        self._overriding_warned = warn_overriding(
            {name: current[name] for name in convs}, self._overriding_warned, "PeriodicSVC clips"
        )
        return convs

    def _unknown_sizes_message(self, unknown: list[str]) -> str:
        """Why the input sizes of ``unknown`` are not known, and what to do, as the sizes were found."""
        exclude = f"exclude them (exclude={tuple(unknown)!r})"
        if self._from_example:
            return (
                f"the input sizes of conv layers {unknown} are not known: example_input's forward (eval mode, no "
                "gradients) did not call them (a training-only head), or called them with several sizes; leave "
                f"example_input out to record them from the training forward, or {exclude}"
            )
        if self._recorded is None:  # a copy made by an earlier version: either way
            return (
                f"the input sizes of conv layers {unknown} are not known (not called by the forward that recorded "
                "them, or called with several sizes): pass example_input at the size to clip them at, or leave it "
                f"out to record them from the training forward, or {exclude}"
            )
        how = "; ".join(
            f"{name!r} called with input sizes {self._recorded[name]}" if name in self._recorded else f"{name!r} not called"
            for name in unknown
        )
        return (
            f"the input sizes of conv layers {unknown} are not known from the forwards that recorded them ({how}: "
            f"multi-scale training, or one layer shared at several sizes); pass example_input at the size to clip "
            f"them at, or {exclude}"
        )

    @torch.compiler.disable  # host work (SciPy, LAPACK, a loop over frequencies): under a compiled step, dynamo traced it
    @torch.no_grad()
    def clip(self) -> None:
        """Clip every conv layer now (also called by the hook every ``every`` steps)."""
        modules = dict(self.model.named_modules())
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and self._replicas is not None:
            self._replicas.warn_join("Singular value clipping")
        layers = layers_clipped = frequencies = frequencies_clipped = 0
        clipped_now = self._conv_specs()
        if clipped_now:  # refused before any layer is clipped, so that a refusal leaves every weight as it was
            finite = torch.stack([torch.isfinite(modules[name].weight).all().cpu() for name in clipped_now]).tolist()
            bad = [name for name, ok in zip(clipped_now, finite) if not ok]
            if bad:
                raise ValueError(f"layers {bad}: kernels have non-finite values (NaN or inf); no layer was clipped")
        # Every layer is clipped before any weight is written: a clip that raises, or gives a
        # kernel that is not finite, leaves the model as it was. The clipped kernels wait on the
        # CPU, where the clip computes anyway (not beside the weights, on an accelerator's memory);
        # a weight shared by several layers is clipped for each in turn, from the last one's result.
        results, working = {}, {}
        for name, spec in clipped_now.items():
            weight = modules[name].weight
            source = working.get(id(weight))
            source = weight.detach().to("cpu") if source is None else source
            clipped, count, exceeded = clip_layer_counted(
                source, spec, self.bound, self.iterations, input_size=self.input_size, **self._options
            )
            layers, frequencies, frequencies_clipped = layers + 1, frequencies + count, frequencies_clipped + exceeded
            layers_clipped += clipped is not None
            if clipped is not None:
                working[id(weight)] = clipped
            results[name] = clipped
        bad = [name for name, clipped in results.items() if clipped is not None and not bool(torch.isfinite(clipped).all())]
        if distributed:  # rank 0's kernels are the ones broadcast: its finding decides, on every rank at once
            decision = [bad]
            dist.broadcast_object_list(decision, src=0)
            bad = decision[0]
        if bad:
            raise ValueError(f"layers {bad}: the clip gave kernels with non-finite values; no layer was clipped")
        for name, clipped in results.items():
            spec, weight = clipped_now[name], modules[name].weight
            if distributed:  # every rank takes part, whether or not its own clip found work
                clipped = weight.detach().clone() if clipped is None else clipped.to(weight.device)
                dist.broadcast(clipped, src=0)
            if clipped is not None:
                weight.copy_(clipped)
            if self.report:  # at the size it was clipped at
                size = clip_input_size(spec, self.input_size)
                self.last_norms[name] = conv_spectral_norm(
                    weight, size, groups=spec.groups, dilation=spec.dilation, **self._options
                )
        self.last_report = ClipReport(layers, layers_clipped, frequencies, frequencies_clipped)
        if self.report:  # the layers of this clip only (one frozen since is not in it)
            self.last_norms = {name: norm for name, norm in self.last_norms.items() if name in clipped_now}
        self.clips += 1

    def remove(self) -> None:
        """Remove the step hook, and the forward hooks that record input sizes."""
        self._handle.remove()
        if self._recorder is not None:
            self._recorder.remove()

    def state_dict(self) -> dict:
        """``{"steps": ..., "clips": ...}``: the optimizer steps counted and the clips done, so that a
        resumed run clips at the same steps."""
        return {"steps": self.steps, "clips": self.clips}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved; a state that is refused changes neither count."""
        counts = {key: state.get(key) if isinstance(state, dict) else None for key in ("steps", "clips")}
        bad = {k: v for k, v in counts.items() if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0}
        if bad:
            raise ValueError(f"PeriodicSVC.load_state_dict: steps and clips must be whole numbers >= 0, got {bad}")
        self.steps, self.clips = int(counts["steps"]), int(counts["clips"])
