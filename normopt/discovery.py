"""Walk a model and describe each of its linear pieces as a spec."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from normopt.specs import BatchNormSpec, LinearSpec, Spec, conv_spec

# Modules that hold weights but are not linear maps of their input, with the reason.
_NOT_LINEAR = {
    nn.LayerNorm: "normalises each sample by its own statistics: not a linear map",
    nn.GroupNorm: "normalises each sample by its own statistics: not a linear map",
    nn.modules.instancenorm._InstanceNorm: "normalises each sample by its own statistics: not a linear map",
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


class LayerSpecs(dict):
    """``{module name: spec}`` of a model's linear pieces, in module order.

    Attributes:
        skipped: ``{module name: reason}`` for every module that holds weights or is a
            normalisation but has no operator norm here (LayerNorm, attention, batch norm without
            running statistics, parametrized weights, ...).
    """

    def __init__(self, specs=(), skipped=None):
        super().__init__(specs)
        self.skipped: dict[str, str] = dict(skipped or {})

    def __repr__(self) -> str:
        return f"LayerSpecs({dict.__repr__(self)}, skipped={self.skipped!r})"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP, DataParallel or ``torch.compile`` wrappers.

    Example:
        >>> from torch import nn
        >>> inner = nn.Linear(2, 2)
        >>> unwrap(nn.DataParallel(inner)) is inner
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _skip_reason(module: nn.Module) -> str | None:
    for kind, reason in _NOT_LINEAR.items():
        if isinstance(module, kind):
            return f"{type(module).__name__}: {reason}"
    if isinstance(module, (nn.Linear, _ConvNd)) and parametrize.is_parametrized(module, "weight"):
        return (
            f"{type(module).__name__}: weight is parametrized (torch.nn.utils.parametrize); "
            "compute its norm from the parametrized weight with normopt.layer_norm"
        )
    if isinstance(module, (nn.Linear, _ConvNd)) and not isinstance(module._parameters.get("weight"), torch.Tensor):
        return f"{type(module).__name__}: weight is computed by a forward hook (e.g. weight_norm), not a parameter"
    if isinstance(module, _BatchNorm) and module.running_var is None:
        return (
            f"{type(module).__name__}: no running statistics (track_running_stats=False), so the layer "
            "normalises by batch statistics and is not one fixed linear map"
        )
    if isinstance(module, (nn.Linear, _ConvNd, _BatchNorm)):
        return None
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if own:
        return f"{type(module).__name__}: holds its own weights but has no operator-norm rule here"
    return None


def _check_initialised(name: str, module: nn.Module) -> None:
    if isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter):
        raise ValueError(f"layer {name!r}: lazy module is not initialised yet; run one forward pass first")


def module_spec(module: nn.Module, name: str = "", input_size=None, keys: Mapping[int, str] | None = None) -> Spec:
    """Spec of one linear module (Linear, Conv*d, ConvTranspose*d or BatchNorm*d).

    Args:
        module: the layer.
        name: its name in the model, used for tensor keys and error messages.
        input_size: spatial input size of a convolution, or None for the large-input limit.
        keys: ``{id(tensor): key}`` of the model's parameters and buffers, so shared tensors get
            the key under which the mapping passed to the norm functions holds them. Defaults to
            ``name + ".weight"`` and friends.

    Raises:
        TypeError: the module has no operator-norm rule; the message gives the reason.

    Example:
        >>> from torch import nn
        >>> module_spec(nn.Linear(4, 3), "fc")
        LinearSpec(name='fc', weight='fc.weight', in_features=4, out_features=3)
    """
    reason = _skip_reason(module)
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
        return conv_spec(module, name, key("weight"), input_size)
    return BatchNormSpec(
        name=name,
        weight=key("weight") if module.affine else None,
        running_var=key("running_var"),
        num_features=module.num_features,
        eps=float(module.eps),
    )


class InputSizeRecorder:
    """Records the spatial input size of every convolution of ``model`` from forward pre-hooks.

    Hooks observe the user's own forward passes (no extra pass, no change to batch-norm
    statistics) until :meth:`remove` is called. A layer called with several input sizes gets
    ``None`` (the large-input limit) and a warning.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.Conv2d(1, 1, 3))
        >>> recorder = InputSizeRecorder(model)
        >>> _ = model(torch.zeros(1, 1, 9, 9))
        >>> recorder.remove()
        >>> recorder.sizes
        {'0': (9, 9), '1': (4, 4)}
    """

    def __init__(self, model: nn.Module):
        self.model = unwrap(model)
        self._seen: dict[str, set[tuple[int, ...]]] = {}
        self._handles = [
            module.register_forward_pre_hook(self._hook(name, len(module.kernel_size)))
            for name, module in self.model.named_modules()
            if isinstance(module, _ConvNd)
        ]

    def _hook(self, name: str, dims: int):
        def record(_module, args):
            self._seen.setdefault(name, set()).add(tuple(args[0].shape[-dims:]))

        return record

    @property
    def called(self) -> bool:
        """Whether any convolution has run since the recorder was made."""
        return bool(self._seen)

    @property
    def sizes(self) -> dict[str, tuple[int, ...] | None]:
        sizes = {}
        for name, found in self._seen.items():
            if len(found) == 1:
                sizes[name] = next(iter(found))
            else:
                warnings.warn(
                    f"layer {name!r} was called with input sizes {sorted(found)}; using the large-input limit",
                    stacklevel=3,
                )
                sizes[name] = None
        return sizes

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def specs(self) -> LayerSpecs:
        """Stop recording and describe the model with the recorded input sizes."""
        self.remove()
        return layer_specs(self.model, input_sizes=self.sizes)


def record_input_sizes(model: nn.Module, example_input) -> dict[str, tuple[int, ...] | None]:
    """Spatial input size of every convolution, from one forward pass of ``example_input``.

    The pass runs in eval mode under ``torch.no_grad()`` so batch-norm running statistics and
    autograd state are untouched; every module's training flag is restored afterwards.
    """
    recorder = InputSizeRecorder(model)
    modes = {module: module.training for module in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    finally:
        recorder.remove()
        for module, mode in modes.items():
            module.training = mode
    return recorder.sizes


def layer_specs(model: nn.Module, example_input=None, *, input_sizes: Mapping[str, tuple | None] | None = None) -> LayerSpecs:
    """Describe every linear piece of ``model``: Linear, Conv/ConvTranspose 1-3d and BatchNorm.

    Args:
        model: any module; DDP, DataParallel and ``torch.compile`` wrappers are looked through, so
            keys never carry their ``module.`` / ``_orig_mod.`` prefix.
        example_input: a tensor (or tuple of positional arguments) for one forward pass that
            records each convolution's input size. Without it, convolutions get the large-input
            limit (``input_size=None``).
        input_sizes: ``{conv name: spatial size}`` recorded earlier (e.g. by
            :class:`InputSizeRecorder`), instead of ``example_input``.

    Returns:
        ``{module name: spec}``; modules that hold weights but are not linear maps are listed
        with the reason in ``.skipped``. A module shared under several names appears once, under
        its first name, and a tensor shared by several modules gets its first key.

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
    probed = example_input is not None or input_sizes is not None
    sizes = dict(input_sizes or {})
    if example_input is not None:
        sizes.update(record_input_sizes(model, example_input))
    keys = {id(t): n for n, t in model.named_parameters()}
    keys.update({id(t): n for n, t in model.named_buffers()})
    specs, skipped = {}, {}
    for name, module in model.named_modules():
        if "parametrizations" in name.split("."):
            continue  # internals of a parametrized layer, which is listed itself
        reason = _skip_reason(module)
        if reason is not None:
            skipped[name] = reason
        elif isinstance(module, (nn.Linear, _ConvNd, _BatchNorm)):
            if probed and isinstance(module, _ConvNd) and name not in sizes:
                warnings.warn(f"layer {name!r} was not called by the recorded forward; using the large-input limit", stacklevel=2)
            specs[name] = module_spec(module, name, sizes.get(name), keys)
    return LayerSpecs(specs, skipped)
