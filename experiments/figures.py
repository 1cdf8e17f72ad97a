"""Seaborn figures of layer norms: over epochs, per layer, and their distributions."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

ORD_NAMES = {"l1": "l1 norm", "linf": "l_inf norm"}


def _save(grid, path: str) -> str:
    grid.figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(grid.figure)
    return path


def summed_norms_over_epochs(norms: pd.DataFrame, kinds: list[str], out: str, name: str, title: str) -> str | None:
    """Sum of the chosen layers' norms against the epoch, one line per run, one panel per norm."""
    data = norms[norms.kind.isin(kinds)].groupby(["model", "run", "ord", "epoch"], as_index=False).norm.sum()
    if data.empty:
        return None
    data["norm kind"] = data.ord.map(ORD_NAMES)
    grid = sns.relplot(
        data=data, x="epoch", y="norm", hue="run", col="norm kind", row="model", kind="line", facet_kws={"sharey": False}
    )
    grid.set_axis_labels("epoch", f"sum of {'/'.join(kinds)} norms")
    grid.set(yscale="log")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))


def per_layer_norms(norms: pd.DataFrame, out: str, name: str, title: str) -> str:
    """Final norm of every layer (x: layer position in the network), one marker line per run."""
    last = norms[norms.epoch == norms.groupby("run").epoch.transform("max")].copy()
    last["norm kind"] = last.ord.map(ORD_NAMES)
    grid = sns.relplot(
        data=last,
        x="index",
        y="norm",
        hue="run",
        style="kind",
        col="norm kind",
        row="model",
        kind="line",
        marker="o",
        dashes=False,
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("layer (position in the network)", "operator norm after training")
    grid.set(yscale="log")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))


def norm_densities(norms: pd.DataFrame, out: str, name: str, title: str) -> str:
    """Density of the final conv/linear layer norms (log scale), one curve per run."""
    last = norms[(norms.epoch == norms.groupby("run").epoch.transform("max")) & norms.kind.isin(["conv", "linear"])].copy()
    last["norm kind"] = last.ord.map(ORD_NAMES)
    grid = sns.displot(data=last, x="norm", hue="run", col="norm kind", kind="kde", log_scale=True, common_norm=False, fill=True)
    grid.set_axis_labels("operator norm of a conv / linear layer", "density")
    grid.figure.suptitle(title, y=1.03)
    return _save(grid, os.path.join(out, name))
