"""A run's configuration, resolved once: a frozen dataclass, its checks, its fingerprint and its diff."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass

from experiments import protocol as P
from experiments.methods import METHODS, REGISTRY
from experiments.models import MODELS

# Attacks of the robust evaluation: "autoattack" is the full standard AutoAttack (APGD-CE, APGD-T,
# FAB-T, Square, through torchattacks; the others run through ART); "pgd" is 20-step PGD.
ATTACKS = ("apgd-ce", "apgd-t", "pgd", "autoattack")
# The attacks that read each evaluation option: PGD-20 takes its own 20 steps, and only APGD-T
# has target classes (standard AutoAttack takes eval_iterations for its APGD runs).
READ_BY = {"eval_iterations": ("apgd-ce", "apgd-t", "autoattack"), "eval_targets": ("apgd-t",)}

# Largest seed: NumPy's seeds are 32-bit (the attacks seed it with the run's seed).
MAX_SEED = 2**32 - 1

# What an HE run's logged last-layer norms are of (experiments.train.applied_tensors): part of its definition.
HE_LAST_LAYER_NORMS = "applied weight scale * normalize(W)"

# Where data lives and whether to fetch it change no result: they stay out of the fingerprint
# (unless CIFAR-10 is read unchecked: result_options).
NOT_RESULT = ("data_dir", "download", "verify_data")
# Options of the evaluation after training: a checkpoint (of training) is this run's whatever they are.
EVALUATION = ("eval_eps", "sweep", "eval_images", "eval_iterations", "eval_targets", "attacks")


class UserError(Exception):
    """A mistake in the command line or the files it names; reported in one line, exit code 2."""


def adversarial_study_defaults(dataset: str) -> dict:
    """What the adversarial study sets in every run's defaults (the released
    ``train_adv_cifar10.py``): eval eps 8/255 and, on CIFAR-10, lr 0.1.

    Example:
        >>> adversarial_study_defaults("cifar10"), adversarial_study_defaults("digits")
        ({'eval_eps': 8.0, 'lr': 0.1}, {'eval_eps': 8.0})
    """
    return {"eval_eps": P.EVAL_EPS_ADVERSARIAL} | ({"lr": P.ADV_LR} if dataset == "cifar10" else {})


def single_run_defaults(method: str | None, dataset: str) -> dict:
    """Defaults of one run launched alone (``experiments.train``): an adversarial-training method
    gets the adversarial study's (:func:`adversarial_study_defaults`), other methods none.

    Alone, a CIFAR-10 PGD-AT run got the regularization study's lr 0.01 and eps 1/255, so the same
    run differed (and had another fingerprint) alone and in its study. (The studies set their own:
    ``experiments.regularize --methods pgd-at`` keeps the regularization protocol.)

    Example:
        >>> single_run_defaults("pgd-at", "cifar10"), single_run_defaults("nd-l1", "cifar10")
        ({'eval_eps': 8.0, 'lr': 0.1}, {})
    """
    definition = REGISTRY.get(method) if isinstance(method, str) else None
    return adversarial_study_defaults(dataset) if definition is not None and definition.adversarial else {}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; ``strength`` is beta (norm decay), the weight decay, or the SVC bound."""

    dataset: str = "digits"
    model: str = "small"
    method: str = "plain"
    strength: float = 0.0
    protocol: str = "released"
    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    # First (1-based) epochs trained at lr x0.1, x0.01, ...: the released scripts set the lr before each epoch.
    milestones: tuple[int, ...] = (8, 11, 13)
    batch_size: int = 64
    seed: int = 0
    norm_decay_rule: str = P.NORM_DECAY_RULE
    norm_decay_gamma: float = P.GAMMA
    bn_projection: str = P.BN_PROJECTION
    skip_layers: str = "none"
    svc_every: int = P.SVC_EVERY
    svc_timing: str = P.SVC_TIMING  # "released" (per-epoch batch index % every == 1, before the step) or "steps"
    svc_input_size: str = P.SVC_INPUT_SIZE  # "raw" (released) or "padded" (normopt's sound bound)
    bn_radius: float = P.BN_RADIUS
    adv_eps: float = P.ADV_EPS
    adv_step: float = P.ADV_STEP
    adv_steps: int = P.ADV_STEPS
    attack_start: str = "normal"
    trades_beta: float = P.TRADES_BETA
    alp_weight: float = P.ALP_WEIGHT
    alp_pairing: str = P.ALP_PAIRING
    he_scale: float = P.HE_SCALE
    he_margin: float = P.HE_MARGIN
    eval_eps: float = 1.0  # in 1/255 units
    sweep: tuple[float, ...] = ()  # further radii (1/255 units) of a robust-accuracy sweep
    eval_images: int = 256
    eval_iterations: int = 50
    eval_targets: int = 3
    attacks: tuple[str, ...] = P.ATTACKS
    norms_every: int = 1  # steps between two records of every layer's norms
    amp: bool = False
    data_dir: str = "data"
    download: bool = False
    verify_data: bool = True

    def __post_init__(self):
        # Frozen: normalise lists from JSON or the command line through object.__setattr__.
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "attacks", tuple(dict.fromkeys(self.attacks)))  # each once, in order
        object.__setattr__(self, "sweep", radii(self.sweep))
        problem = check(self)
        if problem:
            raise UserError(problem)

    @classmethod
    def paper_cifar10(cls, **changes) -> RunConfig:
        """The released CIFAR-10 schedule: lr 0.01, momentum 0.9, batch 128, 120 epochs, lr x0.1 from
        epoch 75, x0.01 from 90, x0.001 from 100; 1,024 images attacked (100-iteration APGD, 9 targets)."""
        base = {
            "dataset": "cifar10",
            "model": "resnet18",
            "lr": P.LR,
            "momentum": P.MOMENTUM,
            "epochs": P.EPOCHS,
            "milestones": P.LR_DROPS,
            "batch_size": P.BATCH_SIZE,
            "seed": P.SEED,
            "norms_every": 10,
        }
        return cls(**{**base, "eval_images": P.EVAL_IMAGES, "eval_iterations": 100, "eval_targets": 9, **changes})

    @classmethod
    def resolve(cls, protocol: str = "released", dataset: str = "digits", **changes) -> RunConfig:
        """The configuration of ``protocol`` on ``dataset``, then ``changes`` (the command line's)."""
        try:
            options = P.protocol(protocol).options()
        except ValueError as error:
            raise UserError(str(error)) from None
        make = cls.paper_cifar10 if dataset == "cifar10" else cls
        return make(**{**options, "dataset": dataset, **changes})

    def as_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def definition(self) -> dict:
        """What the method does, from the registry (optimizer, loss, norm, projection, HE): part of
        the fingerprint, so a run of a method whose definition changed is another run."""
        method = REGISTRY[self.method]
        definition = {"optimizer": method.optimizer, "loss": method.loss, "ord": str(method.ord), "bn": method.bn}
        definition["he"] = method.he
        if method.he:
            # HE runs logged the raw last-layer W until they logged the weight the layer applies;
            # naming it makes those runs new runs (old ones rerun, never read back with raw-W
            # norms), while every other method keeps its fingerprint and its finished runs.
            definition["last_layer_norms"] = HE_LAST_LAYER_NORMS
        return definition

    def fingerprint(self) -> str:
        """sha256 (first 12 hex digits) of every option that changes a result, and of the method's definition."""
        return fingerprint({**self.as_dict(), "definition": self.definition()})


MAX_RADIUS = 255.0  # attack radii are in 1/255 units; pixels lie in [0, 1]
MAX_COUNT = 2**31 - 1  # the most of any count option: torch's and the DataLoader's sizes overflow past it


def check(config: RunConfig) -> str | None:
    """The first impossible option as a sentence, or None."""
    if config.model not in MODELS:
        return f"unknown model {config.model!r}; choose from {sorted(MODELS)}"
    if config.method not in METHODS:
        return f"unknown method {config.method!r}; choose from {list(METHODS)}"
    counts = ("epochs", "batch_size", "svc_every", "eval_images", "eval_iterations", "eval_targets", "adv_steps", "norms_every")
    for name in (*counts, "lr", "he_scale"):
        if not getattr(config, name) > 0:  # also refuses NaN
            least = "at least 1" if name in counts else "> 0"
            return f"--{name.replace('_', '-')} must be {least}, got {getattr(config, name)}"
        if name in counts and getattr(config, name) > MAX_COUNT:  # a batch of 2**64 crashed in the DataLoader
            return f"--{name.replace('_', '-')} must be at most {MAX_COUNT}, got {getattr(config, name)}"
    non_negative = ("strength", "momentum", "bn_radius", "adv_eps", "adv_step", "trades_beta", "alp_weight", "eval_eps")
    non_negative += ("he_margin",)
    for name in non_negative:
        if not getattr(config, name) >= 0:  # also refuses NaN
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}"
    # inf passed every check above, then --eval-eps inf crashed inside ART after training.
    for name in ("lr", "momentum", "he_scale", *non_negative):
        if not math.isfinite(getattr(config, name)):
            return f"--{name.replace('_', '-')} must be finite, got {getattr(config, name)}"
    if config.method == "svc" and config.strength <= 0:
        return f"--strength (the SVC bound) must be > 0, got {config.strength}"
    if config.method == "svc" and config.svc_timing == "released" and config.svc_every == 1:  # i % 1 is never 1
        return "svc_every=1 never clips with svc_timing='released' (batch index % svc_every == 1); use svc_timing='steps'"
    problem = unused(config)
    if problem:
        return problem
    choices = {
        "protocol": P.PROTOCOLS,
        "norm_decay_rule": ("reference", "paper"),
        "bn_projection": ("released", "exact"),
        "skip_layers": ("none", "released"),
        "attack_start": ("normal", "uniform"),
        "alp_pairing": ("mse", "sum"),
        "svc_timing": ("released", "steps"),
        "svc_input_size": ("raw", "padded"),
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            return f"--{name.replace('_', '-')} must be one of {list(allowed)}, got {getattr(config, name)!r}"
    unknown = [a for a in config.attacks if a not in ATTACKS]
    if unknown or not config.attacks:
        return f"--attacks must be a non-empty list from {list(ATTACKS)}, got {list(config.attacks)}"
    if "autoattack" in config.attacks and importlib.util.find_spec("torchattacks") is None:
        return "--attacks autoattack needs torchattacks (pip install -e '.[autoattack]'); it is not installed"
    if any(not 0 <= r < math.inf for r in config.sweep):
        return f"--sweep radii must be finite and >= 0, got {list(config.sweep)}"
    # Past 255/255 an l_inf ball holds every image: at 1e300, ART's step overflowed float32 and
    # the attack's NaN images were scored as a robust accuracy.
    for option, r in (("--eval-eps", config.eval_eps), *(("--sweep radius", r) for r in config.sweep)):
        if r > MAX_RADIUS:
            return f"{option} must be at most {MAX_RADIUS:g} (1/255 units: the whole pixel range), got {r:g}"
    if not 0 <= config.norm_decay_gamma <= 1:
        return f"--norm-decay-gamma must be in [0, 1], got {config.norm_decay_gamma}"
    # Seeds are mixed into per-epoch seeds (seed * 100_003 + epoch, an int64 in torch) and into
    # NumPy's 32-bit seed: past 2**32 the attacks' seeds repeat, and past ~9.2e13 training crashed
    # with an int64 overflow when its first epoch began, after the data and model were built.
    if not 0 <= config.seed <= MAX_SEED:
        return f"--seed must be an integer in [0, {MAX_SEED}], got {config.seed}"
    if config.eval_targets > 9:
        return f"--eval-targets must be at most 9 (10 classes), got {config.eval_targets}"
    return None


def unused(config: RunConfig) -> str | None:
    """An option set to what the method never reads, or a regularizer without its strength, as a
    sentence; None if there is none.

    Such options were ignored yet changed the run's fingerprint, so ``--method pgd-at --strength
    0.5`` trained exactly as strength 0 under another name, and ``--method nd-linf`` without
    ``--strength`` ran norm decay with beta 0, plain training by another name.
    """
    method = REGISTRY[config.method]
    if not method.strength and config.strength != 0:
        return f"--strength is not used by --method {config.method} (it has no strength); leave it out"
    if method.strength and config.strength <= 0:
        return f"--method {config.method} needs --strength > 0 (its {method.strength}), got {config.strength}"
    if not method.bn and config.bn_radius != P.BN_RADIUS:
        bn = [n for n, m in REGISTRY.items() if m.bn]
        return f"--bn-radius is not used by --method {config.method} (only by {', '.join(bn)}); leave it out"
    if method.optimizer != "nd" and config.skip_layers != "none":
        return f"--released-skips is not used by --method {config.method} (only by norm decay); leave it out"
    return None


def unit_warnings(config: RunConfig) -> list[str]:
    """Warnings, one sentence each, for attack radii below 1 (but not 0): they are in 1/255 units,
    so ``--eval-eps 0.031`` attacks at 0.031/255, almost no attack at all, most likely meant as the
    pixel-unit 8/255; still a valid choice, so not refused."""
    named = [("--eval-eps", config.eval_eps)] + [("--sweep radius", r) for r in config.sweep]
    return [
        f"{option} {r:g} is below 1, and attack radii are in 1/255 units: this attacks at {r:g}/255 = "
        f"{r / 255:.2g} in pixel units (the paper's radii are 1/255 and 8/255: 1 and 8 here); "
        f"if you meant {r:g} in pixel units, pass {r * 255:.3g}"
        for option, r in named
        if 0 < r < 1
    ]


# The identity of CIFAR-10 files read without their checksums: whatever their folder holds.
UNVERIFIED = "unverified data_dir"


def radii(values) -> tuple[float, ...]:
    """Attack radii as a set: sorted, each once, -0 as 0 (the sweep measures each radius once, in
    order, whatever the command line's order: ``--sweep 4,2,2`` is ``--sweep 2,4``).

    Example:
        >>> radii([4, 2, 2.0, -0.0])
        (0.0, 2.0, 4.0)
    """
    return tuple(sorted({float(r) + 0.0 for r in values}))


def result_options(options: dict) -> dict:
    """The options of ``options`` that change a result.

    Where and how data are fetched are left out, except that CIFAR-10 files read without their
    checksums (``--skip-data-checksums``) are whatever their folder holds, so that folder, as an
    absolute path, is kept: a run trained on one folder is not taken as finished for another.

    Example:
        >>> result_options({"lr": 0.1, "dataset": "cifar10", "data_dir": "/d", "verify_data": True})
        {'lr': 0.1, 'dataset': 'cifar10'}
        >>> result_options({"dataset": "cifar10", "data_dir": "/d", "verify_data": False})[UNVERIFIED]
        '/d'
    """
    kept = {k: v for k, v in options.items() if k not in NOT_RESULT}
    # As RunConfig takes them: a config.json of an earlier version, with the radii in the command
    # line's order or an attack named twice, is the same run.
    if isinstance(kept.get("sweep"), (list, tuple)):
        kept["sweep"] = list(radii(kept["sweep"]))
    if isinstance(kept.get("attacks"), (list, tuple)):
        kept["attacks"] = list(dict.fromkeys(kept["attacks"]))
    if options.get("verify_data") is False and options.get("dataset") == "cifar10" and options.get("data_dir"):
        kept[UNVERIFIED] = os.path.abspath(options["data_dir"])
    return kept


def fingerprint(options: dict) -> str:
    kept = dict(sorted(result_options(options).items()))
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def differences(saved: dict, wanted: dict) -> list[str]:
    """``name: saved -> wanted`` for every result-changing option that differs (:func:`result_options`)."""
    saved, wanted = result_options(saved), result_options(wanted)
    names = sorted(set(saved) | set(wanted))
    return [f"{n}: {saved.get(n)!r} -> {wanted.get(n)!r}" for n in names if saved.get(n) != wanted.get(n)]


def describe(config: RunConfig) -> str:
    """The resolved configuration in one line, as the command line echoes it."""
    return " ".join(f"{k}={v}" for k, v in config.as_dict().items()) + f"  [fingerprint {config.fingerprint()}]"
