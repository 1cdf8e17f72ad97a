"""Attacks: the training-time attacks stay in the eps-ball; robust accuracy never exceeds clean accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.attacks import pgd, robust_accuracy, start_point, trades_adversary
from experiments.data import digits


def model_and_data():
    torch.manual_seed(0)
    data = digits(False)
    x, y = data.tensors[0][:64], data.tensors[1][:64]
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), x, y


@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_training_attacks_stay_in_the_ball_and_in_range(attack):
    model, x, y = model_and_data()
    eps = 8 / 255
    adv = pgd(model, x, y, eps, 2 / 255, 5) if attack == "pgd" else trades_adversary(model, x, eps, 2 / 255, 5)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    if attack == "pgd":
        loss = nn.functional.cross_entropy
        assert loss(model(adv), y) > loss(model(x), y)


def test_robust_accuracy_with_apgd():
    model, x, y = model_and_data()
    strong = robust_accuracy(model, x, y, 16.0, iterations=10, targets=2)
    none = robust_accuracy(model, x, y, 0.0, iterations=2, targets=1)
    assert set(strong) == {"clean", "apgd-ce", "apgd-t", "robust"}
    assert strong["robust"] <= min(strong["apgd-ce"], strong["apgd-t"]) <= strong["clean"]
    assert strong["robust"] < strong["clean"]
    assert none["robust"] == none["clean"]
    with pytest.raises(ValueError, match="unknown attack"):
        robust_accuracy(model, x, y, 1.0, attacks=("cw",))


def test_standard_autoattack_has_autoattacks_own_standard_settings():
    """torchattacks' AutoAttack(version="standard") ran its APGD-CE, APGD-T and FAB-T for 10 steps
    (AutoAttack's standard: 100, the released code's auto_attack/autoattack.py) and Square with its
    schedule rescaled (a helper's hunt)."""
    torchattacks = pytest.importorskip("torchattacks")
    from experiments.attacks import standard_autoattack

    model, _, _ = model_and_data()
    attack = standard_autoattack(model, 8 / 255, classes=10, seed=3)
    apgd_ce, apgd_t, fab_t, square = attack.attacks
    assert [type(a) for a in attack.attacks] == [torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square]
    assert apgd_ce.steps == apgd_t.steps == fab_t.steps == 100 and apgd_ce.loss == "ce"
    assert apgd_ce.n_restarts == apgd_t.n_restarts == fab_t.n_restarts == square.n_restarts == 1
    assert apgd_t.n_target_classes == fab_t.n_target_classes == 9 and fab_t.multi_targeted
    assert square.n_queries == 5000 and square.p_init == 0.8 and not square.rescale_schedule
    assert all(a.eps == 8 / 255 and a.norm == "Linf" and a.seed == 3 for a in attack.attacks)


def test_pgd20_and_full_autoattack_beside_the_default():
    """PGD-20 and standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) are options; each is an
    attack (below clean accuracy at a large radius) and AutoAttack is at least as strong as PGD-20."""
    pytest.importorskip("torchattacks")
    model, x, y = model_and_data()
    x, y = x[:24], y[:24]
    result = robust_accuracy(model, x, y, 32.0, attacks=("pgd", "autoattack"), iterations=5, targets=1)
    assert set(result) == {"clean", "pgd", "autoattack", "robust"}
    assert result["autoattack"] <= result["pgd"] < result["clean"]
    assert result["robust"] <= min(result["pgd"], result["autoattack"])


def test_training_attack_starts():
    torch.manual_seed(0)
    x = torch.full((4000,), 0.5)
    uniform = start_point(x, 0.1, "uniform") - x
    assert uniform.abs().max() <= 0.1 and uniform.std().item() == pytest.approx(0.1 / 3**0.5, rel=0.1)
    with pytest.raises(ValueError, match="unknown attack start"):
        start_point(x, 0.1, "zero")


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    x = digits(False).tensors[0][:16].reshape(16, 1, 8, 8)
    model(x)  # batch-norm statistics of its own
    return model, x


def _buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("attack", ["pgd", "trades"])
def test_training_attacks_on_a_model_in_train_mode_keep_its_batch_norm_statistics_and_mode(attack):
    model, x = _bn_model()
    model[4].eval()  # a mixed model: each module's own mode comes back
    y, before = torch.arange(16) % 10, _buffers(model)
    if attack == "pgd":
        pgd(model, x, y, 8 / 255, 2 / 255, 3)
    else:
        trades_adversary(model, x, 8 / 255, 2 / 255, 3)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert [m.training for m in model] == [True, True, True, True, False]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("attacks", [("apgd-ce", "apgd-t"), ("pgd",), ("autoattack",)], ids=["apgd", "pgd", "autoattack"])
def test_robust_accuracy_hands_the_model_back_as_it_came(attacks):
    """Evaluated between a backward and its step, the model keeps its gradients (ART's loss
    gradient zeroed them and wrote the attack's), its modes and its batch-norm statistics."""
    model, x = _bn_model()
    model[1].eval()  # a frozen batch norm in a model in train mode
    model[4].weight.requires_grad_(False)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels it gets right: every image is attacked
    nn.functional.cross_entropy(model(x), y).backward()
    grads, before = {n: p.grad for n, p in model.named_parameters()}, _buffers(model)
    values = {n: None if g is None else g.clone() for n, g in grads.items()}
    result = robust_accuracy(model, x, y, 8.0, attacks=attacks, iterations=3, targets=2)
    assert result["clean"] == 1.0
    assert [m.training for m in model] == [True, False, True, True, True]
    assert all(p.grad is grads[n] for n, p in model.named_parameters())  # the very tensors,
    assert all(values[n] is None or torch.equal(p.grad, values[n]) for n, p in model.named_parameters())  # unchanged
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True]
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
