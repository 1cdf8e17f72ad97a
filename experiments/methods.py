"""Every training method, defined once: its optimizer (plain SGD, weight decay, SVC, norm decay),
its loss (cross-entropy, PGD-AT, TRADES, ALP, their hypersphere-embedding versions), its grid of
strengths, its label and its colour. Command lines, grids, tables and figures all read ``REGISTRY``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import normopt
from experiments import protocol as P
from experiments.attacks import pgd, trades_adversary


@dataclass(frozen=True)
class Method:
    """One training method.

    Attributes:
        name: the name on the command line and in tables.
        label: the name in figures and the LaTeX table.
        colour: its colour in every figure.
        optimizer: ``"sgd"``, ``"wd"`` (weight decay), ``"svc"`` or ``"nd"`` (norm decay).
        loss: ``"ce"``, ``"pgd-at"``, ``"trades"`` or ``"alp"``.
        study: ``"regularize"`` or ``"adversarial"``: the study whose default grid holds it.
        ord: norm of norm decay (1 or inf), None otherwise.
        bn: norm decay with batch-norm projection.
        he: hypersphere embedding (normalized features and last-layer weights, scale s, margin m).
        grid: strengths of the CIFAR-10 study (the released scripts').
        quick: strengths of the digits study.
        in_default: part of its study's default grid (the others are chosen with ``--methods``).
        strength: what ``strength`` means for it.
    """

    name: str
    label: str
    colour: str
    optimizer: str = "sgd"
    loss: str = "ce"
    study: str = "regularize"
    ord: float | None = None
    bn: bool = False
    he: bool = False
    grid: tuple[float, ...] = (0.0,)
    quick: tuple[float, ...] = (0.0,)
    in_default: bool = True
    strength: str = ""

    @property
    def adversarial(self) -> bool:
        return self.loss != "ce"

    def regularizes(self, strength: float) -> float:
        """How strongly ``strength`` regularizes, larger meaning stronger: the strength itself
        (beta, weight decay), but minus the bound for SVC, whose smaller bounds clip harder.

        Example:
            >>> REGISTRY["svc"].regularizes(0.1) > REGISTRY["svc"].regularizes(2.0)
            True
        """
        return -strength if self.optimizer == "svc" else strength

    def run_label(self, strength: float) -> str:
        """``label`` and, for a method with a strength, its value."""
        return f"{self.label} {strength:g}" if self.strength else self.label


def how_strong(methods, strengths) -> list[float]:
    """:meth:`Method.regularizes` of each (method name, strength) pair, to order runs or pick the
    strongest (figures, the paper table).

    Example:
        >>> how_strong(["svc", "nd-l1"], [2.0, 0.1])
        [-2.0, 0.1]
    """
    return [REGISTRY[m].regularizes(s) for m, s in zip(methods, strengths)]


_ND = "beta (norm decay)"
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("plain", "plain", "#4d4d4d", study="both"),
        Method("wd", "weight decay", "#1f77b4", "wd", grid=P.WEIGHT_DECAYS, quick=(1e-3, 1e-2), strength="weight decay"),
        Method("svc", "SVC", "#9467bd", "svc", grid=P.SVC_BOUNDS, quick=(1.0, 0.5), strength="SVC bound"),
        Method("nd-l1", "ND l1", "#d62728", "nd", ord=1, grid=P.BETAS, quick=(1e-2, 1e-1), strength=_ND),
        Method("nd-linf", "ND l_inf", "#ff7f0e", "nd", ord=math.inf, grid=P.BETAS_LINF, quick=(1e-2, 1e-1), strength=_ND),
        Method("nd-l1+bn", "ND l1 + BN", "#e377c2", "nd", ord=1, bn=True, grid=P.BETAS_L1_BN, quick=(1e-1,), strength=_ND),
        Method(
            "nd-linf+bn",
            "ND l_inf + BN",
            "#bcbd22",
            "nd",
            ord=math.inf,
            bn=True,
            grid=P.BETAS_LINF_BN,
            quick=(1e-1,),
            strength=_ND,
        ),
        Method("pgd-at", "PGD-AT", "#2ca02c", loss="pgd-at", study="adversarial"),
        Method("trades", "TRADES", "#17becf", loss="trades", study="adversarial"),
        Method("alp", "ALP", "#8c564b", loss="alp", study="adversarial"),
        Method("pgd-at-he", "PGD-AT-HE", "#98df8a", loss="pgd-at", he=True, study="adversarial", in_default=False),
        Method("trades-he", "TRADES-HE", "#9edae5", loss="trades", he=True, study="adversarial", in_default=False),
        Method("alp-he", "ALP-HE", "#c49c94", loss="alp", he=True, study="adversarial", in_default=False),
        # The released scripts combine ALP (not PGD-AT) with l1 norm decay or weight decay; their
        # strengths come from the command line, so these grids are normopt's own.
        Method(
            "at+nd",
            "ALP + ND l1",
            "#aec7e8",
            "nd",
            loss=P.AT_REGULARIZED_LOSS,
            ord=P.AT_ND_ORD,
            study="adversarial",
            grid=(1e-3,),
            quick=(1e-2,),
            in_default=False,
            strength=_ND,
        ),
        Method(
            "at+wd",
            "ALP + WD",
            "#c5b0d5",
            "wd",
            loss=P.AT_WD_LOSS,
            study="adversarial",
            grid=(5e-4,),
            quick=(1e-3,),
            in_default=False,
            strength="weight decay",
        ),
    )
}
METHODS = tuple(REGISTRY)
ADVERSARIAL = tuple(n for n, m in REGISTRY.items() if m.adversarial)


def grid(study: str, quick: bool, names: list[str] | None = None) -> dict[str, list[float]]:
    """``{method: strengths}`` of a study: its default methods, or ``names`` (any registered method)."""
    chosen = names or [n for n, m in REGISTRY.items() if m.study in (study, "both") and m.in_default]
    return {n: list(REGISTRY[n].quick if quick else REGISTRY[n].grid) for n in chosen}


def colours() -> dict[str, str]:
    """``{label: colour}`` of every method, for figures."""
    return {m.label: m.colour for m in REGISTRY.values()}


class CosineLinear(nn.Linear):
    """Hypersphere embedding's last layer: ``scale * cos(angle(x, w_j))``, features and weight rows
    normalized (Pang et al., 2020); no bias. Still a ``nn.Linear``, so its norms are tracked: those
    of :meth:`applied_weight`, the matrix it applies to the normalized features (the raw ``weight``'s
    scale changes nothing the layer computes)."""

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def applied_weight(self) -> torch.Tensor:
        """``scale * W`` with unit rows: the linear map from the normalized features to the logits."""
        return self.scale * F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), self.applied_weight())


def hypersphere(model: nn.Module, scale: float = P.HE_SCALE) -> nn.Module:
    """``model`` with its last ``nn.Linear`` replaced by a :class:`CosineLinear` (same weights).

    The released scripts pass plain logits to their HE loss (no normalisation anywhere), so their
    HE variants are ordinary training with a scaled, margined cross-entropy; this is the method the
    paper names.
    """
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    if not names:
        raise ValueError("hypersphere embedding needs a final nn.Linear layer; the model has none")
    parent_name, _, attr = names[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new = CosineLinear(old.in_features, old.out_features, scale).to(old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    setattr(parent, attr, new)
    return model


def he_cross_entropy(logits: torch.Tensor, y: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """HE loss on ``logits = scale * cos``: cross-entropy of ``scale * (cos - margin * onehot(y))``,
    i.e. ``-mean(s (cos_y - m) - log(exp(s (cos_y - m)) + sum_{j != y} exp(s cos_j)))``."""
    return F.cross_entropy(logits - scale * margin * F.one_hot(y, logits.shape[1]).to(logits.dtype), y)


def make_optimizer(config, model: nn.Module, example: torch.Tensor, specs=None):
    """The SGD optimizer the method asks for, and a PeriodicSVC hook for ``svc``."""
    method = REGISTRY[config.method]
    weight_decay = config.strength if method.optimizer == "wd" else 0.0
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=weight_decay)
    svc = None
    if method.optimizer == "nd":
        exclude = ()
        if config.skip_layers == "released":
            inner = getattr(model, "module", model)
            exclude = tuple(P.released_skips(inner, specs if specs is not None else normopt.layer_specs(inner, example)))
        optimizer = normopt.NormDecayOptimizer(
            optimizer,
            model,
            ord=method.ord,
            beta=config.strength,
            gamma=config.norm_decay_gamma,
            rule=config.norm_decay_rule,
            bn_max_norm=config.bn_radius if method.bn else None,
            bn_projection=config.bn_projection,
            exclude=exclude,
            example_input=example,
        )
    elif method.optimizer == "svc":
        # Released timing: the training loop calls svc.clip() itself (see train.train_epoch), so the
        # step hook's own count must never fire.
        every = config.svc_every if config.svc_timing == "steps" else 2**62
        svc = normopt.PeriodicSVC(
            optimizer, model, bound=config.strength, every=every, example_input=example, input_size=config.svc_input_size
        )
    return optimizer, svc


def _pairing(config, method: Method, logits: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    if method.he:  # the released ALP-HE pairs the cosines, not the scaled logits
        logits, logits_adv = logits / config.he_scale, logits_adv / config.he_scale
    if config.alp_pairing == "mse":
        return F.mse_loss(logits, logits_adv)  # mean over all elements (released)
    return 0.5 * (logits - logits_adv).square().sum(1).mean()  # Kannan et al.'s 0.5 * squared distance


def loss_of(config, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss and the logits it was computed on, for the run's method: of the clean inputs
    for plain training, TRADES and ALP; of the adversarial ones for PGD-AT, whose loss sees no clean
    input (its ``train_accuracy`` is the accuracy on the adversarial training batches)."""
    method = REGISTRY[config.method]
    if method.he:

        def natural(logits, labels):
            return he_cross_entropy(logits, labels, config.he_scale, config.he_margin)
    else:
        natural = F.cross_entropy
    if method.loss == "ce":
        logits = model(x)
        return natural(logits, y), logits
    start = config.attack_start
    model.eval()  # attack with fixed batch-norm statistics
    if method.loss == "trades":
        x_adv = trades_adversary(model, x, config.adv_eps, config.adv_step, config.adv_steps)
    else:
        # The inner attack's loss: cross-entropy of the (scaled) logits, no margin (released cm=0).
        x_adv = pgd(model, x, y, config.adv_eps, config.adv_step, config.adv_steps, start=start)
    model.train()
    if method.loss == "pgd-at":
        logits_adv = model(x_adv)
        return natural(logits_adv, y), logits_adv
    logits, logits_adv = model(x), model(x_adv)
    if method.loss == "trades":
        robust = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
        return natural(logits, y) + config.trades_beta * robust, logits
    pairing = _pairing(config, method, logits, logits_adv)
    return 0.5 * (natural(logits, y) + natural(logits_adv, y)) + config.alp_weight * pairing, logits
