"""Norms of a whole network: one call for analysis scripts, and network-level summaries."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from normopt.discovery import hidden_linear_pieces, layer_specs, unwrap
from normopt.norms import layer_norms, nonfinite_layers
from normopt.specs import Spec


def model_norms(model: nn.Module, example_input=None, ord=1) -> dict[str, torch.Tensor]:
    """``{layer name: operator norm}`` of every linear piece of ``model``, in one call.

    Equivalent to ``layer_norms(params_and_buffers, layer_specs(model, example_input), ord)``;
    warns, naming them, about layers whose norm is not finite, and about linear layers left out
    because the model does not hold their weight as a parameter (parametrized, computed by a hook,
    quantized, TorchScript; see :attr:`LayerSpecs.skipped`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 2, bias=False), nn.Flatten(), nn.Linear(4, 1))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        >>> model_norms(model, torch.zeros(1, 1, 3, 3))["0"]  # the centre pixel feeds all 4 outputs
        tensor(4., grad_fn=<UnbindBackward0>)
    """
    inner = unwrap(model)
    tensors = {**dict(inner.named_parameters()), **dict(inner.named_buffers())}
    specs = layer_specs(inner, example_input)
    hidden = hidden_linear_pieces(inner, specs.skipped)
    if hidden:
        reasons = "; ".join(f"{name!r}: {specs.skipped[name]}" for name in hidden)
        warnings.warn(f"layers {hidden} are left out of the norms ({reasons})", stacklevel=2)
    norms = layer_norms(tensors, specs, ord)
    bad = nonfinite_layers(norms)
    if bad:
        warnings.warn(f"non-finite operator norm (NaN or inf weights) in layers {bad}", stacklevel=2)
    return norms


class NetworkNorms(NamedTuple):
    """Per-layer norms and two network-level figures, all tensors.

    Attributes:
        norms: ``{layer name: norm}``.
        total: sum of the norms of every layer in ``specs``, batch norms included (norm decay
            pushes down the sum over the layers it regularizes: convolutions and linear layers by
            default; pass ``{n: specs[n] for n in decay.decayed}`` for that sum).
        product: product of the layer norms, in float64. For a plain chain of these layers with
            activations 1-Lipschitz in that norm in between (ReLU; max pooling for l_inf, and for
            l1 or l2 only where its windows do not overlap: an input in ``m`` windows moves ``m``
            outputs, so ``MaxPool2d(3, stride=2)`` can scale l1 distances by 4), it bounds the
            network's Lipschitz constant in the same norm; with skip connections or attention it
            is no such bound. Each layer counts once: where the forward applies a module ``k``
            times (a block reused, a recurrent cell), the bound takes its norm to the ``k``-th power.
    """

    norms: dict[str, torch.Tensor]
    total: torch.Tensor
    product: torch.Tensor


def network_norms(tensors: Mapping[str, torch.Tensor], specs: Mapping[str, Spec], ord=1) -> NetworkNorms:
    """All layer norms with their sum and their product.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from normopt import layer_specs
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = model[0].weight.fill_(1.0)
        ...     _ = model[2].weight.fill_(3.0)
        >>> summary = network_norms(model.state_dict(), layer_specs(model), ord=1)
        >>> summary.total, summary.product
        (tensor(5.), tensor(6., dtype=torch.float64))
    """
    norms = layer_norms(tensors, specs, ord)
    if not norms:
        raise ValueError("no layers to summarise: specs is empty")
    stacked = torch.stack([n.to(torch.float64) for n in norms.values()])
    total = stacked.sum().to(next(iter(norms.values())).dtype)
    return NetworkNorms(norms, total, stacked.prod())
