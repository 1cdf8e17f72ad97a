"""Side-by-side timing: interleaved repeats, medians, ratios; operator counts; thread settings."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def positive_int(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 1 (repeats, threads, a batch), refused at
    parse time, before any model is built or timed.

    Example:
        >>> positive_int("3")
        3
    """
    return _at_least(text, 1)


def count(text: str) -> int:
    """An ``argparse`` type: a whole number of at least 0 (0 skips that part).

    Example:
        >>> count("0")
        0
    """
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least {low}, got {value}")
    return value


def require_torchvision(parser: argparse.ArgumentParser, without: str) -> None:
    """Exit with a usage error, before anything is timed, where torchvision does not import
    (``without``: the option that runs the benchmark without it)."""
    from experiments.data import torchvision_advice, torchvision_import_error

    error = torchvision_import_error()
    if error is not None:
        parser.error(f"torchvision does not import ({error}): {torchvision_advice(error)}; or pass {without}")


def set_threads(threads: int) -> None:
    """Set torch's and the BLAS libraries' thread counts once, for the whole benchmark.

    Oversubscribed threads (a pool per library, each as large as the machine) made SciPy's SVD
    up to 20x slower on a shared machine.
    """
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def count_operators(fn: Callable[[], object]) -> int:
    """Number of aten operators ``fn`` dispatches (every call; views included): on a GPU, each is
    at least one kernel launch or host-side dispatch."""
    with _Counter() as counter:
        fn()
    return counter.calls


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(functions: dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median wall time (seconds) of each function, the functions run in turn within each repeat.

    Interleaving exposes every function to the same machine noise, so their ratio is stable even
    when absolute times drift; the order rotates from repeat to repeat, so that no function always
    runs first (after the others have warmed or cooled the caches).
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    _synchronize()
    names = list(functions)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize()
            start = time.perf_counter()
            functions[name]()
            _synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
