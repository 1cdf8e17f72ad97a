"""The method registry and the losses: the released protocol's dry runs, TRADES / ALP values, the
hypersphere-embedding losses against hand-computed values, attack starts, BN projection, layer
skipping and the learning-rate schedule."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments import methods
from experiments import protocol as P
from experiments.attacks import start_point
from experiments.config import RunConfig
from experiments.methods import REGISTRY, CosineLinear, he_cross_entropy, hypersphere, loss_of, make_optimizer
from experiments.train import scheduler_milestones
from tests.experiments.test_data import write_cifar10

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def dry_run(module: str, tmp_path, *arguments: str) -> list[dict]:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_cifar10(str(data))
    command = [sys.executable, "-m", module, "--dataset", "cifar10", "--data-dir", str(data), "--skip-data-checksums"]
    command += [*arguments, "--dry-run", "--threads", "1", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("resolved ")]


def test_registry_defines_each_method_once_with_its_own_colour():
    expected = {"plain", "wd", "svc", "nd-l1", "nd-linf", "nd-l1+bn", "nd-linf+bn", "pgd-at", "trades", "alp"}
    expected |= {"pgd-at-he", "trades-he", "alp-he", "at+nd", "at+wd"}
    assert set(REGISTRY) == expected
    assert len({m.colour for m in REGISTRY.values()}) == len(REGISTRY)
    assert len({m.label for m in REGISTRY.values()}) == len(REGISTRY)


def test_released_regularization_study_resolves_to_the_released_scripts(tmp_path):
    runs = dry_run("experiments.regularize", tmp_path, "--models", "resnet18", "--protocol", "released")
    grid = {}
    for run in runs:
        grid.setdefault(run["method"], []).append(run["strength"])
    assert grid == {
        "plain": [0.0],
        "wd": list(P.WEIGHT_DECAYS),
        "svc": list(P.SVC_BOUNDS),
        "nd-l1": list(P.BETAS),
        "nd-linf": list(P.BETAS_LINF),
        "nd-l1+bn": list(P.BETAS_L1_BN),
        "nd-linf+bn": list(P.BETAS_LINF_BN),
    }
    for run in runs:
        assert (run["lr"], run["momentum"], run["batch_size"], run["epochs"]) == (0.01, 0.9, 128, 120)
        assert run["milestones"] == [75, 90, 100] and run["seed"] == 1
        assert (run["norm_decay_rule"], run["norm_decay_gamma"], run["bn_projection"]) == ("reference", 0.5, "released")
        assert (run["bn_radius"], run["svc_every"], run["skip_layers"]) == (5.0, 100, "none")
        assert (run["svc_timing"], run["svc_input_size"]) == ("released", "raw")
        assert (run["eval_eps"], run["eval_images"], run["attacks"]) == (1.0, 1024, ["apgd-ce", "apgd-t"])
    paper = dry_run("experiments.regularize", tmp_path, "--models", "resnet18", "--protocol", "paper", "--methods", "nd-l1+bn")
    assert {(r["norm_decay_rule"], r["bn_projection"]) for r in paper} == {("paper", "exact")}


@pytest.mark.parametrize(
    ("module", "arguments"),
    [
        ("experiments.train", []),
        ("experiments.regularize", ["--methods", "plain"]),
        ("experiments.adversarial", ["--methods", "plain"]),
    ],
)
def test_cifar10_trains_the_released_model_by_default(module, arguments, tmp_path):
    """--dataset cifar10 switched every default to the released protocol but the model: it trained
    the digits CNN ``small``."""
    runs = dry_run(module, tmp_path, *arguments)
    assert [r["model"] for r in runs] == ["resnet18"]
    assert dry_run(module, tmp_path, *arguments, "--protocol", "paper")[0]["model"] == "resnet18"


def test_released_adversarial_study_resolves_to_the_released_scripts(tmp_path):
    runs = dry_run("experiments.adversarial", tmp_path, "--models", "resnet18")
    assert [r["method"] for r in runs] == ["plain", "pgd-at", "trades", "alp"]
    for run in runs:
        assert (run["lr"], run["epochs"], run["milestones"], run["seed"]) == (0.1, 120, [75, 90, 100], 1)
        assert (run["adv_eps"], run["adv_step"], run["adv_steps"], run["attack_start"]) == (0.031, 0.007, 10, "normal")
        assert (run["trades_beta"], run["alp_weight"], run["alp_pairing"]) == (1.0, 1.0, "mse")
        assert (run["eval_eps"], run["eval_images"]) == (8.0, 1024)
    he = dry_run("experiments.adversarial", tmp_path, "--methods", "pgd-at-he,trades-he,alp-he")
    assert {(r["he_scale"], r["he_margin"]) for r in he} == {(15.0, 0.2)}


def test_released_skips_option_reaches_the_runs(tmp_path):
    runs = dry_run("experiments.regularize", tmp_path, "--methods", "nd-l1", "--released-skips", "--models", "vgg11")
    assert {r["skip_layers"] for r in runs} == {"released"}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 3, bias=False))


def test_he_cross_entropy_by_hand():
    s, m = 15.0, 0.2
    cos = torch.tensor([[0.3, -0.1, 0.5], [0.9, 0.2, -0.4]])
    y = torch.tensor([2, 0])
    by_hand = 0.0
    for i in range(2):
        numerator = s * (cos[i, y[i]].item() - m)
        others = sum(math.exp(s * cos[i, j].item()) for j in range(3) if j != y[i])
        by_hand += -(numerator - math.log(math.exp(numerator) + others)) / 2
    assert he_cross_entropy(s * cos, y, s, m).item() == pytest.approx(by_hand, rel=1e-6)


def test_hypersphere_last_layer_is_the_scaled_cosine():
    model = hypersphere(tiny_model(), scale=15.0)
    assert isinstance(model[3], CosineLinear)
    x = torch.randn(5, 4)
    features = F.relu(x @ model[1].weight.T)
    cos = (features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (
        model[3].weight / model[3].weight.norm(dim=1, keepdim=True)
    ).T
    torch.testing.assert_close(model(x), 15.0 * cos)


HE_CONFIG = {"adv_steps": 1, "adv_step": 0.01, "adv_eps": 0.02}


@pytest.mark.parametrize("method", ["pgd-at-he", "trades-he", "alp-he"])
def test_he_losses_by_hand(method, monkeypatch):
    """Each HE loss on a tiny model, against the formula written out (adversarial point fixed)."""
    model = hypersphere(tiny_model())
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    x_adv = (x + 0.01).clamp(0, 1)
    monkeypatch.setattr(methods, "pgd", lambda *a, **k: x_adv)
    monkeypatch.setattr(methods, "trades_adversary", lambda *a, **k: x_adv)
    config = RunConfig(method=method, **HE_CONFIG)
    s, m = config.he_scale, config.he_margin
    loss, _ = loss_of(config, model, x, y)
    with torch.no_grad():
        cos, cos_adv = model(x) / s, model(x_adv) / s

    def he(c):  # -mean(s(cos_y - m) - log(exp(s(cos_y - m)) + sum_{j != y} exp(s cos_j)))
        total = 0.0
        for i in range(len(y)):
            numerator = s * (c[i, y[i]].item() - m)
            others = sum(math.exp(s * c[i, j].item()) for j in range(3) if j != y[i])
            total += -(numerator - math.log(math.exp(numerator) + others))
        return total / len(y)

    if method == "pgd-at-he":
        expected = he(cos_adv)
    elif method == "trades-he":
        kl = (F.softmax(s * cos, 1) * (F.log_softmax(s * cos, 1) - F.log_softmax(s * cos_adv, 1))).sum() / len(y)
        expected = he(cos) + 1.0 * kl.item()
    else:
        expected = 0.5 * he(cos) + 0.5 * he(cos_adv) + 1.0 * ((cos - cos_adv) ** 2).mean().item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_trades_and_alp_use_the_released_weights(monkeypatch):
    model = tiny_model()
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    x_adv = (x - 0.02).clamp(0, 1)
    monkeypatch.setattr(methods, "pgd", lambda *a, **k: x_adv)
    monkeypatch.setattr(methods, "trades_adversary", lambda *a, **k: x_adv)
    with torch.no_grad():
        logits, logits_adv = model(x), model(x_adv)
    trades, _ = loss_of(RunConfig(method="trades"), model, x, y)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="sum") / 4
    assert trades.item() == pytest.approx((F.cross_entropy(logits, y) + 1.0 * kl).item(), rel=1e-6)
    alp, _ = loss_of(RunConfig(method="alp"), model, x, y)
    ce = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(logits_adv, y)
    mse = ((logits - logits_adv) ** 2).sum() / logits.numel()  # F.mse_loss: mean over all elements
    assert alp.item() == pytest.approx((ce + 1.0 * mse).item(), rel=1e-6)


def test_training_attacks_start_at_x_plus_a_thousandth_of_a_gaussian():
    torch.manual_seed(0)
    x = torch.full((2000,), 0.5)
    delta = start_point(x, 0.031, "normal") - x
    assert delta.std().item() == pytest.approx(P.ATTACK_START_STD, rel=0.1) and delta.abs().max() < 0.031
    seen = []
    config = RunConfig(method="pgd-at")
    original = methods.pgd
    methods.pgd = lambda *a, **k: seen.append(k["start"]) or original(*a, **k)
    try:
        loss_of(config, tiny_model(), torch.rand(2, 1, 2, 2), torch.tensor([0, 1]))
    finally:
        methods.pgd = original
    assert seen == ["normal"]


def test_lr_drops_at_the_released_epochs():
    """Released: epoch 75 (1-based) is the first at lr x0.1; MultiStepLR steps after each epoch."""
    config = RunConfig.resolve("released", "digits", epochs=120, milestones=P.LR_DROPS, lr=0.01)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, scheduler_milestones(config), gamma=0.1)
    lrs = {}
    for epoch in range(1, 121):
        lrs[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    released = {e: 0.01 * (0.001 if e >= 100 else 0.01 if e >= 90 else 0.1 if e >= 75 else 1) for e in lrs}
    assert all(lrs[e] == pytest.approx(released[e]) for e in lrs)


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 16, 2))


@pytest.mark.parametrize("protocol", ["released", "paper"])
def test_bn_projection_follows_the_protocol(protocol):
    model = bn_model()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([30.0, 20.0, 1.0]))
    config = RunConfig.resolve(protocol, "digits", method="nd-l1+bn", strength=1e-3, bn_radius=5.0, lr=1e-9)
    optimizer, _ = make_optimizer(config, model, torch.zeros(1, 1, 4, 4))
    model(torch.randn(8, 1, 4, 4)).sum().backward()
    optimizer.step()
    scale = (model[1].running_var + model[1].eps).sqrt()
    norms = model[1].weight.detach().abs() / scale
    if protocol == "released":  # only the arg-max channel is set to the radius
        assert norms[0].item() == pytest.approx(5.0, rel=1e-4) and norms[1].item() > 5
    else:  # every channel capped
        assert norms.max().item() <= 5.0 + 1e-4 and norms[2].item() == pytest.approx(1.0 / scale[2].item(), rel=1e-3)


def test_released_skips_leave_grouped_convs_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(4 * 16, 2))
    example = torch.zeros(1, 2, 4, 4)
    for skip, changed in (("none", True), ("released", False)):
        net = model
        before = net[0].weight.detach().clone()
        config = RunConfig(method="nd-l1", strength=1.0, skip_layers=skip, lr=0.1)
        optimizer, _ = make_optimizer(config, net, example)
        optimizer.zero_grad()
        (0 * net(example).sum()).backward()
        optimizer.step()  # a zero loss gradient: any change is norm decay's
        assert (not torch.equal(before, net[0].weight)) is changed
        with torch.no_grad():
            net[0].weight.copy_(before)


@pytest.mark.parametrize("method", ["at+nd", "at+wd"])
def test_adversarial_training_with_norm_or_weight_decay_runs(method, tmp_path):
    from experiments.train import train

    config = RunConfig(method=method, strength=0.01, epochs=1, adv_steps=2, eval_images=16, eval_iterations=2, eval_targets=1)
    result = train(config, str(tmp_path), progress=False)
    assert result["history"][0]["steps"] == 22 and 0 <= result["accuracy"]["robust"] <= 1
    assert REGISTRY[method].loss == "alp"  # as the released AT/train_adv_cifar10_{nd,wd}.py


@pytest.mark.parametrize(("timing", "expected"), [("released", [1, 11, 21, 23, 33, 43]), ("steps", [10, 20, 30, 40])])
def test_svc_clips_at_the_released_batches(timing, expected, tmp_path, monkeypatch):
    """Released: before the step of every batch whose index in its epoch is 1 modulo the period (the
    count restarts each epoch); ``steps``: after every period-th step. 22 digits batches per epoch."""
    import normopt
    from experiments.train import train

    at = []
    # PeriodicSVC counts the optimizer's steps in ``steps``: the steps taken before each clip.
    monkeypatch.setattr(normopt.PeriodicSVC, "clip", lambda self: at.append(self.steps))
    config = RunConfig(method="svc", strength=1.0, svc_every=10, svc_timing=timing, epochs=2, eval_images=8)
    train(RunConfig(**{**config.as_dict(), "eval_iterations": 1, "eval_targets": 1}), str(tmp_path), progress=False)
    assert at == expected
    assert config.svc_input_size == P.SVC_INPUT_SIZE == "raw"
