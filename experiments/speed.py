"""Timing study (the paper's table): power iteration, SVD of the FFT (SciPy), and the exact l1 and
l_inf norms, for the paper's six conv shapes on a 32x32 input, on every device present.

    python -m experiments.speed            # the full table (power iteration: 500 iterations)
    python -m experiments.speed --quick    # power iteration timed over 20 iterations, scaled to 500

Writes speed.{csv,md,tex} into one folder (printed). Times are medians over --repeats, after one
untimed call where there are several, but for the SVD, timed once per shape (a full complex SVD per
frequency: 19 s for 5x5 512->256 on 2 threads). The threads torch and BLAS used are a column of the
table.

The layers are those of the released ``speed_test.py``: ``nn.Conv2d(in, out, k)`` with its default
padding 0, stride 1, on a 32x32 input. Where this differs from it: the released script reports
timeit totals over 100 calls (here: the median of one call), runs the power iteration and the
norms on a GPU (here: every device present), and its SVD baseline is TensorFlow's complex64 SVD
of all 32x32 frequencies on the GPU (here: SciPy's complex128 SVD of the real-FFT half, on the
CPU, as :func:`normopt.svc.conv_singular_values` with ``method="svd"``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pandas as pd
import torch

import normopt
from experiments import checkpoints, cli
from experiments.study import write_tables
from normopt.svc import conv_singular_values, power_iteration_norm

SHAPES = [(3, 32, 32), (3, 32, 128), (3, 128, 256), (3, 256, 512), (5, 256, 128), (5, 512, 256)]


def _time(fn, repeats: int, device: torch.device) -> float:
    """The median time of ``repeats`` calls of ``fn``, after an untimed one where ``repeats > 1`` (its
    first call builds tables and warms caches: once per shape in training, not per call)."""
    if repeats > 1:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_shape(
    device: torch.device, shape: tuple[int, int, int], iterations: int, measured: int, repeats: int, svd: bool, threads: int
):
    """One row of the table: a conv of ``shape`` = (kernel, in, out) on a 32x32 input."""
    k, c_in, c_out = shape
    layer = torch.nn.Conv2d(c_in, c_out, k, bias=False).to(device)  # padding 0, as the released speed_test.py
    spec = normopt.module_spec(layer, "conv", (32, 32))
    weight = layer.weight.detach()
    tensors = {"conv.weight": weight}
    row = {"device": str(device), "threads": threads, "kernel": f"{k}x{k}", "in": c_in, "out": c_out}
    # tol=None: exactly `measured` iterations (tol=0 stops at two equal estimates), scaled to the
    # table's iteration count.
    power = _time(lambda: power_iteration_norm(weight, spec, iterations=measured, tol=None), repeats, device)
    scaled = f", scaled from {measured}" if measured < iterations else ""  # --quick: say the figure is extrapolated
    row[f"power iteration ({iterations} it.{scaled}) s"] = power * iterations / measured
    if svd and device.type == "cpu":  # SciPy runs on the CPU whatever the kernel's device
        # method="svd": SciPy's full complex SVD per frequency, the paper's baseline (the default,
        # normopt's Gram eigenvalues, is 3-6x faster and was what this column timed).
        row["SVD of FFT (SciPy, one call) s"] = _time(lambda: conv_singular_values(weight, (32, 32), method="svd"), 1, device)
    row["exact l1 ms"] = 1e3 * _time(lambda: normopt.layer_norm(tensors, spec, 1), repeats * 10, device)
    row["exact l_inf ms"] = 1e3 * _time(lambda: normopt.layer_norm(tensors, spec, "linf"), repeats * 10, device)
    return row


def main(argv=None) -> str:
    parser = cli.Parser(
        prog="python -m experiments.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="time 20 power iterations and scale them to --iterations")
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-svd", action="store_true", help="skip the (slow, CPU-only) SciPy SVD column")
    parser.add_argument("--max-channels", type=int, help="only the shapes with at most this many in/out channels")
    parser.add_argument("--out", default=os.path.join("runs", "speed"), type=cli.out_folder)
    parser.add_argument("--threads", type=int, help=cli.THREADS_HELP)
    parser.add_argument("--dry-run", action="store_true", help="print the shapes and output folder, time nothing")
    args = parser.parse_args(argv)
    for name in ("iterations", "repeats", "max_channels"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    threads = cli.set_threads(args.threads)
    print(
        f"speed study: iterations={args.iterations} quick={args.quick} repeats={args.repeats} "
        f"svd={not args.no_svd} threads={threads}",
        file=sys.stderr,
        flush=True,
    )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    measured = min(20, args.iterations) if args.quick else args.iterations
    shapes = [s for s in SHAPES if args.max_channels is None or max(s[1:]) <= args.max_channels]
    if not shapes:  # an empty table would overwrite an earlier speed.* in --out and exit 0
        smallest = min(max(s[1:]) for s in SHAPES)
        parser.error(f"--max-channels {args.max_channels} leaves no shape to time (the smallest has {smallest} channels)")
    svd = not args.no_svd
    print(f"writing to {os.path.abspath(args.out)}; shapes (kernel, in, out): {shapes}", file=sys.stderr, flush=True)
    if args.dry_run:
        cli.or_exit(lambda: cli.check_folder(args.out))
        print("dry run: nothing timed", file=sys.stderr, flush=True)
        return args.out
    cli.or_exit(lambda: checkpoints.check_writable(args.out))
    rows = []
    command = cli.command_line("experiments.speed", list(argv or sys.argv[1:]))
    with cli.friendly(command, "nothing is written until every shape is timed; time them again with"):
        for d in devices:
            for i, shape in enumerate(shapes, 1):
                rows.append(measure_shape(d, shape, args.iterations, measured, args.repeats, svd, threads))
                print(f"  [{i}/{len(shapes)}] {d} {shape}: timed", file=sys.stderr, flush=True)
    print(write_tables(pd.DataFrame(rows), args.out, "speed"))
    return args.out


if __name__ == "__main__":
    main()
