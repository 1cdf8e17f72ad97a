"""Figures: which runs they draw."""

from __future__ import annotations

import pandas as pd

from experiments.figures import _final


def test_each_method_is_drawn_at_its_strongest_setting():
    """SVC's strength is its clipping bound, so its largest (2.0) was its weakest clip, drawn
    beside norm decay at its largest beta."""
    rows = [
        {"model": "small", "method": m, "strength": s, "seed": seed, "epoch": e, "layer": "0", "index": 0, "norm": 1.0}
        for m, strengths in (("svc", (2.0, 0.1)), ("nd-l1", (0.01, 0.1)), ("plain", (0.0,)))
        for s in strengths
        for seed in (0, 1)
        for e in (1, 2)
    ]
    drawn = _final(pd.DataFrame(rows))
    assert sorted(zip(drawn.method, drawn.strength)) == [("nd-l1", 0.1), ("plain", 0.0), ("svc", 0.1)]
    assert set(drawn.epoch) == {2}


def _drawn(monkeypatch) -> list[dict]:
    """What each saved grid shows: its axes' labels and the lines of its first panel."""
    import matplotlib.pyplot as plt

    from experiments import figures

    drawn = []

    def save(grid, path):
        ax = grid.axes.flat[0]
        drawn.append({"path": path, "labels": (ax.get_xlabel(), ax.get_ylabel()), "lines": len(ax.lines)})
        plt.close(grid.figure)
        return path

    monkeypatch.setattr(figures, "_save", save)
    return drawn


def test_the_epoch_and_step_grids_name_their_axes_and_draw_each_method_and_strength(monkeypatch, tmp_path):
    from experiments.figures import summed_norms_over_epochs, summed_norms_over_steps

    drawn = _drawn(monkeypatch)
    norms = pd.DataFrame(
        [
            {"model": "small", "method": m, "strength": s, "seed": 0, "epoch": e, "layer": "0", "index": 0,
             "kind": "conv", "ord": o, "norm": 1.0 + e}
            for m, s in (("plain", 0.0), ("nd-l1", 0.01), ("nd-l1", 0.1))
            for e in (1, 2)
            for o in ("l1", "linf")
        ]
    )  # fmt: skip
    results = [
        {
            "config": {"model": "small", "method": m, "strength": s, "seed": 0},
            "norms": [{"layer": "0", "kind": "conv"}, {"layer": "1", "kind": "batchnorm"}],
            "step_norms": {"step": [1, 2, 3], "layer": ["0", "1"], "l1": [[1.0, 9.0]] * 3, "linf": [[2.0, 9.0]] * 3},
        }
        for m, s in (("plain", 0.0), ("nd-l1", 0.01), ("nd-l1", 0.1))
    ]
    assert summed_norms_over_epochs(norms, ["conv"], str(tmp_path), "epochs.png", "t") == str(tmp_path / "epochs.png")
    assert summed_norms_over_steps(results, str(tmp_path), "steps.png", "t") == str(tmp_path / "steps.png")
    assert [d["labels"] for d in drawn] == [("epoch", "sum of conv norms"), ("training step", "sum of conv/linear norms")]
    assert [d["lines"] >= 3 for d in drawn] == [True, True]  # plain and both strengths of nd-l1
