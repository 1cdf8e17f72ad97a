"""Regularization study: plain training vs norm decay (l1, l_inf), weight decay, SVC and norm decay
with batch-norm projection; clean and robust accuracy, and every layer's norms during training.

    python -m experiments.regularize                                   # digits, minutes on a CPU
    python -m experiments.regularize --dataset cifar10 --data-dir data \\
        --models vgg11,resnet18,senet18,regnetx_200mf   # the released protocol (GPU)

Writes results.{csv,md,tex}, norms.csv and figures into one folder (printed), resuming finished runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import cli, figures
from experiments import protocol as P
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


def study_grid(args, parser) -> dict[str, list[float]]:
    """The registry's grid: its CIFAR-10 strengths with ``--grid paper`` (default on cifar10), its
    digits strengths with ``--grid quick``; ``--methods`` picks any registered methods."""
    quick = (args.grid or ("paper" if args.dataset == "cifar10" else "quick")) == "quick"
    names = names_given(args.methods, "--methods", parser, METHODS, "method")
    return grid("regularize", quick, names)


def report(results: list[dict], out: str) -> None:
    """results.{csv,md,tex}, norms.csv and the figures of the regularization study."""
    print(write_tables(summary_table(results), out, "results"), flush=True)
    norms_table(results).to_csv(os.path.join(out, "norms.csv"), index=False)

    def draw(results: list[dict], norms) -> list[str | None]:
        return [
            figures.summed_norms_over_steps(
                results, out, "conv_linear_norms_steps.png", "Conv and linear layer norms at every step"
            ),
            figures.summed_norms_over_epochs(
                norms, ["conv", "linear"], out, "conv_linear_norms.png", "Conv and linear layer norms during training"
            ),
            figures.summed_norms_over_epochs(
                norms, ["batchnorm"], out, "batchnorm_norms.png", "Batch-norm layer norms during training"
            ),
            *figures.per_layer_norms(norms, out, "layer_norms.png", "Norm of every layer after training"),
        ]

    draw_figures(results, draw)


def main(argv=None) -> str | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = cli.Parser(
        prog="python -m experiments.regularize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_arguments(parser)
    parser.add_argument("--grid", choices=["quick", "paper"], help="method sweep (default: quick on digits, paper on cifar10)")
    parser.add_argument(
        "--methods",
        help=f"comma-separated methods (default: {', '.join(grid('regularize', True))}), from {', '.join(METHODS)}",
    )
    parser.add_argument("--eval-eps", type=float, default=P.EVAL_EPS_REGULARIZE, help="attack radius in 1/255 (paper: 1)")
    args = parser.parse_args(argv)
    study = study_grid(args, parser)
    out = args.out or os.path.join("runs", f"regularize-{args.dataset}")
    configs = configs_for(args, parser, study, eval_eps=args.eval_eps)
    return run_study("regularize", "experiments.regularize", argv, args, configs, out, report)


if __name__ == "__main__":
    main()
