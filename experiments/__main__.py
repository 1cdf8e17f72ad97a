"""The main job: the digits versions of both studies and the timing study, end to end on a CPU.

python -m experiments [--out runs]
"""

from __future__ import annotations

import argparse
import os
import time

from experiments import adversarial, regularize, speed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs", help="parent folder of the three studies' folders")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    regularize.main(["--out", os.path.join(args.out, "regularize-digits")])
    adversarial.main(["--out", os.path.join(args.out, "adversarial-digits")])
    speed.main(["--quick", "--out", os.path.join(args.out, "speed")])
    print(f"all studies done in {time.perf_counter() - start:.0f} s; results under {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
