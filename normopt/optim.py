"""NormDecayOptimizer: norm decay on top of any torch.optim optimizer, as a drop-in replacement."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from normopt.regularizer import NormDecay, check_group


def _requires_closure(optimizer: torch.optim.Optimizer) -> bool:
    closure = inspect.signature(type(optimizer).step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def _inner(name: str) -> property:
    """The inner optimizer's attribute ``name``, read and written through: torch's
    ``load_state_dict`` replaces the inner ``param_groups`` and ``state`` objects, so a reference
    taken once would go stale when the inner optimizer is loaded directly. Until the inner
    optimizer is attached (inside ``Optimizer.__init__``) the wrapper keeps its own."""
    own = f"_own_{name}"

    def get(self):
        inner = self.__dict__.get("optimizer")
        return getattr(inner, name) if inner is not None else self.__dict__[own]

    def set(self, value):
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__[own] = value

    return property(get, set, doc=f"The inner optimizer's ``{name}``.")


class NormDecayOptimizer(torch.optim.Optimizer):
    r"""Wraps ``optimizer`` and adds norm-decay gradients before each of its steps.

    Replace ``opt = SGD(model.parameters(), ...)`` with
    ``opt = NormDecayOptimizer(SGD(model.parameters(), ...), model)`` and change nothing else:
    ``param_groups`` and ``state`` *are* the inner optimizer's (so LR schedulers, GradScaler and
    ``add_param_group`` act on it), the decay buffers live in ``state[weight]`` under
    ``"norm_decay_buffer"`` and ``"norm_decay_scale"`` (and, with ``rule="paper"``, where a large layer's slices
    are rows — l_inf norms, l1 of transposed convolutions — the channels of its recent slices under
    ``"norm_decay_recent"``), and ``state_dict()`` is the inner one.
    ``beta`` and ``gamma`` are written into every param group as ``"norm_decay_beta"`` and
    ``"norm_decay_gamma"``, like ``weight_decay``: change them between steps, by hand or by a
    scheduler, per group. Under ``torch.compile(opt.step)`` a 0-d tensor beta
    (``beta=torch.tensor(1e-3)``, changed in place with ``fill_``) never recompiles the step, as
    torch.optim's tensor ``lr``; a gamma shared by the groups recompiles it once, at its first
    change; a float beta, or gammas that differ between groups, at every new value (as
    torch.optim's float ``lr``).

    With the default ``rule="paper"`` (Algorithm 1 of Liang & Huang, 2021) each step does, for
    each of the N regularized layers (frozen ones the optimizer holds counted too) with weight W
    and subgradient p of its norm,
    :math:`h \leftarrow \gamma h + (1-\gamma) p` and :math:`\nabla W \mathrel{+}= (\beta/N) h`;
    ``rule="reference"`` reproduces the released code: :math:`h \leftarrow \gamma h`, the arg-max
    line of h set to p, :math:`\nabla W \mathrel{+}= \beta h`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` holding the model's parameters.
        model: the model (DDP, DataParallel and torch.compile wrappers are looked through).
        ord: ``1``/``"l1"`` or ``float("inf")``/``"linf"``.
        beta: strength (>= 0; a number or a 0-d floating-point tensor), the param groups' default
            ``"norm_decay_beta"``.
        gamma: decay factor of the buffer h, in [0, 1], the default ``"norm_decay_gamma"``.
        rule: ``"paper"`` or ``"reference"``.
        layers: kinds to regularize, from ``"conv"``, ``"linear"``, ``"batchnorm"``.
        exclude: module names to leave alone, each with every layer inside it (``("layer1",)``
            leaves all of ``layer1``); the ``module.``/``_orig_mod.`` prefixes of a DDP or compiled
            model may be kept.
        max_norm: after each step, project every regularized conv/linear layer's rows (l_inf) or
            columns (l1) onto the l1 ball of this radius.
        bn_max_norm: cap every batch norm's norm at this radius (the reference code uses 5).
        bn_projection: ``"exact"`` (after each step, clip every channel: the exact projection) or
            ``"released"`` (before each step, after the decay, set only the arg-max channel to the
            radius, as the released code does).
        example_input: input for one probe forward that records conv input sizes; without it
            they are recorded from the first training forward (hooks, no extra pass).

    Attributes:
        last_norms: ``{layer name: norm}`` computed at the last step, of the weights it started from
            (0-d tensors, no host sync).
        norm_decay: the :class:`normopt.NormDecay` that does the work.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        >>> opt = NormDecayOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ord="linf", beta=1e-2)
        >>> loss = model(torch.randn(8, 1, 4, 4)).square().mean()
        >>> loss.backward()
        >>> opt.step()
        >>> sorted(opt.last_norms), opt.param_groups[0]["norm_decay_beta"]
        (['0', '3'], 0.01)
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, model: nn.Module, *, ord=1, beta: float | torch.Tensor = 1e-3, **options
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, NormDecayOptimizer):
            raise TypeError("optimizer is already a NormDecayOptimizer")
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.norm_decay = NormDecay(optimizer, model, ord=ord, beta=beta, **options)
        # Optimizer.__init__ sets up the hook dictionaries torch >= 2.0 expects; the groups and
        # state it builds are then superseded by the inner optimizer's (read through, below).
        super().__init__(params, optimizer.defaults)
        self.optimizer = optimizer
        self._closure_required = _requires_closure(optimizer)

    param_groups = _inner("param_groups")
    state = _inner("state")
    defaults = _inner("defaults")

    def __getattr__(self, name: str):
        # Only for names the wrapper lacks: the inner optimizer's own public methods and
        # attributes (ZeroRedundancyOptimizer's consolidate_state_dict), so that the wrapper
        # replaces it there too. Private names are not passed on: GradScaler takes an optimizer
        # with _step_supports_amp_scaling to unscale inside its own step, which the wrapper's
        # step does not.
        inner = self.__dict__.get("optimizer")
        missing = f"{type(self).__name__!r} object has no attribute {name!r}"
        if inner is None or name.startswith("_"):
            raise AttributeError(missing)
        try:
            return getattr(inner, name)
        except AttributeError:
            raise AttributeError(f"{missing} (nor has its inner {type(inner).__name__})") from None

    # Copies (copy.deepcopy, and a scheduler's deepcopy that previews its schedule) take the whole
    # wrapper: torch.optim.Optimizer's own pair keeps only defaults, state and param_groups,
    # which the wrapper reads from its inner optimizer. Like torch's, they leave out the ``step``
    # an LR scheduler binds onto the instance: it calls the original through a weak reference.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # torch copies the inner optimizer without its hooks: the copy's checkpoints need them.
        hooks = getattr(self.optimizer, "_optimizer_load_state_dict_pre_hooks", {}).values()
        if not self.norm_decay._detached and not any(getattr(hook, "__self__", None) is self.norm_decay for hook in hooks):
            self.norm_decay._handles += self.norm_decay._hook_optimizer()

    @property
    def last_norms(self) -> dict[str, torch.Tensor]:
        return self.norm_decay.last_norms  # documented under the class's Attributes

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the inner optimizer (with ``norm_decay_beta``/``gamma`` from the defaults
        unless it sets them) and describe its layers for norm decay."""
        if "optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        check_group(param_group, "the param group added")  # before the inner optimizer takes it
        self.optimizer.add_param_group(param_group)  # fills norm_decay_beta/gamma from the defaults
        self.norm_decay.add_params()

    def step(self, closure=None):
        """Evaluate ``closure`` once (if given), add norm decay, step the inner optimizer, project.

        An inner optimizer that requires a closure and re-evaluates it (LBFGS) gets one that runs
        ``closure`` and then adds the decay, so no evaluation's gradient lacks it; ``h`` then
        advances once per evaluation (``gamma`` counts evaluations, not steps). Norm decay is no
        loss's gradient (``h`` is a running sum of subgradients), so a line search
        (``line_search_fn="strong_wolfe"``) checks its conditions with the closure's loss, which has
        no decay term, against gradients that hold the decay. As with the inner
        optimizer, the gradients stay as the step used them: the decay is in ``.grad`` after the
        step (a gradient-norm logged after it includes it, and a second step on the same
        gradients adds it again). Step hooks
        registered on the wrapper run around all of it; torch's global step hooks run once, around
        the inner optimizer's step (so after a closure that the wrapper evaluates itself, and with
        the decay in the gradients).
        """
        # torch hooks every optimizer class's step with the instance's and the global step hooks;
        # the inner step runs the global ones already, so this one runs the wrapper's own only.
        with torch.autograd.profiler.record_function("Optimizer.step#NormDecayOptimizer.step"):
            args, kwargs = ((self,) if closure is None else (self, closure)), {}
            for pre_hook in self._optimizer_step_pre_hooks.values():
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"a step pre-hook must return None or (new_args, new_kwargs), got {result}")
                    args, kwargs = result
            loss = self._step(*args[1:], **kwargs)
            self._optimizer_step_code()
            for post_hook in self._optimizer_step_post_hooks.values():
                post_hook(self, args, kwargs)
            return loss

    step.hooked = True  # read by Optimizer.__init__: the class's step is hooked already

    @torch.no_grad()
    def _step(self, closure=None):
        if self._closure_required:
            if closure is None:
                raise ValueError(f"{type(self.optimizer).__name__} needs a closure: call step(closure)")

            def decayed_closure():
                with torch.enable_grad():
                    loss = closure()
                self.norm_decay.before_step()
                return loss

            loss = self.optimizer.step(decayed_closure)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.norm_decay.before_step()
            # Without the closure, so the inner optimizer cannot overwrite the decayed gradients.
            self.optimizer.step()
        self.norm_decay.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The inner optimizer's state dict, which holds the decay buffers and ``beta``/``gamma``.

        State-dict hooks registered on the wrapper run around it, as on any torch optimizer.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            changed = post_hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the inner optimizer's state dict; all or nothing.

        Also accepts a plain inner dict (the decay buffers start from zero, and each param group
        keeps the ``norm_decay_beta`` and ``norm_decay_gamma`` it had) and the checkpoints of
        normopt 0.1, which kept the buffers under an extra ``"norm_decay"`` key.
        """
        state_dict = dict(state_dict)  # never change the caller's checkpoint
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():  # the wrapper's own, as torch runs them
            changed = pre_hook(self, state_dict)
            if changed is not None:
                state_dict = changed
        legacy = state_dict.pop("norm_decay", None)
        buffers = dict((legacy or {}).get("buffers", {}))
        self.norm_decay.check_buffers(buffers)  # before anything changes
        inner = self.optimizer
        before = {"state": inner.state, "param_groups": inner.param_groups}
        try:
            inner.load_state_dict(state_dict)
        except BaseException:
            # torch puts new state and param groups in place before a subclass's __setstate__ may
            # still refuse them (Adam's, given an SGD checkpoint without "step"), leaving groups
            # without their betas; it builds new objects, so the old ones are as they were.
            inner.__dict__.update(before)
            raise
        if buffers:
            self.norm_decay.load_buffers(buffers)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        decay = self.norm_decay
        return f"NormDecayOptimizer({self.optimizer!r}, ord={decay.ord}, rule={decay.rule!r})"
