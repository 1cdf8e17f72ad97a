"""The claims table: each claim computed from results tables, holding and failing as the numbers say."""

from __future__ import annotations

import math
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
                    "clean subset acc": 0.975,  # the --eval-images the radii are measured on
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


def test_the_sweeps_clean_column_counts_the_images_its_radii_count():
    """It read the whole test set's accuracy beside robust accuracies of the --eval-images subset: a
    hunt's row showed 0.463 clean and 0.531 at 1/255 (16 images)."""
    frame = results(REGULARIZATION)
    assert set(sweep_table(frame)["clean"]) == {"0.975 ± 0.000"}
    older = frame.drop(columns="clean subset acc")  # results written before the subset was recorded
    sweep = sweep_table(older)
    assert "clean" not in sweep.columns and set(sweep["clean (all test images)"]) == {"0.980 ± 0.000"}


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


def diverge(frame: pd.DataFrame, method: str, seeds) -> pd.DataFrame:
    """``frame`` with the runs of ``method`` at ``seeds`` diverged, as summary_table writes them."""
    frame = frame.assign(diverged=False)
    hit = (frame.method == method) & frame.seed.isin(seeds)
    frame.loc[hit, ["robust@1", "robust@4", "clean acc", "sum l1", "sum linf", "max bn"]] = float("nan")
    frame.loc[hit, "diverged"] = True
    return frame


def test_a_run_diverged_in_every_seed_leaves_its_claims_not_decided():
    """A NaN run's sums were written 0, which made claim 1 hold; NaN figures must decide nothing."""
    table = claims_table(diverge(results(REGULARIZATION), "nd-l1", (0, 1)), None)
    verdicts = dict(zip(table.claim, table.holds))
    assert verdicts["norm decay lowers the norms"] == "not decided"
    assert verdicts["batch-norm norms resist norm decay"] == "not decided"
    assert verdicts["norm decay, weight decay and SVC do not raise robust accuracy"] == "not decided"
    assert all("ND l1 0.1 diverged in every seed" in m for m in table.measured)


CLAIM_2 = "norm decay, weight decay and SVC do not raise robust accuracy"
ROBUST_WD = ("wd", 0.01), (0.95, 30.0, 25.0, 9.0)


@pytest.mark.parametrize(
    ("regularization", "adversarial", "dead", "claim", "worst"),
    [
        (
            {**REGULARIZATION, ("nd-linf", 0.1): (0.79, 25.0, 45.0, 9.5)},
            None,
            "nd-l1",
            "norm decay lowers the norms",
            "nd-linf 0.1",
        ),
        (dict([*REGULARIZATION.items(), ROBUST_WD]), None, "nd-l1", CLAIM_2, "weight decay 0.01"),
        # the dead run first among the candidates: max() with NaN keys picked it, '+nan ± nan'
        (
            dict([(("plain", 0.0), REGULARIZATION[("plain", 0.0)]), (("nd-l1", 0.1), (0.78, 10.0, 20.0, 9.0)), ROBUST_WD]),
            None,
            "nd-l1",
            CLAIM_2,
            "weight decay 0.01",
        ),
        (
            {**REGULARIZATION, ("nd-linf", 0.1): (0.79, 25.0, 8.0, 1.0)},
            None,
            "nd-l1",
            "batch-norm norms resist norm decay",
            "nd-linf 0.1",
        ),
        (
            None,
            {**ADVERSARIAL, ("trades", 0.0): (0.7, 10.0, 5.0, 12.0)},
            "pgd-at",
            "adversarially trained models have norms no smaller than plain ones",
            "TRADES linf",
        ),
    ],
)
def test_a_dead_run_does_not_hide_a_refutation_by_the_finite_runs(regularization, adversarial, dead, claim, worst):
    """A run diverged in every seed made every claim using it 'not decided', even where the finite
    runs refuted it, and min/max over NaN figures picked the dead run as the worst ('nan ± nan')."""
    tables = [None if rows is None else diverge(results(rows), dead, (0, 1)) for rows in (regularization, adversarial)]
    table = claims_table(*tables)
    row = table[table.claim == claim].iloc[0]
    assert row.holds == "does not hold" and row.worst == worst
    assert "nan" not in row.measured and "diverged in every seed" in row.measured


def test_diverged_seeds_are_left_out_of_means_and_seed_counts_with_a_note():
    """by_run skipped the NaN of a diverged seed and still counted it: '0.400 ± 0.000, seeds 2'."""
    frame = diverge(results(REGULARIZATION), "nd-l1", (1,))
    runs = by_run(frame)
    nd = runs[(runs.method == "nd-l1") & (runs.strength == 0.1)].iloc[0]
    assert (nd.seeds, nd.diverged) == (1, 1) and nd["sum l1"] == pytest.approx(10.0 * 0.99)
    sweep = sweep_table(frame)
    assert list(sweep.columns) == ["model", "run", "seeds", "diverged", "clean", "eps 1/255", "eps 4/255"]
    assert sweep.loc[sweep.run == "ND l1 0.1", ["seeds", "diverged"]].values.tolist() == [[1, 1]]
    # one seed left: its spread is unknown, so none is shown (it read "± 0.000")
    assert sweep.loc[sweep.run == "ND l1 0.1", "eps 4/255"].tolist() == [f"{nd['robust@4']:.3f}"]
    every = sweep_table(diverge(results(REGULARIZATION), "nd-l1", (0, 1)))
    assert every.loc[every.run == "ND l1 0.1", "eps 4/255"].tolist() == ["diverged"]
    table = claims_table(frame, None)
    row = table[table.claim == "norm decay lowers the norms"].iloc[0]
    # the one seed left has no spread to clear: not decided (it read "holds", with a spread of 0)
    assert row.holds == "not decided" and "diverged seeds left out: ND l1 0.1 (1 of 2 seeds)" in row.measured
    assert row.measured.endswith("one seed only (no spread known): ND l1 0.1: not decided")


def test_latex_output_escapes_every_underscore_outside_math(tmp_path):
    """pandas' to_latex left regnetx_200mf and "exact l_inf ms" bare, and the paper table wrote the
    model name raw: "Missing $ inserted" in LaTeX."""
    import re

    from experiments.study import write_tables

    frame = results(REGULARIZATION).assign(**{"robust acc": lambda f: f["robust@4"], "model": "regnetx_200mf"})
    frame["label"] = "ND l_inf 0.1"
    write_tables(frame, str(tmp_path), "results")
    for name in ("results.tex", "results_paper.tex"):
        text = (tmp_path / name).read_text()
        outside_math = re.sub(r"\$[^$]*\$", "", text)
        assert re.search(r"(?<!\\)_", outside_math) is None, name
        assert "regnetx\\_200mf" in text


def with_seeds(frame: pd.DataFrame, method: str, column: str, values) -> pd.DataFrame:
    """``frame`` with ``method``'s ``column`` set to ``values``, one per seed."""
    frame = frame.copy()
    for seed, value in zip((0, 1), values):
        frame.loc[(frame.method == method) & (frame.seed == seed), column] = value
    return frame


def test_norm_decay_lowers_the_norms_only_beyond_the_seed_spread_of_either_run():
    """The rule took one sd of norm decay's runs only: equal ratios and spreads got opposite
    verdicts as the spread sat in plain's seeds (30/50) or norm decay's (30/48)."""
    base = results(REGULARIZATION, jitter=0.0)
    verdict = lambda frame: dict(zip(*claims_table(frame, None)[["claim", "holds"]].T.values))["norm decay lowers the norms"]
    spread_in_plain = with_seeds(with_seeds(base, "plain", "sum l1", (30.0, 50.0)), "nd-l1", "sum l1", (39.0, 39.0))
    spread_in_nd = with_seeds(with_seeds(base, "plain", "sum l1", (40.0, 40.0)), "nd-l1", "sum l1", (30.0, 48.0))
    assert verdict(spread_in_plain) == verdict(spread_in_nd) == "does not hold"
    within = with_seeds(with_seeds(base, "plain", "sum l1", (40.0, 40.0)), "nd-l1", "sum l1", (36.0, 40.0))
    assert verdict(within) == "does not hold"  # 0.95, within two sds of the difference
    assert verdict(with_seeds(base, "nd-l1", "sum l1", (19.0, 21.0))) == "holds"


def test_batchnorm_norms_resist_only_beyond_the_seed_spread():
    """Claim 4 compared means only: seeds at 0.05 and 0.47 of plain's BN norm (mean 0.26) 'held'
    against conv/linear at 0.25."""
    base = results(REGULARIZATION, jitter=0.0)
    claim = "batch-norm norms resist norm decay"
    noisy = with_seeds(with_seeds(base, "nd-l1", "max bn", (0.5, 4.7)), "nd-l1", "sum l1", (10.0, 10.0))
    row = claims_table(noisy, None).set_index("claim").loc[claim]
    assert row.holds == "does not hold" and "seed spread ±" in row.measured
    clear = with_seeds(base, "nd-l1", "max bn", (8.9, 9.1))
    assert claims_table(clear, None).set_index("claim").loc[claim].holds == "holds"


def test_the_worst_run_is_the_one_with_the_least_margin_and_one_seed_decides_nothing():
    """'worst' named the run with the largest ratio even where another failed on its spread; a
    single seed's sd reads 0, so a verdict would clear no spread: not decided, and said."""
    base = results(REGULARIZATION, jitter=0.0)
    noisy = with_seeds(with_seeds(base, "nd-l1", "sum l1", (0.0, 24.0)), "nd-linf", "sum linf", (17.9, 18.1))
    row = claims_table(noisy, None).set_index("claim").loc["norm decay lowers the norms"]
    assert row.holds == "does not hold" and row.worst == "nd-l1 0.1"  # 0.30 ± 0.85 fails, 0.60 ± 0.01 holds
    one = results(REGULARIZATION, seeds=(0,))
    table = claims_table(one, None).set_index("claim")
    row = table.loc["norm decay lowers the norms"]
    assert "one seed only (no spread known): plain, ND l1 0.1, ND l_inf 0.1: not decided" in row.measured
    # a single seed decides no claim, either way (a 1% drop in the summed norm read "holds")
    assert set(table.holds) == {"not decided"}


def test_batchnorm_ratio_spread_scales_plains_spread_with_the_ratio():
    from experiments.claims import _ratio_spread

    plain = pd.Series({"max bn": 10.0, "max bn sd": 1.0})
    doubled = pd.Series({"max bn": 20.0, "max bn sd": 0.0})
    assert _ratio_spread(doubled, plain, "max bn") == pytest.approx(2 * 2.0 * 1.0 / 10.0)


def test_a_nan_robust_accuracy_of_a_live_run_leaves_claim_2_not_decided():
    """A run that did not diverge but has no robust accuracy at one radius (an evaluation that
    failed) read 'does not hold' beside a gain of +0.000 within its spread."""
    frame = results(REGULARIZATION)
    assert claims_table(frame, None).set_index("claim").loc[CLAIM_2].holds == "holds"
    frame.loc[frame.method == "wd", "robust@4"] = math.nan
    row = claims_table(frame, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "not decided" and "no robust accuracy (NaN) for weight decay 0.01 at eps 4/255" in row.measured


def test_claim_2_without_a_sweep_uses_the_robust_accuracy_at_the_studys_radius():
    """Without --sweep (the CIFAR-10 default) the claim was dropped from the table without a word."""
    frame = results(REGULARIZATION).drop(columns=["robust@1"])
    frame = frame.rename(columns={"robust@4": "robust acc"})
    row = claims_table(frame, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "holds" and "the study's radius" in row.measured
    gained = frame.copy()
    gained.loc[gained.method == "wd", "robust acc"] += 0.2
    row = claims_table(gained, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "does not hold" and row.worst == "weight decay 0.01"


def test_claims_of_results_with_several_models_name_the_model_they_are_decided_on():
    """Only the first model decides; with two, which one did was said nowhere."""
    frame = pd.concat([results(REGULARIZATION).assign(model=name) for name in ("vgg11", "resnet18")])
    table = claims_table(frame, None)
    assert all(m.startswith("vgg11 (the first of the models): ") for m in table.measured)
    assert not any("first of the models" in m for m in claims_table(results(REGULARIZATION), None).measured)


def test_a_run_of_one_seed_leaves_a_refutation_by_the_others_standing():
    """A one-seed run beside a weight decay that gains by more than its spread over two seeds read
    'not decided'; a run that diverged in every seed there is left out (review)."""
    frame = results({**REGULARIZATION, ("wd", 0.01): (0.95, 30.0, 25.0, 9.0)})
    frame = frame[~((frame.method == "nd-l1") & (frame.seed == 1))]  # both ND l1 runs: one seed
    row = claims_table(frame, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "does not hold" and row.worst == "weight decay 0.01"
    assert row.measured.endswith("left out, one seed only (no spread known): ND l1 0.01, ND l1 0.1")


def test_a_figure_missing_in_one_seed_is_missing_for_the_run():
    """One of two live seeds without a robust accuracy: the run read that of the other with a
    spread of 0 and two seeds, and the claim was decided on it (review)."""
    frame = results(REGULARIZATION)
    frame.loc[(frame.method == "wd") & (frame.seed == 1), "robust@4"] = math.nan
    runs = by_run(frame).set_index("method")
    assert math.isnan(runs.loc["wd", "robust@4"]) and math.isnan(runs.loc["wd", "robust@4 sd"])
    sweep = sweep_table(frame).set_index("run")
    assert sweep.loc["weight decay 0.01", "eps 4/255"] == "not measured"
    row = claims_table(frame, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "not decided" and "weight decay 0.01 at eps 4/255" in row.measured
    frame.loc[frame.method == "plain", "robust@4"] = math.nan  # plain's missing: plain is named, once
    assert "no robust accuracy (NaN) for plain at eps 4/255: not decided" in claims_table(frame, None).iloc[1].measured


def test_the_papers_latex_table_counts_a_missing_figure_as_the_claims_do():
    """It averaged the other seeds where one live seed had no robust accuracy (71.9 beside a claims
    table's 'not measured'), and wrote 'diverged' for a live run whose every seed had none (review)."""
    from experiments.study import paper_latex

    frame = diverge(results(REGULARIZATION).assign(**{"robust acc": lambda f: f["robust@4"]}), "nd-linf", (0, 1))
    frame.loc[(frame.method == "wd") & (frame.seed == 1), "robust acc"] = math.nan
    frame.loc[(frame.method == "nd-l1") & (frame.strength == 0.1), "robust acc"] = math.nan
    lines = paper_latex(frame).splitlines()
    assert lines[4] == "strength & - & 0.01 & 0.01 & 0.1 & 0.1 \\\\"
    assert lines[7] == "Robust & 80.0 & n/a & 80.0 & n/a & diverged \\\\"


def test_claim_2_refuted_names_the_run_beyond_its_spread_not_the_largest_gain():
    """It named the largest gain, +0.265 within a spread of 0.496, beside a verdict that another run
    (+0.195 ± 0.016) made (review)."""
    frame = results({**REGULARIZATION, ("wd", 0.01): (0.95, 30.0, 25.0, 9.0)}, jitter=0.005)
    frame.loc[(frame.method == "nd-l1") & (frame.strength == 0.1), "robust@4"] = [0.80, 1.30]  # +0.25 ± 0.7
    row = claims_table(frame, None).set_index("claim").loc[CLAIM_2]
    assert row.holds == "does not hold" and row.worst == "weight decay 0.01"
    assert row.measured.startswith("gain over plain the most beyond its spread: +0.150 (weight decay 0.01")
