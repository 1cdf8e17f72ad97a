"""Attacks: the training-time attacks stay in the eps-ball; robust accuracy never exceeds clean accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.attacks import pgd, robust_accuracy, trades_adversary
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
