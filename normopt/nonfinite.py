"""Warnings about layers whose weights went non-finite, without a host synchronisation per step."""

from __future__ import annotations

import warnings

import torch


class NonFiniteReporter:
    """Warns once per layer whose weights were non-finite, without synchronising a CUDA device.

    CPU flags are read at once; on an accelerator they are copied to the host and read at a later
    step, once the copy's event has completed: on CUDA without blocking, through pinned memory; on
    others (MPS, XPU) with a plain copy, which waits for the device (pinning there is untested).
    Flags that cannot be read (the meta device) are dropped. Under ``torch.compile`` nothing is
    pushed (see :meth:`normopt.NormDecay.nonfinite_layers`).

    Example:
        >>> import warnings
        >>> reporter = NonFiniteReporter()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     reporter.push(["conv1", "fc"], torch.tensor([True, False]))
        ...     reporter.push(["conv1", "fc"], torch.tensor([True, False]))  # once per layer
        >>> [str(w.message) for w in caught]
        ["norm decay took no new subgradient of layers ['fc']: their weights are not finite (NaN or inf)"]
    """

    def __init__(self):
        self._pending: list[tuple[list[str], torch.Tensor, object]] = []
        self.warned: set[str] = set()

    def __getstate__(self) -> dict:
        # A copy drops the flags in flight: device events cannot be copied or pickled.
        return {"_pending": [], "warned": set(self.warned)}

    def push(self, names: list[str], finite: torch.Tensor) -> None:
        device = finite.device
        if device.type == "cpu":
            self._report(names, finite)
        elif device.type != "meta":
            pinned = device.type == "cuda"
            host = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=pinned)
            host.copy_(finite, non_blocking=pinned)
            event = torch.Event(device=device)
            event.record()
            self._pending.append((names, host, event))
        self._pending = [item for item in self._pending if not self._ready(item)]

    def _ready(self, item) -> bool:
        names, host, event = item
        if not event.query():
            return False
        self._report(names, host)
        return True

    def _report(self, names: list[str], finite: torch.Tensor) -> None:
        bad = [name for name, ok in zip(names, finite.tolist()) if not ok and name not in self.warned]
        if bad:
            self.warned.update(bad)
            message = f"norm decay took no new subgradient of layers {bad}: their weights are not finite (NaN or inf)"
            warnings.warn(message, stacklevel=5)
