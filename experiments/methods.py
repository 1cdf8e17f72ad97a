"""What each training method means: the optimizer it wraps (norm decay, weight decay, SVC) and the
loss it minimises (plain, PGD-AT, TRADES, ALP)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import normopt
from experiments.attacks import pgd, trades_adversary

NORM_DECAY = {"nd-l1": 1, "nd-linf": math.inf, "nd-l1+bn": 1, "nd-linf+bn": math.inf}
ADVERSARIAL = ("pgd-at", "trades", "alp")
METHODS = ("plain", "wd", "svc", *NORM_DECAY, *ADVERSARIAL)


def make_optimizer(config, model: nn.Module, example: torch.Tensor):
    """The SGD optimizer the method asks for, and a PeriodicSVC hook for ``svc``."""
    weight_decay = config.strength if config.method == "wd" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=weight_decay)
    svc = None
    if config.method in NORM_DECAY:
        bn = config.method.endswith("+bn")
        optimizer = normopt.NormDecayOptimizer(
            optimizer,
            model,
            ord=NORM_DECAY[config.method],
            beta=config.strength,
            bn_max_norm=config.bn_radius if bn else None,
            example_input=example,
        )
    elif config.method == "svc":
        svc = normopt.PeriodicSVC(optimizer, model, bound=config.strength, every=config.svc_every, example_input=example)
    return optimizer, svc


def loss_of(config, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss and the logits on clean inputs, for the run's method."""
    if config.method == "pgd-at":
        model.eval()  # attack with fixed batch-norm statistics
        x_adv = pgd(model, x, y, config.adv_eps, config.adv_step, config.adv_steps)
        model.train()
        logits = model(x_adv)
        return F.cross_entropy(logits, y), logits
    if config.method == "trades":
        model.eval()
        x_adv = trades_adversary(model, x, config.adv_eps, config.adv_step, config.adv_steps)
        model.train()
        logits = model(x)
        robust = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
        return F.cross_entropy(logits, y) + config.trades_beta * robust, logits
    if config.method == "alp":
        model.eval()
        x_adv = pgd(model, x, y, config.adv_eps, config.adv_step, config.adv_steps)
        model.train()
        logits, logits_adv = model(x), model(x_adv)
        pairing = (logits - logits_adv).square().sum(1).mean()
        return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits_adv, y)) + config.alp_weight * pairing, logits
    logits = model(x)
    return F.cross_entropy(logits, y), logits
