"""The claims table: each claim computed from results tables, holding and failing as the numbers say."""

from __future__ import annotations

import statistics

import pandas as pd
import pytest

from experiments.claims import by_run, claims_table, sweep_table


def results(rows: dict[tuple[str, float], tuple[float, float, float, float]], seeds=(0, 1), jitter=0.01) -> pd.DataFrame:
    """A results.csv: per (method, strength) its robust accuracy at 4/255, summed l1, summed l_inf and
    largest batch-norm norm; seeds differ by +-jitter."""
    frame = []
    for (method, strength), (robust, l1, linf, bn) in rows.items():
        for k, seed in enumerate(seeds):
            sign = 1 if k % 2 else -1
            frame.append(
                {
                    "model": "small",
                    "method": method,
                    "strength": strength,
                    "seed": seed,
                    "clean acc": 0.98,
                    "robust@1": 0.97,
                    "robust@4": robust + sign * jitter,
                    "sum l1": l1 * (1 + sign * jitter),
                    "sum linf": linf * (1 + sign * jitter),
                    "max bn": bn,
                }
            )
    return pd.DataFrame(frame)


REGULARIZATION = {
    ("plain", 0.0): (0.80, 40.0, 30.0, 10.0),
    ("wd", 0.01): (0.79, 30.0, 25.0, 9.0),
    ("nd-l1", 0.01): (0.80, 30.0, 28.0, 10.0),
    ("nd-l1", 0.1): (0.78, 10.0, 20.0, 9.0),
    ("nd-linf", 0.1): (0.79, 25.0, 8.0, 9.5),
}
ADVERSARIAL = {("plain", 0.0): (0.2, 40.0, 30.0, 10.0), ("pgd-at", 0.0): (0.7, 60.0, 45.0, 12.0)}


def claims(regularization=REGULARIZATION, adversarial=ADVERSARIAL) -> dict[str, str]:
    table = claims_table(results(regularization), results(adversarial))
    return dict(zip(table.claim, table.holds))


def test_all_four_claims_hold_on_numbers_that_say_so():
    verdicts = claims()
    assert len(verdicts) == 4 and set(verdicts.values()) == {"holds"}


def test_each_claim_fails_when_its_numbers_say_so():
    weak = {**REGULARIZATION, ("nd-l1", 0.1): (0.78, 45.0, 20.0, 9.0)}
    assert claims(weak)["norm decay lowers the norms"] == "does not hold"
    robust = {**REGULARIZATION, ("wd", 0.01): (0.95, 30.0, 25.0, 9.0)}
    assert claims(robust)["norm decay, weight decay and SVC do not raise robust accuracy"] == "does not hold"
    small = {**ADVERSARIAL, ("pgd-at", 0.0): (0.7, 20.0, 45.0, 12.0)}
    assert claims(adversarial=small)["adversarially trained models have norms no smaller than plain ones"] == "does not hold"
    bn = {**REGULARIZATION, ("nd-l1", 0.1): (0.78, 10.0, 20.0, 1.0)}
    assert claims(bn)["batch-norm norms resist norm decay"] == "does not hold"


def test_a_gain_within_the_seed_spread_is_no_gain():
    noisy = {**REGULARIZATION, ("wd", 0.01): (0.82, 30.0, 25.0, 9.0)}
    frame = results(noisy, jitter=0.05)
    table = claims_table(frame, None)
    row = table[table.claim.str.startswith("norm decay, weight")].iloc[0]
    assert row.holds == "holds" and "weight decay 0.01" in row.measured


def test_mean_and_spread_over_seeds():
    runs = by_run(results(REGULARIZATION))
    plain = runs[runs.method == "plain"].iloc[0]
    assert plain["robust@4"] == pytest.approx(0.80) and plain["robust@4 sd"] == pytest.approx(statistics.stdev([0.79, 0.81]))
    assert plain.seeds == 2
    sweep = sweep_table(results(REGULARIZATION))
    assert list(sweep.columns) == ["model", "run", "seeds", "clean", "eps 1/255", "eps 4/255"]
    assert sweep.iloc[0]["eps 4/255"].startswith("0.800 ± 0.014")


def test_latex_table_in_the_papers_layout():
    from experiments.study import paper_latex

    frame = results(REGULARIZATION).assign(**{"robust acc": lambda f: f["robust@4"]})
    tex = paper_latex(frame)
    lines = tex.splitlines()
    assert lines[1] == "\\begin{tabular}{l" + "c" * 5 + "}"
    assert "\\multicolumn{2}{c}{ND $\\ell_1$}" in lines[3] and lines[3].index("plain") < lines[3].index("weight decay")
    assert lines[4] == "strength & - & 0.01 & 0.01 & 0.1 & 0.1 \\\\"
    assert lines[6] == "Clean & 98.0 & 98.0 & 98.0 & 98.0 & 98.0 \\\\"
    assert lines[7] == "Robust & 80.0 & 79.0 & 80.0 & 78.0 & 79.0 \\\\"
