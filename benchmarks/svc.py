"""Time of singular values and singular value clipping of conv layers: the Gram path against the
first version's full complex SVD, side by side in one run.

The paper's six layer shapes on a 32x32 input, and every conv layer of a CIFAR ResNet-18 at its
real input size (the circular convolution on the padded input, as SVC uses it); one clip at bound
1.0 of freshly initialised weights (nearly every frequency exceeds it: the worst case of a clip).
Thread counts are set once (``--threads``, torch and BLAS; the Gram path's pool takes the same
number). Medians of interleaved repeats; ratios are SVD time / Gram time. Beside each time, the two
methods' results are compared (:func:`disagreement`): a faster path that computed something else
would not be a speed-up. ``--busy N`` also times
the ResNet-18 clip with N busy single-threaded processes beside it (``python -c 'while True:
pass'``), alternating with idle runs, and prints busy / idle. The SVD side of the large shapes takes
tens of seconds per call on a 2-core CPU: the full run takes several minutes.

    python -m benchmarks.svc [--repeats 3] [--threads 2] [--busy 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import scipy
import torch

import normopt
from benchmarks.norms import PAPER_SHAPES
from benchmarks.timing import count, interleaved_medians, positive_int, set_threads
from experiments.models import resnet18
from normopt.svc import clip_layer, clip_layer_counted, clip_singular_values, conv_singular_values, padded_input_size


def disagreement(results: dict[str, list]) -> dict[str, float]:
    """How far the Gram path's results lie from the SVD's, relative to the largest of each.

    ``results``: ``{"sv gram": [values per layer], "sv svd": [...], "clip gram": [kernels per
    layer], "clip svd": [...]}``. Returns ``{"sv": d, "clip": d}``, each the largest over layers of
    ``max|a - b| / max|b|`` (singular values sorted first: each method returns them in its own
    order). The Gram path's documented error is about ``sqrt(eps)``: ``3e-4`` in single precision.

    Example:
        >>> import torch
        >>> w = torch.randn(4, 3, 3, 3)
        >>> results = {f"sv {m}": [conv_singular_values(w, 6, method=m)] for m in ("gram", "svd")}
        >>> results |= {f"clip {m}": [clip_singular_values(w, 6, 1.0, method=m)] for m in ("gram", "svd")}
        >>> d = disagreement(results)
        >>> d["sv"] < 1e-3 and d["clip"] < 1e-3
        True
    """

    def relative(a, b) -> float:
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return ((a - b).abs().max() / b.abs().max()).item()

    return {
        "sv": max(relative(np.sort(a), np.sort(b)) for a, b in zip(results["sv gram"], results["sv svd"], strict=True)),
        "clip": max(relative(a, b) for a, b in zip(results["clip gram"], results["clip svd"], strict=True)),
    }


def _kept(functions: dict, results: dict) -> dict:
    """``functions``, each keeping its last result in ``results[name]`` (to compare, after timing)."""

    def keeping(name, fn):
        def run():
            results[name] = fn()

        return run

    return {name: keeping(name, fn) for name, fn in functions.items()}


def _paper_rows(repeats: int, threads: int) -> list[tuple]:
    rows = []
    for k, c_in, c_out in PAPER_SHAPES:
        weight = torch.randn(c_out, c_in, k, k)
        results = {}
        medians = interleaved_medians(
            _kept(
                {
                    f"sv {method}": lambda w=weight, m=method: conv_singular_values(w, 32, method=m, threads=threads)
                    for method in ("gram", "svd")
                }
                | {
                    f"clip {method}": lambda w=weight, m=method: clip_singular_values(w, 32, 1.0, method=m, threads=threads)
                    for method in ("gram", "svd")
                },
                results,
            ),
            repeats=repeats,
            warmup=0,  # each call is seconds long; nothing to warm
        )
        medians |= disagreement({name: [value] for name, value in results.items()})
        rows.append((f"conv {k}x{k} ({c_in},{c_out}) on 32x32", medians))
    return rows


def _resnet18():
    model = resnet18()
    specs = normopt.layer_specs(model, torch.zeros(1, 3, 32, 32))
    convs = {n: s for n, s in specs.items() if isinstance(s, normopt.ConvSpec)}
    return convs, {n: model.get_submodule(n).weight for n in convs}


def _busy_ratio(clip_all, processes: int, repeats: int) -> tuple[float, float]:
    """Median time of ``clip_all`` idle and with ``processes`` busy single-threaded processes beside it."""
    idle, busy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        clip_all()
        idle.append(time.perf_counter() - start)
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
        try:
            time.sleep(0.5)  # let them start spinning
            start = time.perf_counter()
            clip_all()
            busy.append(time.perf_counter() - start)
        finally:
            for p in spinners:
                p.kill()
                p.wait()
    return statistics.median(idle), statistics.median(busy)


def main(argv=None) -> list[tuple]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.svc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch, BLAS and pool threads, set once (default 2)")
    parser.add_argument("--busy", type=count, default=0, help="also time the ResNet-18 clip beside N busy processes")
    parser.add_argument("--skip-shapes", action="store_true", help="only ResNet-18")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    rows = [] if args.skip_shapes else _paper_rows(args.repeats, args.threads)
    convs, weights = _resnet18()

    def all_sv(method):
        return [
            conv_singular_values(weights[n], padded_input_size(s), groups=s.groups, dilation=s.dilation, method=method)
            for n, s in convs.items()
        ]

    def all_clip(method):
        return [clip_layer(weights[n], s, 1.0, method=method, threads=args.threads) for n, s in convs.items()]

    results = {}
    medians = interleaved_medians(
        _kept(
            {
                f"{kind} {m}": (lambda k=kind, m=m: (all_sv if k == "sv" else all_clip)(m))
                for kind in ("sv", "clip")
                for m in ("gram", "svd")
            },
            results,
        ),
        repeats=args.repeats,
        warmup=0,
    )
    medians |= disagreement(results)
    rows.append((f"ResNet-18, all {len(convs)} convs", medians))
    counts = [clip_layer_counted(weights[n], s, 1.0)[1:] for n, s in convs.items()]
    cpu = platform.processor() or platform.machine()
    print(
        f"CPU ({cpu}), threads set once: torch {torch.get_num_threads()}, BLAS and pool {args.threads}; SciPy {scipy.__version__}"
    )
    print(f"medians of {args.repeats} interleaved repeats, seconds; ratio = full SVD / Gram")
    print("apart: the largest difference between the two methods' results, over the largest result")
    print(
        f"{'layer':36} {'sv gram':>9} {'sv svd':>9} {'ratio':>6} {'apart':>8}"
        f" {'clip gram':>10} {'clip svd':>9} {'ratio':>6} {'apart':>8}"
    )
    for label, m in rows:
        sv_ratio, clip_ratio = m["sv svd"] / m["sv gram"], m["clip svd"] / m["clip gram"]
        print(
            f"{label:36} {m['sv gram']:9.3f} {m['sv svd']:9.3f} {sv_ratio:6.2f} {m['sv']:8.1e}"
            f" {m['clip gram']:10.3f} {m['clip svd']:9.3f} {clip_ratio:6.2f} {m['clip']:8.1e}"
        )
    print(f"ResNet-18 clip at 1.0: {sum(c for _, c in counts)} of {sum(f for f, _ in counts)} frequencies exceeded it")
    if args.busy:
        idle, busy = _busy_ratio(lambda: all_clip("gram"), args.busy, args.repeats)
        print(
            f"ResNet-18 Gram clip: idle {idle:.3f} s, beside {args.busy} busy processes {busy:.3f} s: busy/idle {busy / idle:.2f}"
        )
    return rows


if __name__ == "__main__":
    main()
