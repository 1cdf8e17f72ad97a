"""Checkpoints of a run folder: save (checksum after the data), verify, load (weights only), keep the
last two, set damaged ones aside, and one writer per folder (an exclusive lock).

File layout: ``checkpoint-<epoch>.pt`` is torch.save's bytes followed by a trailer
``\\nsha256:<64 hex digits>\\n`` over those bytes. A file cut short or changed anywhere fails the check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import sys

import torch

from experiments.config import UserError

TRAILER = re.compile(rb"\nsha256:([0-9a-f]{64})\n\Z")
NAME = re.compile(r"checkpoint-(\d+)\.pt\Z")
KEEP = 2


TEMPORARY = re.compile(r".+\.tmp\d+\Z")


class DamagedCheckpoint(Exception):
    """A checkpoint whose checksum or contents do not check out."""


class DamagedFile(UserError):
    """A JSON file of a run or study folder that is not what this program wrote (cut short by a
    disk fault, edited by hand): named, so that the user can set it aside."""


def _write_atomically(path: str, data: bytes) -> None:
    # A per-process temporary name: two writers never share a half-written file.
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C or a full disk: no checkpoint-sized leftover
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_temporaries(folder: str) -> list[str]:
    """Remove the temporary files that a writer killed mid-write left in ``folder`` (call it holding
    the folder's lock: no other writer is at work there); returns their names."""
    names = sorted(n for n in os.listdir(folder) if TEMPORARY.match(n)) if os.path.isdir(folder) else []
    for name in names:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
    return names


def checkpoint_path(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"checkpoint-{epoch}.pt")


def save(folder: str, epoch: int, state: dict) -> str:
    """Write ``state`` for ``epoch`` (checksum after the data), then drop all but the last two."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(folder, epoch)
    _write_atomically(path, data + b"\nsha256:" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    for old in epochs(folder)[:-KEEP]:
        os.remove(checkpoint_path(folder, old))
    return path


def verify(path: str) -> bytes:
    """The checked torch.save bytes of a checkpoint file.

    Raises:
        DamagedCheckpoint: no trailer (cut short) or a checksum that does not match (changed).
    """
    with open(path, "rb") as f:
        raw = f.read()
    match = TRAILER.search(raw[-80:])
    if match is None:
        raise DamagedCheckpoint(f"{path}: no checksum trailer (cut short or not written by this program)")
    data = raw[: len(raw) - len(match.group(0))]
    if hashlib.sha256(data).hexdigest() != match.group(1).decode():
        raise DamagedCheckpoint(f"{path}: checksum does not match its contents")
    return data


def load(path: str, map_location=None) -> dict:
    """A verified checkpoint, unpickled with ``weights_only=True`` (no code from the file runs)."""
    data = verify(path)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # a file with a valid checksum but foreign contents
        raise DamagedCheckpoint(f"{path}: unreadable ({error})") from None


def epochs(folder: str) -> list[int]:
    """Epochs with a checkpoint in ``folder``, oldest first."""
    found = [NAME.match(n) for n in os.listdir(folder)] if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for m in found if m)


class ForeignCheckpoint(Exception):
    """Raised by the ``accept`` of :func:`load_latest`: a checkpoint whose state is not this run's."""


def set_aside(path: str) -> str:
    """Rename ``path`` to ``<path>.damaged`` (``.damaged.1``, ... where that is taken: a file set
    aside before is never written over); returns the new name. Where another process (a torchrun
    rank resuming the same run) set it aside first, says so."""
    target, n = f"{path}.damaged", 0
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged.{n}"
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return f"{path}.damaged* (by another process)"
    return target


def load_latest(folder: str, map_location=None, report=print, accept=None) -> dict | None:
    """The newest good checkpoint; damaged ones are reported by name and set aside (:func:`set_aside`).

    ``accept(state)`` may raise :class:`ForeignCheckpoint` for a checkpoint whose checksum holds but
    whose state is not the caller's (another run's, copied in): it is set aside as damaged too.
    """
    for epoch in reversed(epochs(folder)):
        path = checkpoint_path(folder, epoch)
        try:
            try:
                state = load(path, map_location)
            except FileNotFoundError:
                # Renamed away since it was listed, by another process resuming the run (a torchrun
                # rank setting it aside): passed over. A link to a vanished disk is still there
                # (lexists): an error, not a fresh start.
                if os.path.lexists(path):
                    raise
                continue
            if accept is not None:
                try:
                    accept(state)
                except ForeignCheckpoint as error:
                    raise DamagedCheckpoint(f"{path}: not this run's ({error})") from None
            return state
        except DamagedCheckpoint as error:
            kept = set_aside(path)
            report(f"warning: damaged checkpoint {error}; kept as {kept}, trying the previous one")
    return None


def write_json(path: str, value) -> None:
    _write_atomically(path, json.dumps(value, indent=1).encode())


def read_json(path: str) -> dict:
    """The JSON object that :func:`write_json` wrote to ``path``.

    Raises:
        DamagedFile: the file is not JSON (cut short, edited), or holds something else than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedFile(f"{path} is damaged ({error})") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path} is damaged (it holds a JSON {type(value).__name__}, not an object)")
    return value


@contextlib.contextmanager
def taken_back_on_failure(path: str, keep):
    """Remove ``path``, a claim (``config.json``, ``study.json``) just written, if the block raises
    and ``keep()`` is false: a folder left holding a claim but nothing of its run or study would
    refuse every other configuration there."""
    try:
        yield
    except BaseException:
        if not keep():
            with contextlib.suppress(OSError):
                os.remove(path)
        raise


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and prove it writable, before any work.

    Raises:
        UserError: a file stands where the folder should be, or it cannot be written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except FileExistsError:
        raise UserError(f"output folder {folder!r} is a file; choose another --out") from None
    except OSError as error:
        raise UserError(f"output folder {folder!r} is not writable ({error.strerror})") from None


@contextlib.contextmanager
def locked(folder: str, what: str = "run"):
    """Hold an exclusive lock on ``folder`` (fcntl.flock); a second writer is refused at once.

    Raises:
        UserError: another process holds the lock.
    """
    check_writable(folder)
    handle = open(os.path.join(folder, ".lock"), "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"another process is writing {what} folder {folder!r}; wait for it or choose another --out"
                ) from None
            raise
        yield
    finally:
        handle.close()


@contextlib.contextmanager
def waiting_lock(path: str):
    """A short exclusive section shared by shards of one study (waits for the lock)."""
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
