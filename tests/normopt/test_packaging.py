"""The built wheel holds the library only: no generic top-level experiments/benchmarks/tests packages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_wheel_contains_only_normopt(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    tops = {name.split("/")[0] for name in zipfile.ZipFile(tmp_path / wheel).namelist()}
    packages = {top for top in tops if not top.endswith(".dist-info")}
    assert packages == {"normopt"}
