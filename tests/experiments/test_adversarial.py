"""The adversarial-training study on a tiny configuration."""

from __future__ import annotations

import os

import pandas as pd

from experiments import adversarial


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
