"""NormDecay: the state norm decay keeps for one model (specs, decay buffers, last norms).

:class:`normopt.NormDecayOptimizer` wraps an optimizer around it; :func:`attach_norm_decay` hooks
it onto an optimizer that cannot be replaced (ZeRO, Accelerate, fused optimizers). Every tensor
computation is a pure function from :mod:`normopt.decay` and :mod:`normopt.projection`; this class
only remembers things between steps, and never reads a tensor value back to the host during a step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from normopt.decay import norm_subgradient, paper_update, reference_update
from normopt.discovery import InputSizeRecorder, layer_specs, unwrap
from normopt.norms import parse_ord
from normopt.projection import check_projectable, project_batchnorm, project_layer
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec

KINDS = {"conv": ConvSpec, "linear": LinearSpec, "batchnorm": BatchNormSpec}
# (buffer update, whether beta is divided by the number of regularized layers)
RULES = {"paper": (paper_update, True), "reference": (reference_update, False)}


def _refuse_sharded(model: nn.Module) -> None:
    """Operator norms of parameter shards are wrong: refuse FSDP (flat or DTensor shards)."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel" or kind.startswith("FSDP"):  # FSDP1, or FSDP2's FSDP<Module>
            raise NotImplementedError(
                f"module {type(module).__name__} shards its parameters (FSDP); operator norms of shards are "
                "not the layers' norms. Use DistributedDataParallel, or gather full weights first."
            )
    for name, param in model.named_parameters():
        if type(param).__name__ == "DTensor" or type(getattr(param, "data", None)).__name__ == "DTensor":
            raise NotImplementedError(f"parameter {name!r} is a DTensor shard (FSDP2); norm decay needs whole weights")


class _NonFiniteReporter:
    """Warns once per layer whose weights were non-finite, without synchronising the device.

    On CUDA the flags are copied to pinned host memory without blocking and read one step later,
    when the copy has finished; CPU flags are read at once.
    """

    def __init__(self):
        self._pending: list[tuple[list[str], torch.Tensor, object]] = []
        self.warned: set[str] = set()

    def push(self, names: list[str], finite: torch.Tensor) -> None:
        if finite.device.type == "cpu":
            self._report(names, finite)
            return
        host = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((names, host, event))
        self._pending = [item for item in self._pending if not self._ready(item)]

    def _ready(self, item) -> bool:
        names, host, event = item
        if not event.query():
            return False
        self._report(names, host)
        return True

    def _report(self, names: list[str], finite: torch.Tensor) -> None:
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok and name not in self.warned]
        if bad:
            self.warned.update(bad)
            warnings.warn(f"norm decay skipped layers {bad}: their weights are not finite (NaN or inf)", stacklevel=4)


class NormDecay:
    r"""Norm-decay state for one model, applied around an optimizer's step.

    Before the step, :meth:`add_to_gradients` adds to each regularized weight's gradient the
    decayed subgradient of the layer's l1 or l_inf norm; after it, :meth:`project` applies the
    optional caps. See :class:`normopt.NormDecayOptimizer` for the options.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
        >>> decay = NormDecay(model, model.parameters(), beta=0.1)
        >>> model(torch.randn(4, 1, 3, 3)).sum().backward()
        >>> decay.add_to_gradients()
        >>> sorted(decay.last_norms)
        ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[torch.Tensor],
        *,
        ord=1,
        beta: float = 1e-3,
        gamma: float = 0.5,
        rule: str = "paper",
        layers: Iterable[str] = ("conv", "linear"),
        exclude: Iterable[str] = (),
        max_norm: float | None = None,
        bn_max_norm: float | None = None,
        example_input=None,
    ):
        self.ord = parse_ord(ord)
        if self.ord not in (1, math.inf):
            raise ValueError(f"norm decay supports ord 1 ('l1') and inf ('linf'), not {ord!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not (isinstance(gamma, (int, float)) and 0 <= gamma <= 1):
            raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {sorted(RULES)}")
        layers = tuple(layers)
        unknown = [kind for kind in layers if kind not in KINDS]
        if unknown:
            raise ValueError(f"unknown layer kinds {unknown}; expected some of {sorted(KINDS)}")
        for option, value in (("max_norm", max_norm), ("bn_max_norm", bn_max_norm)):
            if value is not None and not value > 0:
                raise ValueError(f"{option} must be positive, got {value!r}")
        self.model = unwrap(model)
        _refuse_sharded(self.model)
        self.beta, self.gamma, self.rule = float(beta), float(gamma), rule
        self.kinds = tuple(KINDS[kind] for kind in layers)
        self.exclude = frozenset(exclude)
        self.max_norm, self.bn_max_norm = max_norm, bn_max_norm
        names = {name for name, _ in self.model.named_modules()}
        missing = sorted(self.exclude - names)
        if missing:
            raise ValueError(f"exclude names {missing} are not modules of the model")
        self._params: set[int] = set()
        self.add_params(params)
        self._select(layer_specs(self.model, example_input))
        if not self.decayed and not self.bn_projected:
            raise ValueError(
                f"no layer to regularize: none of the model's {'/'.join(layers)} layers has its weight in the "
                f"optimizer (skipped modules: {self.skipped})"
            )
        # Hooks go on the user's model only once nothing can fail any more.
        self._recorder = None if example_input is not None else InputSizeRecorder(self.model)
        self.buffers: dict[str, torch.Tensor] = {}
        self.last_norms: dict[str, torch.Tensor] = {}
        self._reporter = _NonFiniteReporter()
        self._handles: list = []

    def add_params(self, params: Iterable[torch.Tensor]) -> None:
        """Allow norm decay to change these parameters (those the optimizer updates)."""
        params = list(params)
        model_params = {id(p) for p in self.model.parameters()}
        if not model_params & {id(p) for p in params} and not model_params & self._params:
            raise ValueError("the optimizer holds none of the model's parameters: pass model.parameters() to it")
        self._params.update(id(p) for p in params)
        if hasattr(self, "specs"):
            self._select(self.specs)

    def _select(self, specs) -> None:
        """Split the model's layers into those decayed, those projected and those left alone."""
        self.specs = specs
        modules = dict(self.model.named_modules())
        self.skipped = dict(getattr(specs, "skipped", {}))
        self.decayed, self.bn_projected = {}, {}
        for name, spec in specs.items():
            weight = getattr(modules[name], "weight", None)
            if name in self.exclude:
                continue
            if weight is None:
                self.skipped[name] = "no affine weight to regularize"
                continue
            if id(weight) not in self._params:
                self.skipped[name] = "weight is not a parameter of the optimizer"
                continue
            if isinstance(spec, self.kinds):
                if self.max_norm is not None and not isinstance(spec, BatchNormSpec):
                    check_projectable(spec, self.ord)  # refuse now, not half-way through a step
                self.decayed[name] = spec
            if isinstance(spec, BatchNormSpec) and self.bn_max_norm is not None:
                self.bn_projected[name] = spec
        self._modules = modules
        update, per_layer = RULES[self.rule]
        self._update = update
        self.scale = self.beta / max(len(self.decayed), 1) if per_layer else self.beta

    def _tensors(self, spec) -> dict[str, torch.Tensor]:
        module = self._modules[spec.name]
        tensors = {spec.weight: module.weight}
        if isinstance(spec, BatchNormSpec):
            tensors[spec.running_var] = module.running_var
        return tensors

    def _refresh_specs(self) -> None:
        # Lazy discovery: once the user's own forward has run, rebuild the specs with its input sizes.
        if self._recorder is not None and self._recorder.called:
            specs, self._recorder = self._recorder.specs(), None
            self._select(specs)

    @torch.no_grad()
    def add_to_gradients(self) -> None:
        """Update the decay buffers from the current weights and add them to the gradients."""
        self._refresh_specs()
        names, finite = [], []
        for name, spec in self.decayed.items():
            weight = self._modules[name].weight
            if weight.grad is None:
                continue  # parameters without a gradient are left alone
            sub = norm_subgradient(self._tensors(spec), spec, self.ord)
            # A layer with non-finite weights is skipped through 0-d factors: h stays, nothing is
            # added, and no full-size select runs (one pass over h and one over the gradient).
            ok = torch.isfinite(sub.norm)
            old = self.buffers.get(name)
            h = self._update(
                old if old is not None else torch.zeros_like(weight), sub.masked(ok), torch.where(ok, self.gamma, 1.0)
            )
            self.buffers[name] = h
            weight.grad.addcmul_(h, torch.where(ok, self.scale, 0.0))
            self.last_norms[name] = sub.norm
            names.append(name)
            finite.append(ok)
        if finite:
            self._reporter.push(names, torch.stack(finite))

    @torch.no_grad()
    def project(self) -> None:
        """Apply the optional caps (``max_norm``, ``bn_max_norm``) to the weights, in place."""
        if self.max_norm is not None:
            for spec in self.decayed.values():
                if isinstance(spec, BatchNormSpec):
                    continue
                weight = self._modules[spec.name].weight
                capped = project_layer(weight, spec, self.ord, self.max_norm)
                weight.copy_(torch.where(torch.isfinite(capped), capped, weight))
        for spec in self.bn_projected.values():
            module = self._modules[spec.name]
            capped = project_batchnorm(module.weight, module.running_var, spec, self.bn_max_norm)
            module.weight.copy_(torch.where(torch.isfinite(capped), capped, module.weight))

    def detach(self) -> None:
        """Remove the step hooks installed by :func:`attach_norm_decay`, if any."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        """The decay buffers, keyed by layer name (tensors are not copied, as in torch.optim)."""
        return {"buffers": dict(self.buffers), "rule": self.rule}

    def load_state_dict(self, state: dict) -> None:
        """Restore decay buffers; checks every buffer before changing anything."""
        buffers = dict(state.get("buffers", {}))
        for name, h in buffers.items():
            if name not in self.decayed:
                raise ValueError(f"checkpoint has a decay buffer for layer {name!r}, which is not regularized here")
            weight = self._modules[name].weight
            if tuple(h.shape) != tuple(weight.shape):
                raise ValueError(f"decay buffer of layer {name!r} has shape {tuple(h.shape)}, the weight {tuple(weight.shape)}")
        if state.get("rule", self.rule) != self.rule:
            warnings.warn(f"checkpoint was written with rule {state['rule']!r}, resuming with {self.rule!r}", stacklevel=2)
        self.buffers = {
            name: h.detach().to(device=self._modules[name].weight.device, dtype=self._modules[name].weight.dtype, copy=True)
            for name, h in buffers.items()
        }


def attach_norm_decay(optimizer: torch.optim.Optimizer, model: nn.Module, **options) -> NormDecay:
    """Add norm decay to an existing optimizer through its step hooks, without replacing it.

    For optimizers that cannot be swapped for :class:`normopt.NormDecayOptimizer` (ZeRO, Accelerate,
    fused). The pre-hook runs before the optimizer evaluates a closure, so closures are refused;
    save ``decay.state_dict()`` next to the optimizer's own. Call ``decay.detach()`` to remove it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> decay = attach_norm_decay(optimizer, model, beta=0.01)
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> optimizer.step()
        >>> list(decay.last_norms)
        ['']
        >>> decay.detach()
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    decay = NormDecay(model, params, **options)

    def before(_optimizer, args, kwargs):
        # torch passes (optimizer, *step_args): anything after the optimizer is a closure.
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RuntimeError("attach_norm_decay cannot run with a closure: use NormDecayOptimizer instead")
        decay.add_to_gradients()

    decay._handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(lambda *_: decay.project())]
    return decay
