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


def by_run(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every numeric column, one row per (model, method, strength)."""
    numeric = [c for c in results.columns if c not in [*KEYS, "seed"] and pd.api.types.is_numeric_dtype(results[c])]
    grouped = results.groupby(KEYS, sort=False)[numeric]
    mean, std = grouped.mean(), grouped.std(ddof=1).fillna(0.0)
    out = pd.concat([mean, std.add_suffix(" sd")], axis=1)
    out["seeds"] = results.groupby(KEYS, sort=False).seed.nunique()
    return out.reset_index()


def radii(results: pd.DataFrame) -> list[str]:
    return sorted((c.split("@", 1)[1] for c in results.columns if c.startswith("robust@")), key=float)


def sweep_table(results: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy at every radius of the sweep: ``mean ± sd`` over seeds, one row per run."""
    runs = by_run(results)
    rows = []
    for _, run in runs.iterrows():
        row = {"model": run.model, "run": REGISTRY[run.method].run_label(run.strength), "seeds": int(run.seeds)}
        row["clean"] = f"{run['clean acc']:.3f} ± {run['clean acc sd']:.3f}"
        for r in radii(results):
            row[f"eps {r}/255"] = f"{run[f'robust@{r}']:.3f} ± {run[f'robust@{r} sd']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _strongest(runs: pd.DataFrame, method: str) -> pd.Series | None:
    rows = runs[runs.method == method]
    return None if rows.empty else rows.loc[rows.strength.idxmax()]


def _plain(runs: pd.DataFrame) -> pd.Series | None:
    rows = runs[runs.method == "plain"]
    return None if rows.empty else rows.iloc[0]


def norm_decay_lowers_norms(runs: pd.DataFrame) -> dict | None:
    """Claim 1: at its largest beta, each norm decay's summed norm over plain training's (< 1 holds)."""
    plain = _plain(runs)
    ratios = {}
    for method, column in (("nd-l1", "sum l1"), ("nd-linf", "sum linf")):
        nd = _strongest(runs, method)
        if nd is not None and plain is not None:
            ratios[f"{method} {nd.strength:g}"] = (nd[column] / plain[column], nd[f"{column} sd"] / plain[column])
    if not ratios:
        return None
    worst = max(ratios, key=lambda k: ratios[k][0])
    figure = "; ".join(f"{k}: {v:.2f} ± {s:.2f}" for k, (v, s) in ratios.items())
    return {
        "claim": "norm decay lowers the norms",
        "measured": f"summed norm / plain's: {figure}",
        "holds": all(v + s < 1 for v, s in ratios.values()),
        "worst": worst,
    }


def regularizers_do_not_raise_robustness(runs: pd.DataFrame, results: pd.DataFrame) -> dict | None:
    """Claim 2: no norm decay, weight decay or SVC run is more robust than plain training by more
    than the seed-to-seed spread (two standard deviations of the difference), at any radius."""
    plain = _plain(runs)
    candidates = runs[runs.method.map(lambda m: REGISTRY[m].optimizer in ("nd", "wd", "svc") and not REGISTRY[m].adversarial)]
    if plain is None or candidates.empty:
        return None
    worst, verdict = None, True
    for r in radii(results):
        column = f"robust@{r}"
        for _, run in candidates.iterrows():
            gain = run[column] - plain[column]
            spread = 2 * math.hypot(run[f"{column} sd"], plain[f"{column} sd"])
            if worst is None or gain > worst[0]:
                worst = (gain, spread, REGISTRY[run.method].run_label(run.strength), r)
            verdict &= gain <= spread
    if worst is None:
        return None
    gain, spread, label, r = worst
    return {
        "claim": "norm decay, weight decay and SVC do not raise robust accuracy",
        "measured": f"largest gain over plain: {gain:+.3f} ({label}, eps {r}/255; seed spread ±{spread:.3f}); "
        "every gain within its spread"
        if verdict
        else f"largest gain over plain: {gain:+.3f} ({label}, eps {r}/255; seed spread ±{spread:.3f})",
        "holds": verdict,
        "worst": label,
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
            spread = 2 * math.hypot(run[f"{column} sd"], plain[f"{column} sd"]) / plain[column]
            ratio = run[column] / plain[column]
            ratios[f"{REGISTRY[run.method].label} {column[4:]}"] = (ratio, spread)
            verdict &= ratio >= 1 - spread  # smaller than plain's by more than the seed spread: fails
    smallest = min(ratios, key=lambda k: ratios[k][0])
    ratio, spread = ratios[smallest]
    return {
        "claim": "adversarially trained models have norms no smaller than plain ones",
        "measured": f"smallest summed norm / plain's: {ratio:.2f} ± {spread:.2f} ({smallest}); "
        + ", ".join(f"{k} {v:.2f}" for k, (v, _) in ratios.items()),
        "holds": verdict,
        "worst": smallest,
    }


def batchnorm_resists_norm_decay(runs: pd.DataFrame) -> dict | None:
    """Claim 4: at the largest beta, norm decay (without projection) lowers the largest batch-norm
    norm less than the conv/linear norms it regularizes (ratio to plain closer to 1)."""
    plain = _plain(runs)
    pairs = {}
    for method, column in (("nd-l1", "sum l1"), ("nd-linf", "sum linf")):
        nd = _strongest(runs, method)
        if nd is not None and plain is not None and not math.isnan(plain["max bn"]):
            pairs[f"{method} {nd.strength:g}"] = (nd["max bn"] / plain["max bn"], nd[column] / plain[column])
    if not pairs:
        return None
    return {
        "claim": "batch-norm norms resist norm decay",
        "measured": "; ".join(f"{k}: BN {b:.2f} vs conv/linear {c:.2f} of plain's" for k, (b, c) in pairs.items()),
        "holds": all(b > c for b, c in pairs.values()),
        "worst": min(pairs, key=lambda k: pairs[k][0] - pairs[k][1]),
    }


def claims_table(regularization: pd.DataFrame | None, adversarial: pd.DataFrame | None) -> pd.DataFrame:
    """The four claims, from the regularization and adversarial studies' ``results.csv`` tables
    (one model: the first). A claim whose runs are missing is left out."""
    rows = []
    if regularization is not None and not regularization.empty:
        model = regularization.model.iloc[0]
        frame = regularization[regularization.model == model]
        runs = by_run(frame)
        rows += [norm_decay_lowers_norms(runs), regularizers_do_not_raise_robustness(runs, frame)]
        rows += [batchnorm_resists_norm_decay(runs)]
    if adversarial is not None and not adversarial.empty:
        model = adversarial.model.iloc[0]
        rows.append(adversarial_norms_no_smaller(by_run(adversarial[adversarial.model == model])))
    table = pd.DataFrame([r for r in rows if r is not None])
    if not table.empty:
        table["holds"] = table.holds.map({True: "holds", False: "does not hold"})
    return table
