"""What every study shares: a grid of runs in one output folder, resumed run by run, and its reports."""

from __future__ import annotations

import argparse
import math
import os
import sys

import pandas as pd

from experiments.data import DataError
from experiments.methods import METHODS
from experiments.models import MODELS
from experiments.train import RunConfig, train


def run_label(config: RunConfig) -> str:
    return config.method if config.method in ("plain", "pgd-at", "trades", "alp") else f"{config.method} {config.strength:g}"


def run_grid(configs: list[RunConfig], out: str) -> list[dict]:
    """Train every config into ``out/<model>/<method>-<strength>``; finished runs are read back, not rerun."""
    results = []
    for i, config in enumerate(configs, 1):
        folder = os.path.join(out, config.model, f"{config.method}-{config.strength:g}")
        state = "done" if os.path.exists(os.path.join(folder, "result.json")) else "training"
        print(f"[{i}/{len(configs)}] {config.model} {run_label(config)}: {state}", file=sys.stderr)
        result = train(config, folder, resume=True)
        result["label"] = run_label(config)
        results.append(result)
    return results


def summary_table(results: list[dict]) -> pd.DataFrame:
    """One row per run: accuracies and the final summed norms."""
    rows = []
    for result in results:
        config, norms = result["config"], pd.DataFrame(result["norms"])
        last = norms[norms.epoch == norms.epoch.max()]
        linear = last[last.kind.isin(["conv", "linear"])]
        row = {"model": config["model"], "method": config["method"], "strength": config["strength"]}
        row.update({f"{k} acc": v for k, v in result["accuracy"].items()})
        row["sum l1"] = linear[linear.ord == "l1"].norm.sum()
        row["sum linf"] = linear[linear.ord == "linf"].norm.sum()
        bn = last[last.kind == "batchnorm"]
        row["max bn"] = bn[bn.ord == "l1"].norm.max() if len(bn) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def norms_table(results: list[dict]) -> pd.DataFrame:
    frames = []
    for result in results:
        frame = pd.DataFrame(result["norms"])
        frame.insert(0, "run", result["label"])
        frame.insert(0, "model", result["config"]["model"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _markdown(frame: pd.DataFrame) -> str:
    # Written here: pandas' to_markdown needs the tabulate package for one table.
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"


def write_tables(frame: pd.DataFrame, out: str, name: str) -> str:
    """CSV, Markdown and LaTeX versions of a table; returns the Markdown."""
    frame.to_csv(os.path.join(out, f"{name}.csv"), index=False)
    markdown = _markdown(frame)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
    frame.to_latex(os.path.join(out, f"{name}.tex"), index=False, float_format="%.4g")
    return markdown


def common_arguments(parser: argparse.ArgumentParser, default_models: str) -> None:
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--models", default=default_models, help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--epochs", type=int, help="default: 15 (digits) or 120 (cifar10, the paper)")
    parser.add_argument("--eval-images", type=int, help="test images attacked (default 256 digits, 1024 cifar10)")
    parser.add_argument("--eval-iterations", type=int, help="APGD iterations (default 50 digits, 100 cifar10)")
    parser.add_argument("--eval-targets", type=int, help="APGD-T target classes (default 3 digits, 9 cifar10)")
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default runs/<study>-<dataset>)")


def configs_for(args, parser, grid: dict[str, list[float]], **fixed) -> list[RunConfig]:
    """The study's grid as configs, with the command line's choices; bad names end in exit code 2."""
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    bad = [m for m in grid if m not in METHODS]
    if bad:
        parser.error(f"unknown method(s) {bad}; choose from {list(METHODS)}")
    base = RunConfig.paper_cifar10 if args.dataset == "cifar10" else RunConfig
    common = {"dataset": args.dataset, "data_dir": args.data_dir, "download": args.download, "seed": args.seed, **fixed}
    if args.epochs:
        common["epochs"] = args.epochs
        common["milestones"] = (
            tuple(m for m in base().milestones if m < args.epochs) if args.dataset == "digits" else base().milestones
        )
    for option in ("eval_images", "eval_iterations", "eval_targets"):
        if getattr(args, option):
            common[option] = getattr(args, option)
    return [base(model=m, method=method, strength=s, **common) for m in models for method, values in grid.items() for s in values]


def run_study(configs: list[RunConfig], out: str) -> list[dict]:
    """Run the grid, turning a missing data set into a clear message and exit code 2."""
    os.makedirs(out, exist_ok=True)
    print(f"writing to {os.path.abspath(out)}", file=sys.stderr)
    try:
        return run_grid(configs, out)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
