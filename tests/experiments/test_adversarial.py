"""The adversarial-training study on a tiny configuration."""

from __future__ import annotations

import copy
import math
import os

import pandas as pd
import pytest

from experiments import adversarial, regularize
from experiments.train import RunConfig, train


def test_tiny_study_compares_robust_and_plain_training(tmp_path):
    out = str(tmp_path / "study")
    tiny = ["--epochs", "1", "--eval-images", "16", "--eval-iterations", "2", "--eval-targets", "1"]
    adversarial.main([*tiny, "--out", out])
    table = pd.read_csv(os.path.join(out, "results.csv"))
    assert list(table.method) == ["plain", "pgd-at", "trades", "alp"]
    assert table["robust acc"].le(table["clean subset acc"]).all()
    for name in ("results.md", "results.tex", "norms.csv", "layer_norms_small.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    # 4 conv / linear layers are too few to estimate a density from: no density figure.
    assert not os.path.exists(os.path.join(out, "norm_density.png"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """One tiny finished plain run, as the studies read it back."""
    config = RunConfig(epochs=1, milestones=(), eval_images=16, eval_iterations=2, eval_targets=1)
    result = train(config, str(tmp_path_factory.mktemp("run")), progress=False)
    return {**result, "label": "plain"}


def _dead(result: dict, method: str) -> dict:
    """``result`` as a run of ``method`` that diverged in its last epoch, as train writes it."""
    dead = copy.deepcopy(result)
    dead["config"]["method"], dead["label"], dead["diverged"] = method, method, "loss nan in epoch 1"
    last = max(row["epoch"] for row in dead["norms"])
    for row in dead["norms"]:
        row["norm"] = math.nan if row["epoch"] == last else row["norm"]
    dead["step_norms"]["l1"][-1] = [math.nan] * len(dead["step_norms"]["l1"][-1])
    return dead


@pytest.mark.parametrize("study", [adversarial, regularize])
@pytest.mark.parametrize("every_run_diverged", [True, False])
def test_figures_leave_diverged_runs_out(finished, tmp_path, capsys, study, every_run_diverged):
    """A study whose every run diverged ended in a traceback ('Data cannot be log-scaled') in its figures."""
    results = [_dead(finished, "pgd-at"), _dead(finished, "trades")]
    if not every_run_diverged:
        results.append(finished)
    study.report(results, str(tmp_path))
    printed = capsys.readouterr().out
    figures = [line for line in printed.splitlines() if line.startswith("figures")]
    if every_run_diverged:
        assert figures == ["figures: none drawn, every run (2) diverged: nothing is left to plot"]
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".png")]
    else:
        assert figures == ["figures (leaving out 2 diverged run(s)):"]
        assert os.path.getsize(tmp_path / "layer_norms_small.png") > 0
    assert os.path.getsize(tmp_path / "norms.csv") > 0 and os.path.getsize(tmp_path / "results.csv") > 0
