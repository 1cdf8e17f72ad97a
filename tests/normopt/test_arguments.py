from __future__ import annotations

import math

import numpy as np
import pytest

from normopt.arguments import finite_number, positive_int


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.int32(1), np.uint8(2)])
def test_positive_int_takes_whole_numbers_of_any_library_as_python_ints(value):
    taken = positive_int(value, "iterations")
    assert taken == value and type(taken) is int


@pytest.mark.parametrize("value", [0, -1, True, 2.0, np.float64(2.0), "2", None, np.int64(0)])
def test_positive_int_refuses_anything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^iterations must be a positive int, got "):
        positive_int(value, "iterations")


def test_positive_int_takes_none_where_asked_and_says_so_when_refusing():
    assert positive_int(None, "threads", none=True) is None
    with pytest.raises(ValueError, match=r"^threads must be None or a positive int, got 0$"):
        positive_int(0, "threads", none=True)


@pytest.mark.parametrize("value", [0.5, 2, np.float32(0.5), np.float64(1e30), np.int64(3)])
def test_finite_number_takes_numbers_of_any_library_as_python_floats(value):
    taken = finite_number(value, "radius")
    assert taken == float(value) and type(taken) is float


@pytest.mark.parametrize("value", [0, -0.5, math.inf, math.nan, np.float32("nan"), True, "1", None])
def test_finite_number_refuses_anything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^radius must be a positive finite number, got "):
        finite_number(value, "radius")


def test_finite_number_takes_zero_where_it_need_not_be_positive():
    assert finite_number(0, "tol", positive=False) == 0.0
    with pytest.raises(ValueError, match=r"^tol must be a non-negative finite number, got -1$"):
        finite_number(-1, "tol", positive=False)
