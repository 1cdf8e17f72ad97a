"""What every command line shares: one-line errors (exit 2), Ctrl-C (exit 130 with the command that
resumes), thread counts set once, --dry-run, and the data-checksum switch."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys

from experiments.config import READ_BY, UserError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


MAX_THREADS = 1024
THREADS_HELP = "CPU threads for torch and BLAS, set once (default: the cores this process may use minus those busy at start)"


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if missing (md5-checked)")
    parser.add_argument(
        "--skip-data-checksums",
        action="store_true",
        help="RISK: unpickle CIFAR-10 files without checking their published md5s; "
        "a planted file would run code. Only for files you wrote yourself",
    )
    parser.add_argument("--threads", type=int, help=THREADS_HELP)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve and print the configuration and runs, check data and output folder, train nothing",
    )


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(samples: int = 9, interval: float = 0.01) -> int:
    """Cores other processes keep busy right now: the median count of runnable tasks besides this one.

    Read from ``/proc/loadavg`` (its fourth field counts the runnable tasks at that instant, this
    reader included), sampled over ``samples * interval`` seconds; the one-minute load average where
    that file is missing. The load average alone lags a minute behind a job started just before.
    """
    import statistics
    import time

    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as file:
                counts.append(int(file.read().split()[3].split("/")[0]) - 1)
        except (OSError, IndexError, ValueError):
            return round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
        time.sleep(interval)
    return max(0, round(statistics.median(counts)))


def default_threads() -> tuple[int, str]:
    """The cores this process may use minus those other processes keep busy, at least one; and why.

    More threads than free cores make torch's OpenMP workers spin-wait for a descheduled sibling at
    every parallel region: on a 2-core machine beside two busy processes, 2 threads ran the main job
    several times slower than 1 (see the README).
    """
    cores, busy = available_cores(), busy_cores()
    return max(1, cores - busy), f"default: {cores} core(s), {busy} busy with other processes"


def set_threads(threads: int | None) -> int:
    """Set torch's and every BLAS / OpenMP pool's thread count once, at start (no oversubscription)."""
    import torch
    from threadpoolctl import threadpool_limits

    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if threads is not None and threads > MAX_THREADS:  # torch overflowed, threadpoolctl ran out of memory
        fail(f"--threads must be at most {MAX_THREADS}, got {threads}")
    count, why = (threads, "--threads") if threads else default_threads()
    print(f"threads: {count} for torch and BLAS ({why})", file=sys.stderr, flush=True)
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    threadpool_limits(limits=count)  # kept for the process: not used as a context manager
    return count


def fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def or_exit(make):
    """``make()``, with a user error turned into one line and exit code 2."""
    from experiments.data import DataError

    try:
        return make()
    except (UserError, DataError) as error:
        fail(str(error))


def command_line(module: str, argv: list[str], *extra: str) -> str:
    """The exact command that reruns ``module`` with ``argv`` (plus ``extra`` if missing)."""
    words = [sys.executable, "-m", module, *argv, *[e for e in extra if e not in argv]]
    return shlex.join(words)


_resuming: list[str] = []  # the commands of the friendly blocks running, outermost first


@contextlib.contextmanager
def friendly(resume_command: str, interrupted: str = "finished epochs are saved; resume with"):
    """User errors: one line, exit 2. Ctrl-C: exit 130, saying ``interrupted`` and the command that
    resumes: the outermost one's (the main job's, not that of the study it was running)."""
    from experiments.data import DataError

    _resuming.append(resume_command)
    try:
        yield
    except (UserError, DataError) as error:
        fail(str(error))
    except KeyboardInterrupt:
        if len(_resuming) > 1:
            raise  # the outer block names its command
        print(
            f"\ninterrupted: {interrupted}:\n  {resume_command}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(130) from None
    finally:
        _resuming.pop()


def out_folder(value: str) -> str:
    """An ``--out`` folder, refused when empty: an unset shell variable (``--out "$OUT"``) put a
    study's outputs in its default folder and made the main job write into the current folder
    and fail at its last step, after all its training.

    Example:
        >>> out_folder("runs/mine")
        'runs/mine'
    """
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty folder (an unset shell variable?): give a path")
    return value


def check_folder(folder: str, option: str = "--out") -> None:
    """Without creating anything: could ``folder`` (given as ``option``) be created (or written)?

    Raises:
        UserError: a file stands on its path, or its nearest existing folder is not writable.
    """
    what = "output folder" if option == "--out" else f"{option} folder"
    parent = os.path.abspath(folder)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what} {folder!r}: {parent!r} is a file; choose another {option}")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{what} {folder!r} is not writable ({parent!r})")


def data_key(config) -> tuple:
    return (config.dataset, config.data_dir, config.verify_data, config.download)


def check_data(configs) -> None:
    """Load the training and test sets of ``configs`` (each distinct one once), raising their
    DataError where a file is missing or damaged; CIFAR-10 sets the run downloads (--download) are not checked."""
    from experiments.data import dataset

    seen = set()
    for config in configs:
        if (config.download and config.dataset == "cifar10") or data_key(config) in seen:
            continue
        seen.add(data_key(config))
        dataset(config.dataset, True, config.data_dir, verify=config.verify_data)
        dataset(config.dataset, False, config.data_dir, verify=config.verify_data)


def dry_run(runs, check=None) -> None:
    """Check the data and the output folders of ``runs`` (config, folder) pairs, and with ``check``
    (``check(config, folder)``, raising a UserError) what a folder already holds; train nothing."""
    from experiments.data import import_torchvision

    checked = set()
    for config, folder in runs:
        key = data_key(config)
        if key not in checked and config.download and config.dataset == "cifar10":
            # Nothing is downloaded in a dry run: what the download needs is checked instead.
            import_torchvision()
            check_folder(config.data_dir, "--data-dir")
            print(
                f"  would download CIFAR-10 into {os.path.abspath(config.data_dir)} where a file is missing or fails "
                "its checksum (--download)",
                file=sys.stderr,
                flush=True,
            )
        elif key not in checked:
            check_data([config])
        checked.add(key)
        check_folder(folder)
        if check is not None:
            check(config, folder)
        print(f"  would write {os.path.abspath(folder)}", file=sys.stderr, flush=True)
        # The full resolved configuration, one JSON object a line: what the run would record.
        print("resolved " + json.dumps(config.as_dict(), sort_keys=True), flush=True)
    print(f"dry run: {len(runs)} run(s), data and output folders checked; nothing trained", file=sys.stderr, flush=True)


def protocol_options(p: argparse.ArgumentParser) -> None:
    """--protocol and the switches that depart from it, shared by every command."""
    p.add_argument(
        "--protocol",
        default="released",
        choices=["released", "paper"],
        help="released: the authors' released scripts (norm decay rule 'reference', arg-max batch-norm "
        "projection); paper: the paper's text (Algorithm 1, exact batch-norm projection)",
    )
    p.add_argument(
        "--released-skips",
        action="store_true",
        help="leave grouped convs and convs on inputs the kernel cannot cover alone, as the released code does",
    )


def evaluation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--attacks",
        help="comma-separated, from apgd-ce, apgd-t, pgd (PGD-20), autoattack (standard AutoAttack: "
        "APGD-CE, APGD-T, FAB-T, Square; needs torchattacks); default apgd-ce,apgd-t",
    )
    p.add_argument("--sweep", help="comma-separated further attack radii in 1/255 units (robust accuracy at each)")
    p.add_argument("--norms-every", type=int, help="steps between two records of every layer's norms (default 1; 10 cifar10)")


def check_evaluation_options(args, attacks) -> None:
    """Refuse ``--eval-iterations`` or ``--eval-targets`` given for attacks that never read them,
    as :func:`experiments.config.unused` refuses method options: they were ignored, yet made
    another run (another fingerprint and folder) of the same measurement."""
    for name, readers in READ_BY.items():
        if getattr(args, name, None) is not None and not set(attacks) & set(readers):
            option = f"--{name.replace('_', '-')}"
            fail(f"{option} is not used by --attacks {','.join(attacks)} (only by {', '.join(readers)}); leave it out")


def protocol_changes(args) -> dict:
    """The configuration fields the shared switches set."""
    changes = {"skip_layers": "released"} if args.released_skips else {}
    for name in ("attacks", "sweep"):
        text = getattr(args, name, None)
        if text is not None:
            parts = [w for w in text.split(",") if w]
            if name == "sweep" and not parts:  # "--sweep $RADII" with RADII unset: no sweep, without a word
                fail(f"--sweep takes comma-separated radii, got {text!r}; leave it out for no sweep")
            changes[name] = tuple(parts) if name == "attacks" else tuple(or_exit(lambda p=parts, n=name: _floats(p, n)))
    if getattr(args, "norms_every", None) is not None:
        changes["norms_every"] = args.norms_every
    return changes


def _floats(words: list[str], option: str) -> list[float]:
    try:
        return [float(w) for w in words]
    except ValueError:
        raise UserError(f"--{option} takes comma-separated numbers, got {','.join(words)!r}") from None
