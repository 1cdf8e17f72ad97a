"""The main job: the digits versions of both studies and the timing study, end to end on a CPU.

python -m experiments [--out runs] [--threads N] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import time

from experiments import adversarial, cli, regularize, speed


def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="parent folder of the three studies' folders")
    parser.add_argument("--threads", type=int, help=cli.THREADS_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print every study's configuration and runs, train nothing")
    args = parser.parse_args(argv)
    common = (["--threads", str(args.threads)] if args.threads else []) + (["--dry-run"] if args.dry_run else [])
    start = time.perf_counter()
    regularize.main(["--out", os.path.join(args.out, "regularize-digits"), *common])
    adversarial.main(["--out", os.path.join(args.out, "adversarial-digits"), *common])
    speed.main(["--quick", "--out", os.path.join(args.out, "speed"), *common])
    print(f"all studies done in {time.perf_counter() - start:.0f} s; results under {os.path.abspath(args.out)}", flush=True)


if __name__ == "__main__":
    main()
