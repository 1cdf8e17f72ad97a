"""Walk a model and describe each of its linear pieces as a spec."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.utils import parametrize

from normopt.specs import BatchNormSpec, LinearSpec, Spec, conv_spec, padding_pairs, pads_with_copies

# Modules that hold weights but are not linear maps of their input, with the reason.
_NOT_LINEAR = {
    nn.LayerNorm: "normalises each sample by its own statistics: not a linear map",
    nn.GroupNorm: "normalises each sample by its own statistics: not a linear map",
    _InstanceNorm: "normalises each sample by its own statistics: not a linear map",
    nn.LocalResponseNorm: "divides by a function of the input: not a linear map",
    nn.MultiheadAttention: "attention is not a linear map of its input",
    nn.Embedding: "a table lookup on integer indices, not a linear map",
    nn.EmbeddingBag: "a table lookup on integer indices, not a linear map",
    nn.Bilinear: "bilinear in its two inputs, not a linear map",
    nn.PReLU: "an activation with a learned slope, not a linear map",
    nn.RNNBase: "a recurrent network, not a single linear map",
}
if hasattr(nn, "RMSNorm"):
    _NOT_LINEAR[nn.RMSNorm] = "normalises each sample by its own statistics: not a linear map"

# Wrappers whose parameters live under ``.module`` (DDP, DataParallel) or ``._orig_mod``
# (torch.compile); their names carry that prefix in ``state_dict`` keys.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every module of ``model`` (a shared module has several) -> the name
    ``model.named_modules()`` lists it under, its first."""
    canonical = {id(module): name for name, module in model.named_modules()}
    return {name: canonical[id(module)] for name, module in model.named_modules(remove_duplicate=False)}


def module_names(value, what: str, model: nn.Module) -> frozenset[str]:
    """``value`` (an iterable of module names of ``model``) as a set of the names ``model`` itself
    gives them, or a clear error.

    Names may carry the prefixes of the wrappers ``model`` was unwrapped from (``module.`` of DDP,
    ``_orig_mod.`` of ``torch.compile``, as the wrapper's ``named_modules()`` lists them), and a
    module shared under two names may be named by either. Refused: a lone string (which would be
    iterated letter by letter), a non-string entry, a name that is no module of ``model``, and
    the empty name (the whole model).
    """
    if isinstance(value, str):
        raise TypeError(
            f"{what} must be an iterable of module names, not the string {value!r}; did you mean {what}=({value!r},)?"
        )
    if not isinstance(value, Iterable):
        raise TypeError(f"{what} must be an iterable of module names, got {value!r}")
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{what} must hold module names (strings), got {bad}")
    known = canonical_names(model)

    def resolve(name: str) -> str | None:
        while name not in known:
            # "module" alone is the wrapper's name for the whole model, like "module." + "".
            prefix = next((p for p in WRAPPER_PREFIXES if (name + ".").startswith(p)), None)
            if prefix is None:
                return None
            name = name[len(prefix) :]
        return known[name]

    resolved = {name: resolve(name) for name in names}
    missing = sorted(name for name, found in resolved.items() if found is None)
    if missing:
        raise ValueError(f"{what} names {missing} are not modules of the model")
    whole = sorted(name for name, found in resolved.items() if found == "")
    if whole:
        raise ValueError(f"{what} names the whole model ({', '.join(map(repr, whole))}), which would leave no layer")
    return frozenset(resolved.values())


def within(name: str, modules: frozenset[str]) -> bool:
    """Whether module ``name`` is one of ``modules`` or inside one (``"layer1"`` holds ``"layer1.0.conv1"``).

    Example:
        >>> within("layer1.0.conv1", frozenset({"layer1"})), within("layer10", frozenset({"layer1"}))
        (True, False)
    """
    return any(name == m or name.startswith(m + ".") for m in modules)


class LayerSpecs(dict):
    """``{module name: spec}`` of a model's linear pieces, in module order.

    Attributes:
        skipped: ``{module name: reason}`` for every module that holds weights or is a
            normalisation but has no operator norm here (LayerNorm, attention, batch norm without
            running statistics, parametrized weights, ...).
        device_tables: index tables that :func:`normopt.layer_norms` built for these specs, per
            norm order, device and dtype, kept so that no later call copies them to the device
            again. Not pickled or copied.
    """

    def __init__(self, specs=(), skipped=None):
        super().__init__(specs)
        self.skipped: dict[str, str] = dict(skipped or {})
        self.device_tables: dict = {}

    def __reduce__(self):
        return type(self), (dict(self), self.skipped)

    def __repr__(self) -> str:
        return f"LayerSpecs({dict.__repr__(self)}, skipped={self.skipped!r})"


def wrappers(model: nn.Module):
    """``model``, then each module inside its DDP, DataParallel and ``torch.compile`` wrappers, in
    any order, outermost first (the user's module last).

    Example:
        >>> from torch import nn
        >>> inner = nn.Linear(2, 2)
        >>> [type(m).__name__ for m in wrappers(nn.DataParallel(inner))]
        ['DataParallel', 'Linear']
    """
    while True:
        yield model
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel or ``torch.compile`` wrappers (:func:`wrappers`).

    Example:
        >>> from torch import nn
        >>> inner = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(inner)) is inner
        True
    """
    if not isinstance(model, nn.Module):
        hint = ": pass the model itself, not its state_dict()" if isinstance(model, Mapping) else ""
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    *_, model = wrappers(model)
    if isinstance(model, torch.jit.ScriptModule):  # its submodules hide their parameters' dicts
        raise TypeError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or trace): normopt describes "
            "the nn.Module layers, so pass the model before scripting it (its state_dict keys are the same)"
        )
    return model


_BATCHNORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _is_frozen_batchnorm(module: nn.Module) -> bool:
    """A batch norm that is always in eval mode: weight, bias, running_mean and running_var as buffers
    of one length and an ``eps``, no learned parameters (``torchvision.ops.FrozenBatchNorm2d`` and kin)."""
    if isinstance(module, _BatchNorm) or list(module.parameters(recurse=False)):
        return False
    own = dict(module.named_buffers(recurse=False))
    if not all(isinstance(own.get(name), torch.Tensor) and own[name].dim() == 1 for name in _BATCHNORM_BUFFERS):
        return False
    eps = getattr(module, "eps", None)  # a number (eps=0 is an int), not a bool
    return (
        len({own[name].numel() for name in _BATCHNORM_BUFFERS}) == 1
        and isinstance(eps, (int, float))
        and not isinstance(eps, bool)
    )


def _normalises_by_running_statistics(module: nn.Module) -> bool:
    """A batch norm, or an instance norm with ``track_running_stats=True``, which in eval mode too
    divides by its running variance: one fixed diagonal map, like a batch norm's."""
    return isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats)


def _quantized(module: nn.Module) -> bool:
    """A converted quantized layer (``torch.ao.nn.quantized``, dynamic ones too): its weights are
    packed into a C++ object, neither parameters nor buffers."""
    try:
        from torch.ao.nn.quantized.modules.utils import WeightedQuantizedModule
    except ImportError:  # pragma: no cover - torch without quantization
        return False
    return isinstance(module, WeightedQuantizedModule)


# Where the stock layers apply their weight; a subclass may override these.
_APPLY_METHODS = ("forward", "_conv_forward")


class OverriddenForwardWarning(UserWarning):
    """:func:`layer_specs` describes a layer whose class overrides how the stock layer applies its
    weight (:func:`overridden_forward`). Its own category, so that it can be filtered:
    ``warnings.filterwarnings("ignore", category=normopt.OverriddenForwardWarning)``."""


def overridden_forward(module: nn.Module) -> str | None:
    """``"Class.method"`` where a subclass of a stock Linear, conv or batch norm overrides how the
    layer applies its weight (outside ``torch.nn``), or None.

    Such a layer is described as the stock one, by its ``weight`` parameter and its attributes,
    which is right where it changes only its input (a mask, a keyword) but wrong where it applies
    another weight (weight standardisation, fake quantization) or pads inside ``forward`` (timm's
    ``Conv2dSame``): :func:`layer_specs` warns, naming them.

    Example:
        >>> class StdConv(nn.Conv2d):
        ...     def forward(self, x):
        ...         w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        ...         return self._conv_forward(x, w, self.bias)
        >>> overridden_forward(StdConv(1, 1, 3)), overridden_forward(nn.Conv2d(1, 1, 3))
        ('StdConv.forward', None)
    """
    if not (isinstance(module, (nn.Linear, _ConvNd)) or _normalises_by_running_statistics(module)):
        return None
    for method in _APPLY_METHODS:
        owner = next((c for c in type(module).__mro__ if method in vars(c)), None)
        if owner is not None and not owner.__module__.startswith("torch.nn.modules."):
            return f"{owner.__qualname__}.{method}"
    return None


def overriding_message(cls: type, method: str, names: list[str]) -> str:
    """What :class:`OverriddenForwardWarning` says of layers ``names`` of class ``cls``."""
    kinds = (nn.Linear, _ConvNd, _BatchNorm, _InstanceNorm)
    stocks = [c.__name__ for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules.") and issubclass(c, kinds)]
    # The public stock class, else torch's private base by the name of its kind (_ConvNd: Conv).
    stock = next((name for name in stocks if name[0] != "_"), stocks[0].lstrip("_").removesuffix("Nd"))
    return (
        f"layers {names} are {cls.__module__}.{cls.__qualname__}, whose {method} overrides nn.{stock}'s: they are "
        f"described as nn.{stock} applies its weight parameter; where {method} applies another weight or pads by "
        "itself, describe the layer with normopt.module_spec and pass the weight it applies"
    )


def _described(module: nn.Module) -> bool:
    """Whether ``module`` is of a kind that has a spec (if nothing else rules it out)."""
    return isinstance(module, (nn.Linear, _ConvNd)) or _normalises_by_running_statistics(module) or _is_frozen_batchnorm(module)


def _weight_reason(module: nn.Module) -> str | None:
    """Why the module's weight is not the parameter under its name, or None."""
    if _described(module) and parametrize.is_parametrized(module, "weight"):
        return (
            f"{type(module).__name__}: weight is parametrized (torch.nn.utils.parametrize); describe it with "
            "normopt.module_spec(module, name, input_size) and compute its norm from the weight it computes with "
            "normopt.layer_norm({**model.state_dict(), name + '.weight': module.weight}, spec)"
        )
    normalises = _normalises_by_running_statistics(module) or _is_frozen_batchnorm(module)
    if normalises and parametrize.is_parametrized(module, "running_var"):
        return (
            f"{type(module).__name__}: running_var is parametrized (torch.nn.utils.parametrize); describe it with "
            "normopt.module_spec and pass the running_var it computes"
        )
    # A batch norm without affine weights keeps the key, as None; a hook-computed weight removes it.
    computed = not isinstance(module._parameters.get("weight"), torch.Tensor)
    if (isinstance(module, (nn.Linear, _ConvNd)) and computed) or (
        _normalises_by_running_statistics(module) and "weight" not in module._parameters
    ):
        return f"{type(module).__name__}: weight is computed by a forward hook (e.g. weight_norm), not a parameter"
    return None


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning given by the caller at the first frame outside
    normopt and torch (the user's line), however deep the call came: from a constructor, from an
    optimizer's hooks or from a wrapper's step."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("normopt", "torch", "contextlib"):
        frame, level = frame.f_back, level + 1
    return level


@contextlib.contextmanager
def quiet_overriding():
    """:func:`layer_specs` without its :class:`OverriddenForwardWarning`, for a caller that names the
    layers it acts on itself (:func:`warn_overriding`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="layers ", category=OverriddenForwardWarning)  # not the caller's own
        yield


def warn_overriding(modules: Mapping[str, nn.Module], warned: frozenset = frozenset(), acting: str | None = None) -> frozenset:
    """Warn of the layers of ``modules`` whose class overrides how the stock layer applies its
    weight, once per layer and class: ``warned`` holds the ``(layer, class)`` pairs named before;
    returns it with the new ones. ``acting``: what a caller does to them (e.g. "norm decay
    regularizes"); None for :func:`layer_specs`, which describes them."""
    groups: dict[tuple, list[str]] = {}
    for name, module in modules.items():
        method = overridden_forward(module)
        if method is not None and (name, type(module)) not in warned:
            groups.setdefault((type(module), method), []).append(name)
    for (cls, method), names in groups.items():
        warned = warned | {(name, cls) for name in names}
        message = overriding_message(cls, method, names)
        if acting is not None:
            message = f"{acting} them as described: {message} (or exclude them: exclude={tuple(names)!r})"
        warnings.warn(message, OverriddenForwardWarning, stacklevel=user_stacklevel())
    return warned


def hidden_linear_pieces(model: nn.Module, skipped) -> list[str]:
    """The layers of ``skipped`` (:attr:`LayerSpecs.skipped`) that are linear maps whose weight the
    model does not hold as a parameter (parametrized, computed by a hook, quantized, TorchScript):
    left out of a model's norms, unlike a LayerNorm, they leave a gap worth a warning.

    Example:
        >>> model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(2, 2)), nn.LayerNorm(2))
        >>> hidden_linear_pieces(model, layer_specs(model).skipped)
        ['0']
    """
    modules = dict(unwrap(model).named_modules())

    def hidden(module: nn.Module) -> bool:
        if isinstance(module, torch.jit.ScriptModule):  # first: it has no _parameters dict to look at
            # Weightless parts (activations, dropout) hide nothing; nor do the kinds that are no linear map.
            kind = getattr(nn, getattr(module, "original_name", ""), None)
            not_linear = isinstance(kind, type) and issubclass(kind, tuple(_NOT_LINEAR)) and not issubclass(kind, _InstanceNorm)
            return not not_linear and any(True for _ in (*module.parameters(), *module.buffers()))
        return _quantized(module) or _weight_reason(module) is not None

    return [name for name in skipped if name in modules and hidden(modules[name])]


def _skip_reason(module: nn.Module, computed_weight: bool = False) -> str | None:
    """Why ``module`` gets no spec, or None. ``computed_weight``: describe a layer whose weight is
    parametrized or hook-computed (:func:`module_spec`, given that weight by the caller)."""
    if isinstance(module, torch.jit.ScriptModule):  # its submodules hide their parameters' dicts
        return (
            f"{type(module).__name__}: a TorchScript module (torch.jit.script or trace) hides its layers; "
            "describe the model before scripting its parts"
        )
    if _quantized(module):
        return (
            f"{type(module).__name__}: a converted quantized layer (torch.ao.nn.quantized) keeps its weights packed, "
            "not as parameters; describe the float model before converting it"
        )
    for kind, reason in _NOT_LINEAR.items():
        if isinstance(module, kind) and not _normalises_by_running_statistics(module):
            return f"{type(module).__name__}: {reason}"
    reason = _weight_reason(module)
    if reason is not None and not computed_weight:
        return reason
    if _normalises_by_running_statistics(module) and module.running_var is None:
        return (
            f"{type(module).__name__}: no running statistics (track_running_stats=False), so the layer "
            "normalises by batch statistics and is not one fixed linear map"
        )
    if _described(module):
        return None
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if own:
        return f"{type(module).__name__}: holds its own weights but has no operator-norm rule here"
    return None


def _several_sizes(size) -> bool:
    """Whether ``size`` is a list of input sizes (of a layer called at several), not one size."""
    return isinstance(size, list) and len(size) > 0 and all(isinstance(one, (tuple, list)) for one in size)


def _check_initialised(name: str, module: nn.Module) -> None:
    # The running variance too: a lazy batch norm without affine weights has no weight to look at.
    if any(isinstance(getattr(module, a, None), nn.parameter.UninitializedTensorMixin) for a in ("weight", "running_var")):
        raise ValueError(f"layer {name!r}: lazy module is not initialised yet; run one forward pass first")


def module_spec(
    module: nn.Module,
    name: str = "",
    input_size=None,
    keys: Mapping[int, str] | None = None,
    output_padding: tuple[int, ...] | None = None,
) -> Spec:
    """Spec of one linear module (Linear, Conv*d, ConvTranspose*d, BatchNorm*d, a frozen batch norm,
    or an instance norm that tracks running statistics, which in eval mode is a batch norm).

    A layer whose weight is parametrized (``torch.nn.utils.parametrize``, e.g. spectral or weight
    norm) or computed by a forward hook is described too: its spec's weight key is
    ``name + ".weight"``, which ``model.state_dict()`` does not hold, so pass the weight it
    computes, ``{**model.state_dict(), name + ".weight": module.weight}`` (:func:`layer_specs`
    skips such layers).

    Args:
        module: the layer.
        name: its name in the model, used for tensor keys and error messages.
        input_size: spatial input size of a convolution, or None for the large-input limit.
        keys: ``{id(tensor): key}`` of the model's parameters and buffers, so shared tensors get
            the key under which the mapping passed to the norm functions holds them. Defaults to
            ``name + ".weight"`` and friends.
        output_padding: of a transposed convolution called with ``output_size=``: the padding that
            call really used (:class:`InputSizeRecorder` records it); default the module's own.

    Raises:
        TypeError: the module has no operator-norm rule; the message gives the reason.

    Example:
        >>> from torch import nn
        >>> module_spec(nn.Linear(4, 3), "fc")
        LinearSpec(name='fc', weight='fc.weight', in_features=4, out_features=3)
    """
    if _several_sizes(input_size):
        raise TypeError(f"layer {name!r}: input_size {input_size} is several sizes; a spec describes one (one per call)")
    reason = _skip_reason(module, computed_weight=True)
    if reason is None and not _described(module):
        reason = (
            f"{type(module).__name__}: holds no weights of a linear layer (Linear, Conv, ConvTranspose, BatchNorm, "
            "InstanceNorm with running statistics)"
        )
    if reason is not None:
        raise TypeError(f"layer {name!r} is not supported: {reason}")
    _check_initialised(name, module)

    def key(attr: str) -> str:
        tensor = getattr(module, attr)
        if keys is not None and id(tensor) in keys:
            return keys[id(tensor)]
        return f"{name}.{attr}" if name else attr

    if isinstance(module, nn.Linear):
        return LinearSpec(name, key("weight"), module.in_features, module.out_features)
    if isinstance(module, _ConvNd):
        return conv_spec(module, name, key("weight"), input_size, output_padding)
    affine = not _normalises_by_running_statistics(module) or module.affine
    return BatchNormSpec(
        name=name,
        weight=key("weight") if affine else None,
        running_var=key("running_var"),
        num_features=module.running_var.numel(),
        eps=float(module.eps),
    )


# Why a recorder may see no forward although one ran: its hooks are added to the modules, and a
# torch.compile'd model that has already run does not call hooks added after it compiled (dynamo
# does not guard on them).
UNRECORDED_HINT = (
    "if the model is torch.compile'd and ran before they were made, it does not call the forward hooks that "
    "record the sizes: make the decay or PeriodicSVC before its first forward, or pass example_input"
)


class InputSizeRecorder:
    """Records the spatial input size of every convolution of ``model`` from forward hooks.

    Hooks observe the user's own forward passes (no extra pass, no change to batch-norm
    statistics) until :meth:`remove` is called. A layer called with several input sizes gets the
    sorted list of them in :attr:`sizes`; :func:`layer_specs` describes it by the large-input limit
    (which bounds every size for zero padding) or, where its padding copies samples and the limit
    bounds no small size, skips it. For transposed convolutions the output size
    is recorded too, because ``forward(x, output_size=...)`` changes the layer's matrix: the padding
    that call really used is in :attr:`output_paddings`.

    Calls without gradients (an evaluation under ``torch.no_grad()`` or ``inference_mode``) count
    for a layer only where no call with gradients reached it: an evaluation at another resolution
    between the training forwards does not add its sizes to theirs (a layer refused by
    :class:`~normopt.PeriodicSVC` at its first clip, or described by the large-input limit), and
    a model only ever run without gradients is still recorded. A layer that the training forward
    also runs without gradients at another size (a stop-gradient branch through it) is described
    at the sizes of its calls with gradients only: give such a model ``input_sizes`` or
    ``example_input``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3))
        >>> recorder = InputSizeRecorder(model)
        >>> _ = model(torch.zeros(1, 1, 9, 9))
        >>> with torch.no_grad():
        ...     _ = model(torch.zeros(1, 1, 15, 15))  # an evaluation: the training forward's sizes stand
        >>> recorder.remove()
        >>> recorder.sizes
        {'0': (9, 9), '1': (4, 4)}
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        # {layer: sizes} of the calls with gradients, and of those without (see the class docstring)
        self._seen: dict[str, set[tuple[int, ...]]] = {}
        self._paddings: dict[str, set[tuple[int, ...]]] = {}
        self._seen_without_grad: dict[str, set[tuple[int, ...]]] = {}
        self._paddings_without_grad: dict[str, set[tuple[int, ...]]] = {}
        # Bound methods in partials, not closures: a deep copy (or pickle) of the model and the
        # recorder gives hooks that write into the copied recorder.
        self._handles = [
            module.register_forward_hook(functools.partial(self._record, name), with_kwargs=True)
            for name, module in self.model.named_modules()
            if isinstance(module, _ConvNd)
        ]

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for key in ("_seen_without_grad", "_paddings_without_grad"):  # a recorder pickled by an earlier version
            self.__dict__.setdefault(key, {})

    def _record(self, name: str, module: _ConvNd, args, kwargs, output) -> None:
        dims = len(module.kernel_size)
        given = args[0] if args else _input_keyword(module, kwargs)
        size = tuple(int(n) for n in given.shape[-dims:])
        graded = torch.is_grad_enabled()
        (self._seen if graded else self._seen_without_grad).setdefault(name, set()).add(size)
        if module.transposed:
            padding = _output_padding(module, size, tuple(output.shape[-dims:]))
            (self._paddings if graded else self._paddings_without_grad).setdefault(name, set()).add(padding)

    def _chosen(self, graded: dict, without: dict) -> dict:
        """Per layer, the record of its calls with gradients where there are some, else of those without."""
        return {**{name: found for name, found in without.items() if name not in self._seen}, **graded}

    @property
    def watching(self) -> bool:
        """Whether the model has convolutions whose input sizes it records (and its hooks are on)."""
        return bool(self._handles)

    @property
    def called(self) -> bool:
        """Whether any convolution has run since the recorder was made."""
        return bool(self._seen or self._seen_without_grad)

    @property
    def sizes(self) -> dict[str, tuple[int, ...] | list[tuple[int, ...]]]:
        """``{conv name: its input size}``, or the sorted list of sizes for a layer called with several."""
        seen = self._chosen(self._seen, self._seen_without_grad)
        return {name: next(iter(found)) if len(found) == 1 else sorted(found) for name, found in seen.items()}

    @property
    def output_paddings(self) -> dict[str, tuple[int, ...]]:
        """``{transposed conv: output padding its calls used}``; when calls differ, the largest per
        axis (more output rows can only raise a row or column sum, so it bounds every call) and a warning."""
        paddings = {}
        for name, found in self._chosen(self._paddings, self._paddings_without_grad).items():
            if len(found) > 1:
                warnings.warn(
                    f"transposed layer {name!r} was called with output paddings {sorted(found)}; using the largest per axis",
                    stacklevel=user_stacklevel(),
                )
            paddings[name] = tuple(max(axis) for axis in zip(*found))
        return paddings

    def remove(self) -> None:
        """Remove the forward hooks: sizes recorded so far stay in :attr:`sizes`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def gather(self, replicas) -> None:
        """Add the sizes that the other replicas of a DDP model recorded (``replicas``:
        :func:`normopt.replicas.replica_group`), so that replicas whose batches differ in size
        describe the model alike, and agree on :attr:`called`. A collective: every rank calls it,
        at the same step."""
        records = (self._seen, self._paddings, self._seen_without_grad, self._paddings_without_grad)
        gathered: list = [None] * dist.get_world_size(replicas.group)
        dist.all_gather_object(gathered, records, group=replicas.group)
        for theirs in gathered:
            for mine, their in zip(records, theirs):
                for name, found in their.items():
                    mine.setdefault(name, set()).update(found)

    def specs(self) -> LayerSpecs:
        """Stop recording and describe the model with the recorded input sizes."""
        self.remove()
        return _layer_specs(unwrap(self.model), None, self.sizes, self.output_paddings)


def _input_keyword(module: nn.Module, kwargs: dict) -> torch.Tensor:
    """The input of a call that passed it by keyword (``conv(input=x)`` is legal, and a subclass may
    name it otherwise and take other tensors beside it): the value of ``forward``'s first parameter,
    else the first tensor given."""
    try:
        first = next(iter(inspect.signature(module.forward).parameters))
    except (StopIteration, TypeError, ValueError):
        first = None
    if isinstance(kwargs.get(first), torch.Tensor):
        return kwargs[first]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _output_padding(module: _ConvNd, input_size: tuple[int, ...], output_size: tuple[int, ...]) -> tuple[int, ...]:
    """The output padding a transposed convolution's call used, from its input and output sizes."""
    padding = padding_pairs(module)
    return tuple(
        o - ((n - 1) * s - pl - pr + d * (k - 1) + 1)
        for o, n, s, (pl, pr), d, k in zip(output_size, input_size, module.stride, padding, module.dilation, module.kernel_size)
    )


def _same_values(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether ``tensor`` still holds ``saved`` (NaN where NaN was); a meta tensor holds no values."""
    if tensor.shape != saved.shape:
        return False
    if tensor.device.type == "meta":
        return True
    if tensor.is_floating_point() or tensor.is_complex():
        return torch.equal(tensor.isnan(), saved.isnan()) and torch.equal(tensor.nan_to_num(), saved.nan_to_num())
    return torch.equal(tensor, saved)


def _forked_rng(model: nn.Module, args: tuple):
    """``torch.random.fork_rng`` over the CPU and the CUDA devices of ``model``'s tensors and ``args``;
    none where the pass initialises lazy layers: their weights come from the random stream, and a
    stream put back would draw them again for the next layer made."""
    if any(isinstance(t, nn.parameter.UninitializedTensorMixin) for t in itertools.chain(model.parameters(), model.buffers())):
        return contextlib.nullcontext()
    tensors = itertools.chain(model.parameters(), model.buffers(), (a for a in args if isinstance(a, torch.Tensor)))
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    return torch.random.fork_rng(devices=cuda, device_type="cuda")


def _eager():
    """Compiled submodules run eagerly: code compiled before the recorder's hooks were added does not
    call them (dynamo does not guard on hooks), and the probe saw no call of a layer that ran."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


def record_input_sizes(model: nn.Module, example_input) -> InputSizeRecorder:
    """The recorder of one forward pass of ``example_input`` (input sizes, transposed output paddings).

    The pass runs in eval mode under ``torch.no_grad()`` so batch-norm running statistics and
    autograd state are untouched; every module's training flag is restored afterwards, and so is
    every buffer the pass wrote (the observers of quantization-aware training, say, calibrate in
    eval mode too). Submodules compiled with ``torch.compile`` run eagerly in the pass (compiled
    code does not call hooks added after it compiled). The flags are set directly, not through
    ``model.eval()``: a ``train()`` override that also freezes a backbone would leave it frozen.
    The random state of the CPU and of the CUDA devices the model and input are on is put back
    too (a model that draws noise in eval mode shifted the run's random stream), except where the
    pass initialises lazy layers, whose weights are drawn from it as a first forward of the
    user's would draw them.
    """
    recorder = InputSizeRecorder(model)
    modes = {module: module.training for module in model.modules()}
    # A copy of each buffer, put back where the pass changed it in place or replaced it: the probe
    # is not a step of the user's, whose module state it must leave as it found it.
    buffers = [
        (module, key, tensor, tensor.detach().clone())
        for module in model.modules()
        for key, tensor in module._buffers.items()
        if isinstance(tensor, torch.Tensor) and not isinstance(tensor, nn.parameter.UninitializedTensorMixin)
    ]
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        for module in modes:
            module.training = False
        with _forked_rng(model, args), torch.no_grad(), _eager():
            try:
                model(*args)
            except Exception as error:
                if hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(
                        "normopt: raised by the model's forward of example_input (one pass in eval mode under "
                        "no_grad, which records the convolutions' input sizes): pass an input the model takes"
                    )
                raise
    finally:
        recorder.remove()
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            # Compared by value (fused observer kernels write without bumping the version counter),
            # and only a changed one written: an eval-mode batch norm's running_var may be saved
            # for the backward of a loss computed before the probe.
            for module, key, tensor, saved in buffers:
                module._buffers[key] = tensor
                if not _same_values(tensor, saved):
                    with torch.inference_mode(tensor.is_inference()):
                        if tensor.shape == saved.shape:
                            tensor.copy_(saved)
                        else:  # resized by the pass
                            tensor.set_(saved)
    return recorder


def layer_specs(
    model: nn.Module,
    example_input=None,
    *,
    input_sizes: Mapping[str, tuple | list[tuple] | None] | None = None,
    output_paddings: Mapping[str, tuple[int, ...]] | None = None,
) -> LayerSpecs:
    """Describe every linear piece of ``model``: Linear, Conv/ConvTranspose 1-3d and BatchNorm
    (frozen batch norms, and instance norms with ``track_running_stats=True``, too).

    Args:
        model: any module; DDP, DataParallel and ``torch.compile`` wrappers are looked through, so
            keys never carry their ``module.`` / ``_orig_mod.`` prefix.
        example_input: a tensor (or tuple of positional arguments) for one forward pass that
            records each convolution's input size. Without it, convolutions get the large-input
            limit (``input_size=None``).
        input_sizes: ``{conv name: spatial size}`` recorded earlier (e.g. by
            :class:`InputSizeRecorder`), instead of ``example_input``. A list of sizes (a layer
            called at several) gives the large-input limit with zero padding, where it bounds
            every size, and a warning; with reflect, replicate or circular padding, whose small
            inputs fold taps together past that limit, the layer is skipped with the reason (no
            one spec bounds its calls: describe each with :func:`module_spec`).
        output_paddings: ``{transposed conv name: output padding}`` its calls used (with
            ``forward(x, output_size=...)``), recorded likewise; default the modules' own.

    Returns:
        ``{module name: spec}``; modules that hold weights but are not linear maps are listed
        with the reason in ``.skipped``. A module shared under several names appears once, under
        its first name (``input_sizes`` and ``output_paddings`` may use any of them), and a tensor
        shared by several modules gets its first key.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LayerNorm(8))
        >>> specs = layer_specs(model, torch.zeros(1, 3, 8, 8))
        >>> list(specs), specs["0"].input_size
        (['0', '1'], (8, 8))
        >>> specs.skipped
        {'2': 'LayerNorm: normalises each sample by its own statistics: not a linear map'}
    """
    model = unwrap(model)
    # Every name of every convolution, to the one its spec is listed under.
    canonical = canonical_names(model)
    convs = {name: canonical[name] for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, _ConvNd)}
    for what, given in (("input_sizes", input_sizes), ("output_paddings", output_paddings)):
        unknown = sorted(set(given or ()) - set(convs))
        if unknown:  # a typo left the layer at the large-input limit, with a warning about the layer only
            raise ValueError(f"{what} names {unknown}, which are no convolutions of the model; its convolutions: {list(convs)}")
    input_sizes = _under_first_names(input_sizes, convs, "input_sizes")
    output_paddings = _under_first_names(output_paddings, convs, "output_paddings")
    return _layer_specs(model, example_input, input_sizes, output_paddings)


def _under_first_names(given, names: dict[str, str], what: str) -> dict | None:
    """``given`` keyed by the names specs are listed under (``names``: any name -> that one)."""
    if given is None:
        return None
    out, by = {}, {}
    for name, value in given.items():
        key = names[name]
        if key in out and out[key] != value:
            raise ValueError(
                f"{what} gives {by[key]!r} and {name!r}, two names of one shared module, different values: "
                f"{out[key]!r} and {value!r}"
            )
        out[key], by[key] = value, name
    return out


def _layer_specs(model: nn.Module, example_input, input_sizes, output_paddings) -> LayerSpecs:
    """:func:`layer_specs` of an unwrapped ``model``, the names of ``input_sizes`` and
    ``output_paddings`` not checked (a recorder may hold a module replaced since)."""
    probed = example_input is not None or input_sizes is not None
    sizes, paddings = dict(input_sizes or {}), dict(output_paddings or {})
    if example_input is not None:
        recorder = record_input_sizes(model, example_input)
        sizes.update(recorder.sizes)
        paddings.update(recorder.output_paddings)
    keys = {id(t): n for n, t in model.named_parameters()}
    keys.update({id(t): n for n, t in model.named_buffers()})
    specs, skipped = {}, {}
    described: dict[str, nn.Module] = {}  # the modules of specs (warn_overriding names those that override forward)
    scripted: list[str] = []  # TorchScript modules met so far
    for name, module in model.named_modules():
        if "parametrizations" in name.split("."):
            continue  # internals of a parametrized layer, which is listed itself
        if within(name, scripted):
            continue  # inside a TorchScript module, which is listed itself
        if isinstance(module, torch.jit.ScriptModule):
            scripted.append(name)
        reason = _skip_reason(module)
        if reason is not None:
            skipped[name] = reason
        elif _described(module):
            unrecorded = probed and isinstance(module, _ConvNd) and name not in sizes
            size = sizes.get(name)
            if _several_sizes(size) and len(size) == 1:
                size = tuple(size[0])
            if _several_sizes(size) and isinstance(module, _ConvNd):
                if pads_with_copies(module_spec(module, name, None, keys, paddings.get(name))):
                    skipped[name] = (
                        f"{type(module).__name__}: called with input sizes {size} and {module.padding_mode} padding, "
                        "whose norm differs per size and exceeds the large-input limit on small ones; "
                        "describe each call with normopt.module_spec(module, name, input_size)"
                    )
                    warnings.warn(f"layer {name!r} is skipped: {skipped[name]}", stacklevel=user_stacklevel())
                    continue
                warnings.warn(
                    f"layer {name!r} was called with input sizes {size}; using the large-input limit",
                    stacklevel=user_stacklevel(),
                )
                size = None
            specs[name] = module_spec(module, name, size, keys, paddings.get(name))
            described[name] = module
            if unrecorded:
                below = (
                    f" (with {module.padding_mode} padding, which folds taps together on small inputs, that limit "
                    "may be below its norm at the size it runs at: describe it with normopt.module_spec(module, "
                    "name, input_size))"
                    if pads_with_copies(specs[name])
                    else ""
                )
                warnings.warn(
                    f"layer {name!r} was not called by the recorded forward; using the large-input limit{below}",
                    stacklevel=user_stacklevel(),
                )
    warn_overriding(described)
    return LayerSpecs(specs, skipped)
