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
