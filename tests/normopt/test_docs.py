"""Every public name of the library appears in the API reference."""

from __future__ import annotations

import inspect
import os

import normopt
from normopt import power_iteration, spectrum, svc

API = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "api.rst")


def test_every_public_name_is_documented():
    text = open(API).read()
    names = [f"normopt.{name}" for name in normopt.__all__ if name != "svc"]
    for module in (svc, spectrum, power_iteration):  # each function under the module that defines it
        names += [
            f"{module.__name__}.{name}"
            for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
        ]
    missing = [name for name in names if f":: {name}\n" not in text]
    assert not missing, f"not in docs/api.rst: {missing}"
