"""Seaborn figures of layer norms: over epochs, per layer, and their distributions.

Every figure colours a method with its registry colour (one colour per method across all
figures; strengths differ by line style), names layers by their module names, and draws the
batch-norm norm once (its l1 and l_inf norms are the same number). Norms span decades, so their
axes are logarithmic, with labelled minor ticks where a panel spans less than a decade.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib import ticker

from experiments.methods import REGISTRY, colours, how_strong

ORD_NAMES = {"l1": "l1 norm", "linf": "l_inf norm"}
# A kernel density from fewer layers than this is a guess: the figure is not drawn.
MIN_LAYERS_FOR_DENSITY = 8


def _save(grid, path: str) -> str:
    grid.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def _plain_number(value: float, _position=None) -> str:
    return f"{value:g}"


def readable_log_axis(ax, axis: str = "y") -> None:
    """Log scale, ticks at 1, 2 and 5 times the powers of ten, labelled as plain numbers (20, 0.5)."""
    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_minor_locator(ticker.LogLocator(base=10, subs=(3.0, 4.0, 6.0, 7.0, 8.0, 9.0)))
    target.set_major_formatter(ticker.FuncFormatter(_plain_number))
    target.set_minor_formatter(ticker.NullFormatter())


def labelled(norms: pd.DataFrame) -> pd.DataFrame:
    """Norm rows with the registry's method label and the strength as text; mean over seeds."""
    keys = [k for k in ("model", "method", "strength", "epoch", "layer", "index", "kind", "ord") if k in norms.columns]
    data = norms.groupby(keys, as_index=False, sort=False).norm.mean()
    data["method label"] = data.method.map(lambda m: REGISTRY[m].label)
    data["strength "] = [
        REGISTRY[m].run_label(s).removeprefix(REGISTRY[m].label).strip() or "-" for m, s in zip(data.method, data.strength)
    ]
    return data


def _palette(data: pd.DataFrame) -> dict[str, str]:
    """The registry's colours of the methods present, in registry order (legend order too)."""
    present = set(data["method label"])
    return {label: colour for label, colour in colours().items() if label in present}


def _strength_order(data: pd.DataFrame) -> list[str]:
    return sorted(data["strength "].unique(), key=lambda s: -1.0 if s == "-" else float(s))


def _panels(data: pd.DataFrame) -> pd.DataFrame:
    """One panel per norm for conv / linear layers; one batch-norm panel (l1 == l_inf)."""
    bn = data.kind == "batchnorm"
    data = data[~bn | (data.ord == "l1")].copy()
    data["norm kind"] = data.ord.map(ORD_NAMES).where(~(data.kind == "batchnorm"), "batch-norm norm")
    return data


def summed_norms_over_epochs(norms: pd.DataFrame, kinds: list[str], out: str, name: str, title: str) -> str | None:
    """Sum of the chosen layers' norms against the epoch, one colour per method, one panel per norm."""
    data = labelled(norms[norms.kind.isin(kinds)])
    if data.empty:
        return None
    data = _panels(data).groupby(["model", "method label", "strength ", "norm kind", "epoch"], as_index=False).norm.sum()
    aspect = 1.6 if data["norm kind"].nunique() == 1 else 1.0  # room for the legend beside one panel
    labels = ("epoch", f"sum of {'/'.join(kinds)} norms")
    return _method_lines(data, "epoch", labels, os.path.join(out, name), title, aspect=aspect)


def _method_lines(data: pd.DataFrame, x: str, labels: tuple[str, str], path: str, title: str, **style) -> str:
    """``norm`` against ``x`` on a log axis (``labels``: the axes' names), one colour per method, one
    line style per strength, one panel per norm kind and one row per model; saved to ``path``."""
    grid = sns.relplot(
        data=data,
        x=x,
        y="norm",
        hue="method label",
        hue_order=list(_palette(data)),
        style="strength ",
        style_order=_strength_order(data),
        col="norm kind",
        row="model",
        kind="line",
        palette=_palette(data),
        facet_kws={"sharey": False},
        height=3.2,
        **style,
    )
    grid.set_axis_labels(*labels)
    for ax in grid.axes.flat:
        readable_log_axis(ax)
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, path)


def _final(norms: pd.DataFrame) -> pd.DataFrame:
    """Each method's last epoch at its strongest setting (one point per method and layer): the
    largest beta or weight decay, the smallest SVC bound (the largest bound, 2.0, was drawn)."""
    data = labelled(norms)
    strength = pd.Series(how_strong(data.method, data.strength), index=data.index)
    data = data[strength == strength.groupby([data.model, data.method]).transform("max")]
    return data[data.epoch == data.groupby(["model", "method", "strength"]).epoch.transform("max")]


def _layer_grids(norms: pd.DataFrame, out: str, name: str, caption, kind: str, **style) -> list[str]:
    """Final norm of every layer, named on the x axis in network order, as a seaborn ``kind`` plot;
    one figure per model (``caption(model)`` its title), one panel per norm, one colour per method."""
    paths = []
    for model, data in norms.groupby("model"):
        last = _panels(_final(data)).sort_values("index")
        grid = sns.catplot(
            data=last,
            x="layer",
            y="norm",
            hue="method label",
            hue_order=list(_palette(last)),
            col="norm kind",
            kind=kind,
            palette=_palette(last),
            sharex=False,
            sharey=False,
            height=3.4,
            aspect=1.4,
            errorbar=None,
            **style,
            **({"dodge": 0.3 if last["method label"].nunique() > 1 else False} if kind == "point" else {}),
        )
        grid.set_axis_labels("layer", "operator norm after training")
        for ax in grid.axes.flat:
            readable_log_axis(ax)
            ax.tick_params(axis="x", labelrotation=90)
        grid.figure.suptitle(caption(model), y=1.03)
        paths.append(_save(grid, os.path.join(out, name.replace(".png", f"_{model}.png"))))
    return paths


def per_layer_norms(norms: pd.DataFrame, out: str, name: str, title: str) -> list[str]:
    """Final norm of every layer, named on the x axis in network order; one figure per model,
    one panel per norm (batch norm once), one colour per method (at its strongest setting)."""
    caption = lambda model: f"{title} ({model}; each method at its strongest setting, mean over seeds)"
    return _layer_grids(norms, out, name, caption, "point", markersize=4, linewidth=1)


def robust_vs_plain_bars(norms: pd.DataFrame, out: str, name: str, title: str) -> list[str]:
    """The paper's per-layer bar charts: each layer's final norm, plain against every adversarially
    trained method, side by side; one figure per model, one panel per norm."""
    return _layer_grids(norms, out, name, lambda model: f"{title} ({model})", "bar")


def norm_densities(norms: pd.DataFrame, out: str, name: str, title: str) -> str | None:
    """Density of the final conv/linear layer norms (log scale), one curve per method; None (no
    figure) when a model has fewer than ``MIN_LAYERS_FOR_DENSITY`` such layers."""
    last = _final(norms)
    last = _panels(last[last.kind.isin(["conv", "linear"])])
    layers = last.groupby("model").layer.nunique()
    if last.empty or layers.min() < MIN_LAYERS_FOR_DENSITY:
        return None
    grid = sns.displot(
        data=last,
        x="norm",
        hue="method label",
        col="norm kind",
        row="model",
        kind="kde",
        log_scale=True,
        common_norm=False,
        rug=True,
        palette=_palette(last),
        linewidth=2,
    )
    grid.set_axis_labels("operator norm of a conv / linear layer", "density")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))


def step_norms_table(results: list[dict]) -> pd.DataFrame:
    """Summed conv / linear l1 and l_inf norms at every recorded training step, one row per run and step."""
    frames = []
    for result in results:
        steps, config = result.get("step_norms"), result["config"]
        if not steps or not steps["step"]:
            continue
        kinds = {row["layer"]: row["kind"] for row in result["norms"]}
        keep = [i for i, layer in enumerate(steps["layer"]) if kinds.get(layer) in ("conv", "linear")]
        for ord_name in ("l1", "linf"):
            sums = [sum(row[i] for i in keep) for row in steps[ord_name]]
            frames.append(
                pd.DataFrame(
                    {
                        "model": config["model"],
                        "method": config["method"],
                        "strength": config["strength"],
                        "seed": config["seed"],
                        "ord": ord_name,
                        "step": steps["step"],
                        "norm": sums,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summed_norms_over_steps(results: list[dict], out: str, name: str, title: str) -> str | None:
    """Summed conv / linear norms at every recorded step (the early dynamics an epoch grid hides):
    one colour per method, one line style per strength, mean over seeds."""
    data = step_norms_table(results)
    if data.empty:
        return None
    data = data.groupby(["model", "method", "strength", "ord", "step"], as_index=False).norm.mean()
    data["method label"] = data.method.map(lambda m: REGISTRY[m].label)
    data["strength "] = [f"{s:g}" if REGISTRY[m].strength else "-" for m, s in zip(data.method, data.strength)]
    data["norm kind"] = data.ord.map(ORD_NAMES)
    labels = ("training step", "sum of conv/linear norms")
    return _method_lines(data, "step", labels, os.path.join(out, name), title, linewidth=1)
