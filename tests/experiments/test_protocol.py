"""Protocol values: each released value pinned here, and checked against the released scripts'
very line where a copy of them is present (``NORMOPT_RELEASED``, default ``/work/released``)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import normopt
from experiments import protocol
from experiments.models import build_model

RELEASED_COPY = os.environ.get("NORMOPT_RELEASED", "/work/released")
COMMENT = re.compile(r"^([A-Z_0-9]+) = (.+?)  # released: (\S+):(\d+)(?: \((.+)\))?$", re.M)
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d*)?(?:e-?\d+)?")


def pinned() -> list[tuple[str, str, str, int, str | None]]:
    with open(protocol.__file__, encoding="utf-8") as f:
        return [(name, value, path, int(line), snippet) for name, value, path, line, snippet in COMMENT.findall(f.read())]


def test_every_released_constant_names_its_file_and_line():
    names = {name for name, *_ in pinned()}
    expected = {"GAMMA", "BETAS", "WEIGHT_DECAYS", "SVC_BOUNDS", "TRADES_BETA", "ALP_WEIGHT", "ALP_PAIRING"}
    expected |= {
        "ATTACK_START_STD",
        "LR_DROP_1",
        "LR_DROP_2",
        "LR_DROP_3",
        "EVAL_IMAGES",
        "EVAL_SUBSET",
        "CLEAN_ON",
        "HE_SCALE",
        "HE_MARGIN",
    }
    assert expected <= names


# The values themselves, as the released scripts set them (REFERENCE.md): a change here is a change
# of protocol, not a refactoring.
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GAMMA", 0.5),
        ("BETAS", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        ("BETAS_LINF", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        ("BETAS_L1_BN", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        ("BETAS_LINF_BN", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        ("BN_RADIUS", 5.0),
        ("WEIGHT_DECAYS", (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)),
        ("SVC_BOUNDS", (2.0, 1.5, 1.0, 0.5, 0.1)),
        ("SVC_EVERY", 100),
        ("SVC_TIMING", "released"),
        ("SVC_INPUT_SIZE", "raw"),
        ("LR", 0.01),
        ("LR_DROPS", (75, 90, 100)),
        ("EPOCHS", 120),
        ("EVAL_IMAGES", 1024),
        ("EVAL_SUBSET", "random"),
        ("CLEAN_ON", "full"),
        ("TRADES_BETA", 1.0),
        ("ALP_WEIGHT", 1.0),
        ("ALP_PAIRING", "mse"),
        ("ATTACK_START_STD", 0.001),
        ("ADV_LR", 0.1),
        ("ADV_EPS", 0.031),
        ("ADV_STEP", 0.007),
        ("ADV_STEPS", 10),
        ("HE_SCALE", 15.0),
        ("AT_REGULARIZED_LOSS", "alp"),
        ("AT_ND_ORD", 1),
        ("HE_MARGIN", 0.2),
    ],
)
def test_released_values(name, value):
    assert getattr(protocol, name) == value


@pytest.mark.skipif(not os.path.isdir(RELEASED_COPY), reason="no copy of the released code (CI has none)")
@pytest.mark.parametrize(("name", "value", "path", "line", "snippet"), pinned(), ids=[p[0] for p in pinned()])
def test_value_is_set_on_the_released_line(name, value, path, line, snippet):
    with open(os.path.join(RELEASED_COPY, path), encoding="utf-8") as f:
        text = f.read().splitlines()[line - 1]
    if snippet:
        assert snippet in text, f"{path}:{line} is {text!r}"
        return
    constant = getattr(protocol, name)
    wanted = constant if isinstance(constant, tuple) else (constant,)
    found = [float(n) for n in NUMBER.findall(text)]
    assert all(any(abs(float(w) - f) <= 1e-12 * max(1.0, abs(f)) for f in found) for w in wanted), (
        f"{name} = {constant!r} not on {path}:{line}: {text!r}"
    )


def test_the_two_protocols_differ_only_where_the_paper_text_does():
    released, paper = protocol.protocol("released").options(), protocol.protocol("paper").options()
    differing = {k for k in released if released[k] != paper[k]}
    assert differing == {"protocol", "norm_decay_rule", "bn_projection"}
    assert released["skip_layers"] == paper["skip_layers"] == "none"  # an option, not a protocol value
    assert released["norm_decay_rule"] == "reference" and paper["norm_decay_rule"] == "paper"
    with pytest.raises(ValueError, match="unknown protocol 'x'"):
        protocol.protocol("x")


def test_released_skips_grouped_convs_and_convs_on_inputs_the_kernel_cannot_cover():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.MaxPool2d(4),  # 8x8 -> 2x2
        nn.Conv2d(4, 4, 3, padding=1),  # 3 + 1 - 1 = 3 > 2: skipped by the released code
        nn.Flatten(),
        nn.Linear(16, 2),
    )
    specs = normopt.layer_specs(model, torch.zeros(1, 2, 8, 8))
    skipped = protocol.released_skips(model, specs)
    assert set(skipped) == {"1", "3"} and "grouped" in skipped["1"] and "(2, 2)" in skipped["3"]


@pytest.mark.parametrize(("model", "expected"), [("vgg11", True), ("regnetx_200mf", True), ("resnet18", False)])
def test_released_skips_in_the_paper_models(model, expected):
    net = build_model(model)
    specs = normopt.layer_specs(net, torch.zeros(1, 3, 32, 32))
    assert bool(protocol.released_skips(net, specs)) is expected
