"""The main job: a miniature of the paper's study on the bundled digits, end to end on a CPU.

python -m experiments [--out runs] [--protocol released|paper] [--seeds 0,1] [--threads N] [--dry-run]

Both studies over every registered method that fits in minutes (two seeds each), robust accuracy
at a sweep of radii, the timing study, and at the end the table of the paper's claims, each with
the figure measured on this run and whether it holds (claims.{csv,md,tex} in --out).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd

from experiments import adversarial, cli, regularize, speed
from experiments.claims import claims_table, sweep_table
from experiments.study import write_tables

# Radii (1/255 units) of the digits sweep: at 1/255 robust and clean accuracy barely differ on
# 8x8 digits; the larger radii separate the methods.
SWEEP = "1,4,8,16"
# The digits evaluation: fewer attack iterations than CIFAR-10's 100, to fit the job in minutes.
EVALUATION = ["--eval-iterations", "20", "--eval-targets", "2", "--eval-images", "256", "--sweep", SWEEP]
REGULARIZE_METHODS = "plain,wd,svc,nd-l1,nd-linf,nd-l1+bn,nd-linf+bn"
ADVERSARIAL_METHODS = "plain,pgd-at,trades,alp,pgd-at-he,trades-he,alp-he,at+nd,at+wd"


def main(argv=None) -> None:
    parser = cli.Parser(prog="python -m experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", type=cli.out_folder, help="parent folder of the three studies' folders")
    parser.add_argument("--protocol", default="released", choices=["released", "paper"])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds of every run (default 0,1)")
    parser.add_argument("--threads", type=int, help=cli.THREADS_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print every study's configuration and runs, train nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    # Chosen once, from the load at the start: each study choosing its own from the load of its
    # own start could train one method at 1 thread in one study and 2 in the next.
    count, why = (args.threads, "--threads") if args.threads is not None else cli.default_threads()
    print(f"threads: {count} for every study ({why})", file=sys.stderr, flush=True)
    threads = ["--threads", str(count)]
    shared = threads + (["--dry-run"] if args.dry_run else [])
    common = ["--protocol", args.protocol, "--seeds", args.seeds, *EVALUATION, *shared]
    start = time.perf_counter()
    # Ctrl-C names this command, which resumes every study, not the one it interrupted.
    with cli.friendly(cli.command_line("experiments", argv)):
        folders = {
            "regularize": regularize.main(
                ["--out", os.path.join(args.out, "regularize-digits"), "--methods", REGULARIZE_METHODS, *common]
            ),
            "adversarial": adversarial.main(
                ["--out", os.path.join(args.out, "adversarial-digits"), "--methods", ADVERSARIAL_METHODS, *common]
            ),
        }
        speed.main(["--quick", "--out", os.path.join(args.out, "speed"), *shared])
        if not args.dry_run:
            report(folders, args.out)
    if args.dry_run:
        print(f"dry run: every study checked, nothing trained; results would go under {os.path.abspath(args.out)}", flush=True)
        return
    print(f"all studies done in {time.perf_counter() - start:.0f} s; results under {os.path.abspath(args.out)}", flush=True)


def report(folders: dict[str, str | None], out: str) -> None:
    """The radius sweep and the claims table, from the studies' results.csv."""
    tables = {name: pd.read_csv(os.path.join(folder, "results.csv")) for name, folder in folders.items() if folder}
    for name, table in tables.items():
        print(f"\nrobust accuracy at each radius ({name}, mean ± sd over seeds):", flush=True)
        print(write_tables(sweep_table(table), folders[name], "sweep"), flush=True)
    claims = claims_table(tables.get("regularize"), tables.get("adversarial"))
    os.makedirs(out, exist_ok=True)
    print("the paper's claims, checked on this run:", flush=True)
    print(write_tables(claims, out, "claims"), flush=True)


if __name__ == "__main__":
    main()
