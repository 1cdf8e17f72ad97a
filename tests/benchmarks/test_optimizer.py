"""The optimizer benchmark on tiny settings: its lower bounds compute what they stand for, and
every ratio it prints is there and finite (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import normopt
from benchmarks import optimizer as bench


@pytest.mark.parametrize("ord", [1, math.inf], ids=["l1", "linf"])
def test_norms_floor_computes_the_norms_the_wrapped_step_reports(ord):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    wrapped = normopt.NormDecayOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ord=ord, beta=1e-3, example_input=torch.zeros(1, 3, 8, 8)
    )
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    floors = bench._floors(wrapped, model, ord)
    norms = floors["norms"]()  # of the weights the next step's decay reads
    wrapped.step()
    assert set(norms) == set(wrapped.norm_decay.decayed) == {"0", "3"}  # batch norm is not regularized by default
    for name, value in norms.items():
        torch.testing.assert_close(value, wrapped.norm_decay.last_norms[name], msg=name)


def test_benchmark_rows_and_training_ratios_are_finite():
    # Through the command line, the device option included (a GPU run takes --device cuda).
    results = bench.main(["--repeats", "1", "--train-repeats", "1", "--batch", "2", "--device", "cpu"])
    rows, training = results["steps"], results["training"]
    assert [(row["model"], row["ord"]) for row in rows] == [(m, o) for m in bench.MODELS for o in bench.ORDS]
    for row in rows:
        assert row["added operators"] > 0
        assert math.isfinite(row["ours / plain"]) and row["ours / plain"] > 0
    expected = {"plain s", "l1 / plain", "linf / plain", "1 + l1 decay / plain", "1 + linf decay / plain"}
    expected |= {"1 + l1 norms / plain", "1 + linf norms / plain", "1 + read / plain"}
    assert set(training) == expected
    assert all(math.isfinite(v) and v > 0 for v in training.values())
    assert all(training[f"1 + {name} / plain"] > 1 for name in ("l1 norms", "linf norms", "read"))
