"""The non-finite reporter: warns once per layer, never synchronising a device per step."""

from __future__ import annotations

import warnings

import pytest
import torch

from normopt.nonfinite import NonFiniteReporter


def test_the_reporter_reads_cpu_flags_at_once_and_never_reads_meta():
    reporter = NonFiniteReporter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reporter.push(["a", "b"], torch.ones(2, dtype=torch.bool, device="meta"))
    with pytest.warns(UserWarning, match=r"\['b'\]"):
        reporter.push(["a", "b"], torch.tensor([True, False]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reporter.push(["a", "b"], torch.tensor([True, False]))  # once per layer
