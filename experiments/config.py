"""A run's configuration, resolved once: a frozen dataclass, its checks, its fingerprint and its diff."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from experiments.methods import METHODS
from experiments.models import MODELS

# Where data lives and whether to fetch it change no result: they stay out of the fingerprint.
NOT_RESULT = ("data_dir", "download", "verify_data")


class UserError(Exception):
    """A mistake in the command line or the files it names; reported in one line, exit code 2."""


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run; ``strength`` is beta (norm decay), the weight decay, or the SVC bound."""

    dataset: str = "digits"
    model: str = "small"
    method: str = "plain"
    strength: float = 0.0
    epochs: int = 15
    lr: float = 0.05
    momentum: float = 0.9
    milestones: tuple[int, ...] = (8, 11, 13)
    batch_size: int = 64
    seed: int = 0
    svc_every: int = 100
    bn_radius: float = 5.0
    adv_eps: float = 0.031
    adv_step: float = 0.007
    adv_steps: int = 10
    trades_beta: float = 6.0
    alp_weight: float = 0.5
    eval_eps: float = 1.0  # in 1/255 units
    eval_images: int = 256
    eval_iterations: int = 50
    eval_targets: int = 3
    attacks: tuple[str, ...] = ("apgd-ce", "apgd-t")
    amp: bool = False
    data_dir: str = "data"
    download: bool = False
    verify_data: bool = True

    def __post_init__(self):
        # Frozen: normalise lists from JSON or the command line through object.__setattr__.
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        object.__setattr__(self, "attacks", tuple(self.attacks))
        problem = check(self)
        if problem:
            raise UserError(problem)

    @classmethod
    def paper_cifar10(cls, **changes) -> RunConfig:
        """The paper's CIFAR-10 schedule: lr 0.01, momentum 0.9, 120 epochs, lr x0.1 at 75, 90 and 100."""
        base = {
            "dataset": "cifar10",
            "model": "resnet18",
            "lr": 0.01,
            "epochs": 120,
            "milestones": (75, 90, 100),
            "batch_size": 128,
        }
        return cls(**{**base, "eval_images": 1024, "eval_iterations": 100, "eval_targets": 9, **changes})

    def as_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """sha256 (first 12 hex digits) of every option that changes a result."""
        return fingerprint(self.as_dict())


def check(config: RunConfig) -> str | None:
    """The first impossible option as a sentence, or None."""
    if config.model not in MODELS:
        return f"unknown model {config.model!r}; choose from {sorted(MODELS)}"
    if config.method not in METHODS:
        return f"unknown method {config.method!r}; choose from {list(METHODS)}"
    positive = ("epochs", "lr", "batch_size", "svc_every", "eval_images", "eval_iterations", "eval_targets", "adv_steps")
    for name in positive:
        if not getattr(config, name) > 0:
            return f"--{name.replace('_', '-')} must be at least 1 (or > 0), got {getattr(config, name)}"
    non_negative = ("strength", "momentum", "bn_radius", "adv_eps", "adv_step", "trades_beta", "alp_weight", "eval_eps")
    for name in non_negative:
        if not getattr(config, name) >= 0:  # also refuses NaN
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(config, name)}"
    if config.method == "svc" and config.strength <= 0:
        return f"--strength (the SVC bound) must be > 0, got {config.strength}"
    if config.eval_targets > 9:
        return f"--eval-targets must be at most 9 (10 classes), got {config.eval_targets}"
    return None


def fingerprint(options: dict) -> str:
    kept = {k: v for k, v in sorted(options.items()) if k not in NOT_RESULT}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def differences(saved: dict, wanted: dict) -> list[str]:
    """``name: saved -> wanted`` for every result-changing option that differs."""
    names = sorted((set(saved) | set(wanted)) - set(NOT_RESULT))
    return [f"{n}: {saved.get(n)!r} -> {wanted.get(n)!r}" for n in names if saved.get(n) != wanted.get(n)]


def describe(config: RunConfig) -> str:
    """The resolved configuration in one line, as the command line echoes it."""
    return " ".join(f"{k}={v}" for k, v in config.as_dict().items()) + f"  [fingerprint {config.fingerprint()}]"
