"""The option checks of norm decay: what each accepts, and the error, naming the option, of what it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from normopt.decay_options import (
    BETA,
    GAMMA,
    check_beta,
    check_cap,
    check_gamma,
    check_group,
    refuse_sharded,
    scaled_betas,
    signed_beta,
)


@pytest.mark.parametrize(("beta", "expected"), [(0, 0.0), (1, 1.0), (1e-3, 1e-3), (np.float32(0.25), 0.25), (3.4e34, 3.4e34)])
def test_check_beta_takes_finite_non_negative_numbers_as_floats(beta, expected):
    checked = check_beta(beta)
    assert type(checked) is float and checked == expected


def test_check_beta_keeps_a_0d_tensor_as_it_is():
    beta = torch.tensor(0.5)
    assert check_beta(beta) is beta


@pytest.mark.parametrize(
    ("beta", "error", "match"),
    [
        (-1e-3, ValueError, "must be a finite number >= 0, got -0.001"),
        (math.nan, ValueError, "must be a finite number >= 0"),
        (math.inf, ValueError, "must be a finite number >= 0"),
        (True, ValueError, "must be a finite number >= 0, got True"),
        ("0.1", ValueError, "must be a finite number >= 0, got '0.1'"),
        (1e39, ValueError, "too large: beta \\* h overflows float32 gradients"),
        (torch.tensor(-1.0), ValueError, "must be a finite number >= 0"),
        (torch.tensor([0.1, 0.2]), TypeError, "as a tensor must be 0-d"),
    ],
)
def test_check_beta_refuses_naming_where_it_was_given(beta, error, match):
    with pytest.raises(error, match=f"^{BETA} of param group 3.*{match}"):
        check_beta(beta, f"{BETA} of param group 3")


@pytest.mark.parametrize("gamma", [0, 0.5, 1, np.float64(0.9)])
def test_check_gamma_takes_numbers_in_the_unit_interval(gamma):
    assert check_gamma(gamma) == float(gamma)


@pytest.mark.parametrize(
    ("gamma", "error"),
    [(-0.1, ValueError), (1.5, ValueError), (math.nan, ValueError), (True, ValueError), (torch.tensor(0.5), TypeError)],
)
def test_check_gamma_refuses_naming_where_it_was_given(gamma, error):
    with pytest.raises(error, match=f"^{GAMMA} of the param group added must be a number in \\[0, 1\\]"):
        check_gamma(gamma, f"{GAMMA} of the param group added")


@pytest.mark.parametrize(("key", "value"), [(BETA, -1.0), (GAMMA, 2.0)])
def test_check_group_refuses_a_group_the_step_would_refuse(key, value):
    check_group({"params": [], "lr": 0.1}, "param group 0")  # no decay keys: nothing to check
    with pytest.raises(ValueError, match=f"^{key} of param group 0 of the checkpoint"):
        check_group({"params": [], key: value}, "param group 0 of the checkpoint")


@pytest.mark.parametrize("value", [None, 1, 0.5, 1e30])
def test_check_cap_takes_none_and_positive_finite_numbers(value):
    check_cap("max_norm", value)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "2", torch.tensor(2.0)])
def test_check_cap_refuses_anything_else_naming_the_option(value):
    with pytest.raises(ValueError, match=r"^bn_max_norm must be a positive finite number"):
        check_cap("bn_max_norm", value)


@pytest.mark.parametrize("beta", [0.5, torch.tensor(0.5)])
def test_a_maximizing_group_takes_beta_negated(beta):
    assert signed_beta(beta, maximize=False) is beta
    assert float(signed_beta(beta, maximize=True)) == -0.5


def test_scaled_betas_multiply_each_distinct_beta_once():
    shared = torch.tensor(0.25)
    scale = torch.tensor(4.0)
    scaled = scaled_betas({"a": 0.5, "b": 0.5, "c": shared, "d": shared, "e": 2.0}, scale)
    assert scaled["a"] is scaled["b"] and scaled["c"] is scaled["d"] and scaled["a"] is not scaled["e"]
    assert {name: float(value) for name, value in scaled.items()} == {"a": 2.0, "b": 2.0, "c": 1.0, "d": 1.0, "e": 8.0}


def test_refuse_sharded_names_the_sharding_module_and_leaves_plain_models_alone():
    refuse_sharded(nn.Sequential(nn.Linear(2, 2)))
    sharded = type("FullyShardedDataParallel", (nn.Module,), {})
    with pytest.raises(NotImplementedError, match=r"^module FullyShardedDataParallel shards its parameters"):
        refuse_sharded(nn.Sequential(sharded()))
