"""The options of norm decay, checked where they enter: ``beta`` and ``gamma`` (at construction, in
each param group at every step, in a checkpoint's groups before the optimizer loads them), the
layer kinds, the caps, and the models it refuses.

``beta`` and ``gamma`` live in every param group, under :data:`BETA` and :data:`GAMMA`, like
``weight_decay``: changeable between steps, by hand or by a scheduler.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec
from normopt.transform import check_tensor_beta, plain_number

KINDS = {"conv": ConvSpec, "linear": LinearSpec, "batchnorm": BatchNormSpec}
BN_PROJECTIONS = ("exact", "released")
BETA, GAMMA = "norm_decay_beta", "norm_decay_gamma"


def refuse_sharded(model: nn.Module) -> None:
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


def check_beta(beta, where: str = "beta") -> float | torch.Tensor:
    """``beta`` as a float: finite, >= 0 and small enough that ``beta * h`` stays finite in float32.

    A 0-d floating-point tensor is kept as it is (a compiled step then takes it as an input, and
    changing its value does not recompile, as with torch.optim's tensor ``lr``). Its value is
    checked only where that costs no synchronisation: on the CPU, outside a compiled region;
    elsewhere it is used as it is.

    Example:
        >>> check_beta(1), check_beta(torch.tensor(0.5))
        (1.0, tensor(0.5000))
        >>> check_beta(1e39, "norm_decay_beta of param group 0")
        Traceback (most recent call last):
        ...
        ValueError: norm_decay_beta of param group 0=1e+39 is too large: beta * h overflows float32 gradients
    """
    if isinstance(beta, torch.Tensor):
        check_tensor_beta(beta, where)
        if beta.device.type == "cpu" and not torch.compiler.is_compiling():
            check_beta(float(beta), where)
        return beta
    beta = plain_number(beta)
    # Comparisons, not math.isfinite: a float that dynamo turned symbolic (after its value changed)
    # cannot go through math.isfinite without a graph break.
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
        raise ValueError(f"{where} must be a finite number >= 0, got {beta!r}")
    if beta > torch.finfo(torch.float32).max / 1e4:  # |h| counts taps: beta * h would overflow
        raise ValueError(f"{where}={beta!r} is too large: beta * h overflows float32 gradients")
    return float(beta)


def check_gamma(gamma, where: str = "gamma") -> float:
    """``gamma`` as a float in [0, 1]; never a tensor (the step chooses its path from its value, on the host).

    Example:
        >>> check_gamma(0.5)
        0.5
        >>> check_gamma(1.5)
        Traceback (most recent call last):
        ...
        ValueError: gamma must be a number in [0, 1], got 1.5
    """
    if isinstance(gamma, torch.Tensor):  # the step picks its path (rings or dense) from gamma's value
        raise TypeError(f"{where} must be a number in [0, 1], not a tensor: gamma decides on the host which slices are kept")
    gamma = plain_number(gamma)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma <= 1:
        raise ValueError(f"{where} must be a number in [0, 1], got {gamma!r}")
    return float(gamma)


def check_group(group: Mapping, where: str) -> None:
    """Refuse a param group (one being added, or a checkpoint's) whose ``norm_decay_beta`` or
    ``norm_decay_gamma`` the step would refuse, before the optimizer takes it.

    Example:
        >>> check_group({"params": [], "lr": 0.1, "norm_decay_beta": -1.0}, "the param group added")
        Traceback (most recent call last):
        ...
        ValueError: norm_decay_beta of the param group added must be a finite number >= 0, got -1.0
    """
    if BETA in group:
        check_beta(group[BETA], f"{BETA} of {where}")
    if GAMMA in group:
        check_gamma(group[GAMMA], f"{GAMMA} of {where}")


def signed_beta(beta, maximize: bool):
    """beta as the gradient takes it: a group with ``maximize=True`` steps along its gradient, so the
    decay is subtracted there, and shrinks the norms as it does elsewhere (as ``weight_decay`` does).

    Example:
        >>> signed_beta(0.1, maximize=False), signed_beta(0.1, maximize=True)
        (0.1, -0.1)
    """
    return -beta if maximize else beta


def scaled_betas(betas: dict, scale: torch.Tensor) -> dict:
    """``{layer: beta * scale}``, one product per distinct beta (layers that shared a beta share the product).

    Example:
        >>> scaled = scaled_betas({"conv": 0.5, "fc": 0.5, "head": 2.0}, torch.tensor(4.0))
        >>> scaled["conv"] is scaled["fc"], scaled["head"]
        (True, tensor(8.))
    """
    products: dict = {}
    key = lambda b: ("tensor", id(b)) if isinstance(b, torch.Tensor) else ("float", b)
    for b in betas.values():
        if key(b) not in products:
            products[key(b)] = scale * b
    return {name: products[key(b)] for name, b in betas.items()}


def check_cap(option: str, value) -> None:
    """Refuse a cap (``max_norm``, ``bn_max_norm``) that is neither None nor a positive finite number.

    Example:
        >>> check_cap("max_norm", 2.0), check_cap("max_norm", None)
        (None, None)
        >>> check_cap("bn_max_norm", 0)
        Traceback (most recent call last):
        ...
        ValueError: bn_max_norm must be a positive finite number, got 0
    """
    if value is not None and not (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{option} must be a positive finite number, got {value!r}")
