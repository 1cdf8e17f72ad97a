"""normopt: exact operator norms of CNN layers, and norm decay on top of any PyTorch optimizer.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import normopt
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    >>> sorted(normopt.model_norms(model, torch.zeros(1, 3, 16, 16), ord="linf"))
    ['0', '1']
"""

from normopt import svc
from normopt.decay import (
    Subgradient,
    autodiff_subgradient,
    norm_subgradient,
    norm_subgradients,
    paper_update,
    reference_update,
)
from normopt.discovery import InputSizeRecorder, LayerSpecs, OverriddenForwardWarning, layer_specs, module_spec, unwrap
from normopt.norms import (
    NormArgMax,
    layer_argmax,
    layer_argmaxes,
    layer_norm,
    layer_norms,
    nonfinite_layers,
    parse_ord,
)
from normopt.optim import NormDecayOptimizer
from normopt.periodic_svc import PeriodicSVC
from normopt.projection import project_batchnorm, project_batchnorm_argmax, project_l1_ball, project_layer
from normopt.regularizer import NormDecay, attach_norm_decay
from normopt.specs import BatchNormSpec, ConvSpec, LinearSpec
from normopt.summary import NetworkNorms, model_norms, network_norms
from normopt.transform import NormDecayState, NormDecayTransform, norm_decay

__version__ = "0.1.0"

__all__ = [
    "BatchNormSpec",
    "ConvSpec",
    "InputSizeRecorder",
    "LayerSpecs",
    "LinearSpec",
    "NetworkNorms",
    "NormArgMax",
    "NormDecay",
    "NormDecayOptimizer",
    "NormDecayState",
    "NormDecayTransform",
    "OverriddenForwardWarning",
    "PeriodicSVC",
    "Subgradient",
    "attach_norm_decay",
    "autodiff_subgradient",
    "layer_argmax",
    "layer_argmaxes",
    "layer_norm",
    "layer_norms",
    "layer_specs",
    "model_norms",
    "module_spec",
    "network_norms",
    "nonfinite_layers",
    "norm_decay",
    "norm_subgradient",
    "norm_subgradients",
    "paper_update",
    "parse_ord",
    "project_batchnorm",
    "project_batchnorm_argmax",
    "project_l1_ball",
    "project_layer",
    "reference_update",
    "svc",
    "unwrap",
]
