"""Adversarial-training study: plain training vs PGD-AT, TRADES and ALP; robust accuracy (APGD-CE +
APGD-T) and how the layer norms of robust and non-robust models compare.

    python -m experiments.adversarial                                  # digits, minutes on a CPU
    python -m experiments.adversarial --dataset cifar10 --data-dir data --models resnet18   # the paper (GPU)

Training attack: eps 0.031, step 0.007, 10 steps (paper); evaluation eps 8/255. Writes
results.{csv,md,tex}, norms.csv and figures into one folder (printed), resuming finished runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import cli, figures
from experiments.config import adversarial_study_defaults
from experiments.methods import METHODS, grid
from experiments.study import (
    common_arguments,
    configs_for,
    draw_figures,
    names_given,
    norms_table,
    run_study,
    summary_table,
    write_tables,
)


def report(results: list[dict], out: str) -> None:
    """results.{csv,md,tex}, norms.csv and the figures of the adversarial-training study."""
    print(write_tables(summary_table(results), out, "results"), flush=True)
    norms_table(results).to_csv(os.path.join(out, "norms.csv"), index=False)

    def draw(results: list[dict], norms) -> list[str | None]:
        return [
            figures.summed_norms_over_steps(
                results, out, "conv_linear_norms_steps.png", "Conv and linear layer norms at every step"
            ),
            figures.norm_densities(norms, out, "norm_density.png", "Layer norms of robust and non-robust models"),
            *figures.robust_vs_plain_bars(norms, out, "layer_norms.png", "Norm of every layer: robust vs non-robust training"),
        ]

    draw_figures(results, draw)


def main(argv=None) -> str | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = cli.Parser(
        prog="python -m experiments.adversarial", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_arguments(parser)
    parser.add_argument("--eval-eps", type=float, help="attack radius in 1/255 (default and paper: 8)")
    parser.add_argument("--lr", type=float, help="learning rate (released: 0.1 for every run of this study on cifar10)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated methods (default: {', '.join(grid('adversarial', True))}), from {', '.join(METHODS)}",
    )
    args = parser.parse_args(argv)
    names = names_given(args.methods, "--methods", parser, METHODS, "method")
    fixed = adversarial_study_defaults(args.dataset)
    if args.eval_eps is not None:
        fixed["eval_eps"] = args.eval_eps
    if args.lr is not None:
        fixed["lr"] = args.lr
    out = args.out or os.path.join("runs", f"adversarial-{args.dataset}")
    study = grid("adversarial", args.dataset != "cifar10", names)
    configs = configs_for(args, parser, study, **fixed)
    return run_study("adversarial", "experiments.adversarial", argv, args, configs, out, report)


if __name__ == "__main__":
    main()
