"""The paper's claims, checked on a study's own results: each claim's figure measured on this run,
with the seed-to-seed spread, and whether it holds. Nothing here is written by hand: every number
comes from the results tables the studies write.

The claims (Liang & Huang, AAAI 2021):

1. norm decay lowers the norms it regularizes;
2. norm decay, weight decay and SVC do not raise robust accuracy;
3. adversarially trained models have norms no smaller than plainly trained ones;
4. batch-norm norms resist norm decay.
"""

from __future__ import annotations

import math

import pandas as pd

from experiments.methods import REGISTRY

KEYS = ["model", "method", "strength"]
CLAIM_2 = "norm decay, weight decay and SVC do not raise robust accuracy"
# The "worst" of a claim none of whose runs has a finite seed: there is no figure to rank.
NO_FIGURE = "-"


def by_run(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every numeric column, one row per (model, method, strength).

    Seeds whose run diverged (``diverged`` column of :func:`experiments.study.summary_table`) are
    left out: ``seeds`` counts the others, ``diverged`` the left-out ones; a run that diverged in
    every seed keeps its row, with NaN figures and ``seeds`` 0. A figure that is NaN in a seed
    that did not diverge is NaN for the run (not measured), mean and spread.
    """
    bad = results["diverged"].astype(bool) if "diverged" in results.columns else pd.Series(False, index=results.index)
    sums = [c for c in ("sum l1", "sum linf") if c in results.columns]
    bad |= results[sums].isna().any(axis=1)  # only a diverged run has NaN summed norms
    numeric = [c for c in results.columns if c not in [*KEYS, "seed", "diverged"] and pd.api.types.is_numeric_dtype(results[c])]
    kept = results[~bad]
    grouped = kept.groupby(KEYS, sort=False)[numeric]
    # A figure missing in one live seed (an evaluation that failed) is missing for the run: its
    # mean over the other seeds had a spread of 0 and the seed count of all of them.
    mean = grouped.agg(lambda column: column.mean(skipna=False))
    std = grouped.std(ddof=1).fillna(0.0).mask(mean.isna())
    runs = pd.MultiIndex.from_frame(results[KEYS].drop_duplicates())
    out = pd.concat([mean, std.add_suffix(" sd")], axis=1).reindex(runs)
    out["seeds"] = kept.groupby(KEYS).seed.nunique().reindex(runs).fillna(0).astype(int)
    out["diverged"] = results[bad].groupby(KEYS).seed.nunique().reindex(runs).fillna(0).astype(int)
    return out.reset_index()


def radii(results: pd.DataFrame) -> list[str]:
    return sorted((c.split("@", 1)[1] for c in results.columns if c.startswith("robust@")), key=float)


def sweep_table(results: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy at every radius of the sweep: ``mean ± sd`` over seeds (the mean alone for a
    run of one seed), one row per run.

    Its ``clean`` column is the accuracy on the images the radii are measured on (the run's
    ``--eval-images``), the curve's start; the accuracy on the whole test set counted other images,
    and put a robust accuracy above the clean one on small subsets. Results without it (written
    before it was recorded) give the whole test set's, named so: ``clean (all test images)``.
    """
    runs = by_run(results)
    live = runs[runs.seeds > 0]
    subset = "clean subset acc" in runs.columns and not live["clean subset acc"].isna().any()
    clean, header = ("clean subset acc", "clean") if subset else ("clean acc", "clean (all test images)")
    rows = []
    for _, run in runs.iterrows():
        row = {"model": run.model, "run": REGISTRY[run.method].run_label(run.strength), "seeds": int(run.seeds)}
        if runs.diverged.any():  # the seeds left out, named only when there are some
            row["diverged"] = int(run.diverged)
        row[header] = _spread(run, clean)
        for r in radii(results):
            row[f"eps {r}/255"] = _spread(run, f"robust@{r}")
        rows.append(row)
    return pd.DataFrame(rows)


def _spread(run: pd.Series, column: str) -> str:
    """``mean ± sd``; the mean alone where one seed is left (its spread is unknown, not 0)."""
    if not run.seeds:
        return "diverged"
    if math.isnan(run[column]):
        return "not measured"
    return f"{run[column]:.3f}" if run.seeds == 1 else f"{run[column]:.3f} ± {run[f'{column} sd']:.3f}"


def _label(run: pd.Series) -> str:
    return REGISTRY[run.method].run_label(run.strength)


def _live(run: pd.Series | None) -> bool:
    """Whether ``run`` has a seed that did not diverge (its figures are numbers, not NaN)."""
    return run is not None and run.seeds > 0


def _decided(claim, runs: pd.DataFrame) -> dict | None:
    """``claim(runs)`` with its runs checked (:func:`_divergence`). A run of one seed has no spread
    for a verdict to clear: a claim that uses one is not decided, unless the runs of several seeds
    already refute it without it (as a run that diverged in every seed is left out then)."""
    row = claim(runs)
    if row is None:
        return None
    single = {_label(r) for r in row["used"] if r is not None and r.seeds == 1}
    if single:
        alone = claim(runs.assign(seeds=runs.seeds.where(runs.seeds != 1, 0)))
        if alone is not None and alone["holds"] is not None and not bool(alone["holds"]):
            return _divergence(alone, left_out=single)
    return _divergence(row)


def _divergence(row: dict, left_out: frozenset | set = frozenset()) -> dict:
    """``row`` with the runs it used (``row["used"]``) checked for divergence. Its verdict comes from
    the runs with a finite seed alone; one that diverged in every seed (NaN figures decide nothing)
    makes the claim not decided, unless the finite runs already refute it (then it is named as
    left out). Seeds that diverged in the other runs were left out of the figures, said in ``measured``.
    A run of one seed (alone, or the one left by divergence) has no spread to clear: the claim is
    then not decided either."""
    used = row.pop("used")
    dead = [_label(r) for r in used if r.seeds == 0 and _label(r) not in left_out]
    partial = [f"{_label(r)} ({int(r.diverged)} of {int(r.diverged + r.seeds)} seeds)" for r in used if r.seeds and r.diverged]
    if dead and row["holds"] is not None and not bool(row["holds"]):
        row["measured"] += f"; left out: {', '.join(dead)} diverged in every seed"
    elif dead:
        row["holds"] = None
        row["measured"] += f"; not decided: {', '.join(dead)} diverged in every seed"
    if partial:
        row["measured"] += f"; diverged seeds left out: {', '.join(partial)}"
    if left_out:  # the runs of several seeds refute the claim without them
        row["measured"] += f"; left out, one seed only (no spread known): {', '.join(sorted(left_out))}"
    single = [_label(r) for r in used if r.seeds == 1]
    if single:  # its sd reads 0: a verdict would clear no spread there, in either direction
        row["measured"] += f"; one seed only (no spread known): {', '.join(single)}"
        if row["holds"] is not None:
            row["holds"] = None
            row["measured"] += ": not decided"
    return row


def _strongest(runs: pd.DataFrame, method: str) -> pd.Series | None:
    rows = runs[runs.method == method]
    return None if rows.empty else rows.loc[rows.strength.map(REGISTRY[method].regularizes).idxmax()]


def _plain(runs: pd.DataFrame) -> pd.Series | None:
    rows = runs[runs.method == "plain"]
    return None if rows.empty else rows.iloc[0]


def _relative_spread(run: pd.Series, plain: pd.Series, column: str) -> float:
    """The seed spread of ``run - plain`` in ``column`` (two standard deviations of the difference),
    relative to plain's mean: the margin every claim's verdict must clear."""
    return 2 * math.hypot(run[f"{column} sd"], plain[f"{column} sd"]) / plain[column]


def _ratio_spread(run: pd.Series, plain: pd.Series, column: str) -> float:
    """Two standard deviations of the ratio ``run / plain`` in ``column`` (first-order, the seeds
    of the two runs taken as independent): ``2 sqrt(sd_run^2 + r^2 sd_plain^2) / plain``. At a
    ratio of 1 this is :func:`_relative_spread`; away from 1, plain's spread scales with it."""
    ratio = run[column] / plain[column]
    return 2 * math.hypot(run[f"{column} sd"], ratio * plain[f"{column} sd"]) / plain[column]


def norm_decay_lowers_norms(runs: pd.DataFrame) -> dict | None:
    """Claim 1: at its largest beta, each norm decay's summed norm over plain training's is below 1
    by more than the seed spread (two standard deviations of the difference, relative to plain's)."""
    plain = _plain(runs)
    ratios, used = {}, [plain]
    for method, column in (("nd-l1", "sum l1"), ("nd-linf", "sum linf")):
        nd = _strongest(runs, method)
        if nd is not None and plain is not None:
            live = _live(nd) and _live(plain)
            spread = _relative_spread(nd, plain, column) if live else math.nan
            ratios[f"{method} {nd.strength:g}"] = (nd[column] / plain[column], spread, live)
            used.append(nd)
    if not ratios:
        return None
    finite = {k: (v, s) for k, (v, s, live) in ratios.items() if live}
    figure = "; ".join(f"{k}: {v:.2f} ± {s:.2f}" if live else f"{k}: diverged" for k, (v, s, live) in ratios.items())
    return {
        "claim": "norm decay lowers the norms",
        "measured": f"summed norm / plain's: {figure}",
        "holds": all(v + s < 1 for v, s in finite.values()),  # below 1 by more than the spread
        "worst": max(finite, key=lambda k: sum(finite[k])) if finite else NO_FIGURE,  # the least margin
        "used": used,
    }


def _robust_columns(results: pd.DataFrame) -> list[tuple[str, str]]:
    """``(column, radius as the claims name it)`` of every robust accuracy: the sweep's radii, or,
    without a sweep, the study's own radius (``robust acc``, at its ``--eval-eps``)."""
    sweep = [(f"robust@{r}", f"eps {r}/255") for r in radii(results)]
    return sweep or ([("robust acc", "the study's radius")] if "robust acc" in results.columns else [])


def regularizers_do_not_raise_robustness(runs: pd.DataFrame, results: pd.DataFrame) -> dict | None:
    """Claim 2: no norm decay, weight decay or SVC run is more robust than plain training by more
    than the seed-to-seed spread (two standard deviations of the difference), at any radius (of
    the sweep; without one, at the study's radius). A NaN accuracy of a run that did not diverge
    (an evaluation that failed) decides nothing: the claim is then not decided, unless another
    run already refutes it."""
    plain = _plain(runs)
    candidates = runs[runs.method.map(lambda m: REGISTRY[m].optimizer in ("nd", "wd", "svc") and not REGISTRY[m].adversarial)]
    columns = _robust_columns(results)
    if plain is None or candidates.empty or not columns:
        return None
    worst, refuting, verdict, unmeasured = None, None, True, []
    for column, radius in columns:
        for _, run in candidates.iterrows():
            if not (_live(run) and _live(plain)):
                continue  # NaN figures: decided by _divergence, never the worst
            gain = run[column] - plain[column]
            spread = 2 * math.hypot(run[f"{column} sd"], plain[f"{column} sd"])
            if math.isnan(gain) or math.isnan(spread):
                missing = "plain" if math.isnan(plain[column]) else REGISTRY[run.method].run_label(run.strength)
                if f"{missing} at {radius}" not in unmeasured:
                    unmeasured.append(f"{missing} at {radius}")
                continue
            figure = (gain, spread, REGISTRY[run.method].run_label(run.strength), radius)
            if worst is None or gain > worst[0]:
                worst = figure
            if refuting is None or gain - spread > refuting[0] - refuting[1]:  # the least margin
                refuting = figure
            verdict &= gain <= spread
    used = [plain, *(run for _, run in candidates.iterrows())]
    if worst is None:
        if all(_live(run) for run in used) and not unmeasured:
            return None
        measured = "largest gain over plain: no run with a finite seed to compare"
        if unmeasured:
            measured = f"largest gain over plain: no robust accuracy measured ({', '.join(unmeasured)})"
        return {"claim": CLAIM_2, "measured": measured, "holds": None if unmeasured else True, "worst": NO_FIGURE, "used": used}
    # Refuted: the run beyond its spread by the most (the largest gain may be within its own).
    gain, spread, label, radius = worst if verdict else refuting
    what = "largest gain over plain" if verdict else "gain over plain the most beyond its spread"
    measured = f"{what}: {gain:+.3f} ({label}, {radius}; seed spread ±{spread:.3f})"
    if verdict:
        measured += "; every gain within its spread"
    if unmeasured:
        measured += f"; no robust accuracy (NaN) for {', '.join(unmeasured)}"
        if verdict:
            measured += ": not decided"
    return {
        "claim": CLAIM_2,
        "measured": measured,
        "holds": None if verdict and unmeasured else verdict,
        "worst": label,
        "used": used,
    }


def adversarial_norms_no_smaller(runs: pd.DataFrame) -> dict | None:
    """Claim 3: no adversarially trained model's summed l1 or l_inf norm is smaller than plain
    training's by more than the seed spread (two standard deviations of the difference)."""
    plain = _plain(runs)
    trained = runs[runs.method.map(lambda m: REGISTRY[m].adversarial and REGISTRY[m].optimizer == "sgd")]
    if plain is None or trained.empty:
        return None
    ratios, verdict = {}, True
    for _, run in trained.iterrows():
        for column in ("sum l1", "sum linf"):
            name = f"{REGISTRY[run.method].label} {column[4:]}"
            if not (_live(run) and _live(plain)):
                ratios[name] = None  # NaN figures: decided by _divergence, never the smallest
                continue
            spread = _relative_spread(run, plain, column)
            ratio = run[column] / plain[column]
            ratios[name] = (ratio, spread)
            verdict &= ratio >= 1 - spread  # smaller than plain's by more than the seed spread: fails
    finite = {k: v for k, v in ratios.items() if v is not None}
    each = ", ".join(f"{k} {v[0]:.2f}" if v else f"{k} diverged" for k, v in ratios.items())
    if finite:
        smallest = min(finite, key=lambda k: finite[k][0])
        ratio, spread = finite[smallest]
        measured = f"smallest summed norm / plain's: {ratio:.2f} ± {spread:.2f} ({smallest}); {each}"
    else:
        smallest, measured = NO_FIGURE, f"smallest summed norm / plain's: no run with a finite seed to compare; {each}"
    return {
        "claim": "adversarially trained models have norms no smaller than plain ones",
        "measured": measured,
        "holds": verdict,
        "worst": smallest,
        "used": [plain, *(run for _, run in trained.iterrows())],
    }


def batchnorm_resists_norm_decay(runs: pd.DataFrame) -> dict | None:
    """Claim 4: at the largest beta, norm decay (without projection) lowers the largest batch-norm
    norm less than the conv/linear norms it regularizes: its ratio to plain's exceeds theirs by
    more than the seed spread (two standard deviations of each ratio, :func:`_ratio_spread`, combined)."""
    plain = _plain(runs)
    pairs, used = {}, [plain]
    for method, column in (("nd-l1", "sum l1"), ("nd-linf", "sum linf")):
        nd = _strongest(runs, method)
        # A plain run with no batch norm has NaN "max bn" with seeds counted; one that diverged
        # in every seed has NaN too, and the claim is then not decided rather than left out.
        if nd is not None and plain is not None and (plain.seeds == 0 or not math.isnan(plain["max bn"])):
            live = _live(nd) and _live(plain)
            if live:
                spread = math.hypot(_ratio_spread(nd, plain, "max bn"), _ratio_spread(nd, plain, column))
                pairs[f"{method} {nd.strength:g}"] = (nd["max bn"] / plain["max bn"], nd[column] / plain[column], spread)
            else:
                pairs[f"{method} {nd.strength:g}"] = None
            used.append(nd)
    if not pairs:
        return None
    finite = {k: v for k, v in pairs.items() if v is not None}
    return {
        "claim": "batch-norm norms resist norm decay",
        "measured": "; ".join(
            f"{k}: BN {v[0]:.2f} vs conv/linear {v[1]:.2f} of plain's (seed spread ±{v[2]:.2f})" if v else f"{k}: diverged"
            for k, v in pairs.items()
        ),
        "holds": all(b - c > spread for b, c, spread in finite.values()),
        "worst": min(finite, key=lambda k: finite[k][0] - finite[k][1] - finite[k][2]) if finite else NO_FIGURE,
        "used": used,
    }


def _first_model(results: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows of the first model in ``results``, and its name where there are others (to be said)."""
    model = results.model.iloc[0]
    return results[results.model == model], (model if results.model.nunique() > 1 else None)


def _of_model(row: dict | None, model: str | None) -> dict | None:
    """``row`` with the model it was decided on named in ``measured``, where the results hold several."""
    if row is not None and model is not None:
        row["measured"] = f"{model} (the first of the models): {row['measured']}"
    return row


def claims_table(regularization: pd.DataFrame | None, adversarial: pd.DataFrame | None) -> pd.DataFrame:
    """The four claims, from the regularization and adversarial studies' ``results.csv`` tables
    (one model: the first). A claim whose runs are missing is left out. A claim is decided on the
    runs with a finite seed; one that needs a run that diverged in every seed is ``not decided``
    unless those runs already refute it; seeds that diverged are left out of the figures, all said
    in ``measured``. So is a claim that needs a run of one seed (no spread known; :func:`_decided`)."""
    rows = []
    if regularization is not None and not regularization.empty:
        frame, which = _first_model(regularization)
        runs = by_run(frame)
        robustness = lambda r: regularizers_do_not_raise_robustness(r, frame)
        for claim in (norm_decay_lowers_norms, robustness, batchnorm_resists_norm_decay):
            rows.append(_of_model(_decided(claim, runs), which))
    if adversarial is not None and not adversarial.empty:
        frame, which = _first_model(adversarial)
        rows.append(_of_model(_decided(adversarial_norms_no_smaller, by_run(frame)), which))
    table = pd.DataFrame([r for r in rows if r is not None])
    if not table.empty:
        table["holds"] = [{True: "holds", False: "does not hold"}.get(v, "not decided") for v in table.holds]
    return table
