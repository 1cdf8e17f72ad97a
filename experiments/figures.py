"""Seaborn figures of layer norms: over epochs, per layer, and their distributions."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

ORD_NAMES = {"l1": "l1 norm", "linf": "l_inf norm"}


def palette(frame: pd.DataFrame) -> str:
    """Distinct hues per run: tab10 while it suffices, tab20 (paired shades) for up to 20 runs."""
    return "tab10" if frame.run.nunique() <= 10 else "tab20"


def _save(grid, path: str) -> str:
    grid.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def _final(norms: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows of its last epoch, with a readable norm-kind column."""
    last = norms[norms.epoch == norms.groupby(["model", "run"]).epoch.transform("max")].copy()
    last["norm kind"] = last.ord.map(ORD_NAMES)
    return last


def summed_norms_over_epochs(norms: pd.DataFrame, kinds: list[str], out: str, name: str, title: str) -> str | None:
    """Sum of the chosen layers' norms against the epoch, one line per run, one panel per norm."""
    data = norms[norms.kind.isin(kinds)].groupby(["model", "run", "ord", "epoch"], as_index=False).norm.sum()
    if data.empty:
        return None
    data["norm kind"] = data.ord.map(ORD_NAMES)
    grid = sns.relplot(
        data=data,
        x="epoch",
        y="norm",
        hue="run",
        col="norm kind",
        row="model",
        kind="line",
        palette=palette(data),
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("epoch", f"sum of {'/'.join(kinds)} norms")
    grid.set(yscale="log")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))


def per_layer_norms(norms: pd.DataFrame, out: str, name: str, title: str) -> list[str]:
    """Final norm of every layer, named on the x axis in network order; one figure per model,
    conv/linear layers and batch norms in separate rows, one coloured line per run."""
    paths = []
    for model, data in norms.groupby("model"):
        last = _final(data)
        last["layers"] = last.kind.map(lambda k: "batch norm" if k == "batchnorm" else "conv / linear")
        grid = sns.catplot(
            data=last.sort_values("index"),
            x="layer",
            y="norm",
            hue="run",
            col="norm kind",
            row="layers",
            kind="point",
            palette=palette(last),
            sharex=False,
            sharey=False,
            height=3.2,
            aspect=1.8,
            markersize=4,
            linewidth=1,
        )
        grid.set_axis_labels("layer", "operator norm after training")
        grid.set(yscale="log")
        for ax in grid.axes.flat:
            ax.tick_params(axis="x", labelrotation=90)
        grid.figure.suptitle(f"{title} ({model})", y=1.02)
        paths.append(_save(grid, os.path.join(out, name.replace(".png", f"_{model}.png"))))
    return paths


def norm_densities(norms: pd.DataFrame, out: str, name: str, title: str) -> str:
    """Density of the final conv/linear layer norms (log scale), one curve per run."""
    last = _final(norms)
    last = last[last.kind.isin(["conv", "linear"])]
    grid = sns.displot(
        data=last,
        x="norm",
        hue="run",
        col="norm kind",
        kind="kde",
        log_scale=True,
        common_norm=False,
        rug=True,
        palette=palette(last),
        linewidth=2,
    )
    grid.set_axis_labels("operator norm of a conv / linear layer", "density")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))
