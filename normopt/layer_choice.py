"""Which of a model's layers a norm decay regularizes, as a pure function of its layers, its
modules and the optimizer's param groups."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from normopt.discovery import _skip_reason, within
from normopt.projection import check_projectable
from normopt.specs import BatchNormSpec, Spec


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """The layers of a model split by what a norm decay does with them.

    Attributes:
        decayed: ``{layer: spec}`` regularized now.
        bn_projected: ``{layer: spec}`` of the batch norms whose norm is capped (``bn_max_norm``).
        frozen: ``{layer: weight}`` held by the optimizer but frozen (``requires_grad=False``) now,
            of a kind that is chosen once unfrozen (fine-tuning unfreezes a backbone).
        shared: ``{layer: weight}`` that another decay on the optimizer regularizes already.
        skipped: ``{module: reason}`` for every layer left alone (``frozen`` and ``shared`` too).
    """

    decayed: dict[str, Spec]
    bn_projected: dict[str, BatchNormSpec]
    frozen: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor]
    skipped: dict[str, str]


def refuse_tied(specs: Mapping[str, Spec], modules: Mapping[str, nn.Module], kinds: tuple, exclude: frozenset[str]) -> None:
    """Refuse layers that share one weight but are different maps (TridentNet's branches of one
    kernel at several dilations): each has its own h, and the optimizer keeps one state per
    weight. Layers of one and the same map (tied heads) have equal h, and share it."""
    by_weight: dict[int, list[str]] = {}
    for name, spec in specs.items():
        weight = modules[name]._parameters.get("weight")
        if isinstance(spec, kinds) and isinstance(weight, nn.Parameter) and not within(name, exclude):
            by_weight.setdefault(id(weight), []).append(name)
    for first, *others in by_weight.values():
        differ = [name for name in others if dataclasses.replace(specs[name], name=first) != specs[first]]
        if differ:
            raise ValueError(
                f"layers {[first, *differ]} share one weight but are different maps ({specs[first]} and "
                f"{specs[differ[0]]}): norm decay keeps one state per weight, so it regularizes only one of "
                f"them; exclude the others (exclude={tuple(differ)!r})"
            )


def choose_layers(
    specs: Mapping[str, Spec],
    modules: Mapping[str, nn.Module],
    param_groups: list[dict],
    *,
    kinds: tuple,
    exclude: frozenset[str] = frozenset(),
    taken: set[int] = frozenset(),
    ord: float = 1,
    max_norm: float | None = None,
    bn_max_norm: float | None = None,
) -> LayerChoice:
    """Split ``specs`` (``{module name: spec}``, with ``modules`` its modules by name) into the
    layers a norm decay of ``kinds`` (spec classes) regularizes, those whose batch norm it caps
    (``bn_max_norm``), and the rest, each with its reason.

    A layer is regularized where its module has a trainable weight held by ``param_groups`` that no
    other decay took (``taken``: ids of weights), and is not in ``exclude``. Refused, naming the
    layer, before anything is chosen: layers that tie one weight to different maps, an empty or
    complex weight, and (with ``max_norm``) a layer the projection cannot cap.

    Example:
        >>> from normopt import layer_specs
        >>> from normopt.specs import ConvSpec, LinearSpec
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1))
        >>> _ = model[2].weight.requires_grad_(False)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> modules = dict(model.named_modules())
        >>> choice = choose_layers(layer_specs(model), modules, optimizer.param_groups, kinds=(ConvSpec, LinearSpec))
        >>> list(choice.decayed), list(choice.frozen)
        (['0'], ['2'])
    """
    refuse_tied(specs, modules, kinds, exclude)
    held = {id(p) for group in param_groups for p in group["params"] if p.requires_grad}
    in_groups = {id(p) for group in param_groups for p in group["params"]}
    skipped = dict(getattr(specs, "skipped", {}))
    decayed, bn_projected, frozen, shared = {}, {}, {}, {}
    for name, spec in specs.items():
        weight = getattr(modules[name], "weight", None)
        if within(name, exclude):
            continue
        if weight is None or not isinstance(weight, nn.Parameter) or spec.weight is None:
            skipped[name] = _skip_reason(modules[name]) or "no trainable affine weight to regularize"
        elif id(weight) in taken and isinstance(spec, kinds):
            skipped[name] = "regularized by another norm decay on this optimizer"
            shared[name] = weight
        elif id(weight) not in held and id(weight) in in_groups:
            skipped[name] = "weight is frozen (requires_grad=False): regularized from the step after it is unfrozen"
            if isinstance(spec, kinds) or (isinstance(spec, BatchNormSpec) and bn_max_norm is not None):
                frozen[name] = weight
        elif id(weight) not in held:
            skipped[name] = "weight is not a parameter of the optimizer"
        elif weight.numel() == 0:
            raise ValueError(f"layer {name!r} has an empty weight {tuple(weight.shape)}: it has no norm to regularize")
        elif weight.is_complex():
            raise TypeError(f"layer {name!r} has complex weights ({weight.dtype}); norm decay needs real weights")
        else:
            if isinstance(spec, kinds):
                if max_norm is not None and not isinstance(spec, BatchNormSpec):
                    check_projectable(spec, ord)  # refuse now, not half-way through a step
                decayed[name] = spec
            if isinstance(spec, BatchNormSpec) and bn_max_norm is not None:
                bn_projected[name] = spec
    return LayerChoice(decayed, bn_projected, frozen, shared, skipped)
