"""model/checks.py's shared checks: each refuses exactly what its rule, restated here, refuses, and the message names
the field and the value."""

import math
import re

import numpy as np
import pytest

from model.checks import (
    FLOAT32_MAX,
    check_float32,
    check_interval,
    check_numbers,
    check_power_of_two,
    interval_problem,
)

VALUES = [-1, -0.0, 0, 1e-300, 0.5, 1, 1.0000001, 2, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("open_low, open_high, text", [(False, False, "[0, 1]"), (True, False, "(0, 1]"),
                                                       (False, True, "[0, 1)"), (True, True, "(0, 1)")])
def test_interval_refuses_exactly_the_values_outside(open_low, open_high, text):
    for value in VALUES:
        inside = (0 < value if open_low else 0 <= value) and (value < 1 if open_high else value <= 1)
        problem = interval_problem("x.p", value, 0, 1, open_low=open_low, open_high=open_high)
        assert problem == (None if inside else f"x.p must be in {text}, got {value!r}"), value
        if not inside:
            with pytest.raises(ValueError, match=f"x.p must be in {re.escape(text)}"):
                check_interval("x.p", value, 0, 1, open_low=open_low, open_high=open_high)


def test_float32_refuses_non_numbers_and_values_beyond_float32():
    assert FLOAT32_MAX == float(np.finfo(np.float32).max)
    for value in (0, -3, 1e-40, FLOAT32_MAX, -FLOAT32_MAX):
        check_float32("t.lr", value)
    for value in ("1", None, True):
        with pytest.raises(ValueError, match=f"t.lr must be a number, got {value!r}"):
            check_float32("t.lr", value)
    for value in (math.nan, math.inf, -math.inf, 1e39, 10**400):
        with pytest.raises(ValueError, match=r"t.lr must be a finite number \(why\), got "):
            check_float32("t.lr", value, " (why)")


def test_power_of_two():
    powers = {1, 2, 4, 8, 16, 32, 64}
    for value in range(-2, 70):
        if value in powers and value >= 16:
            check_power_of_two("b.q", value, 16)
        else:
            with pytest.raises(ValueError, match=f"b.q must be a power of two >= 16, got {value}"):
                check_power_of_two("b.q", value, 16)
    for value in (True, 4.0, None, 0, 6):
        with pytest.raises(ValueError, match=f"b.w must be a power of two, got {value!r}"):
            check_power_of_two("b.w", value)


def test_numbers_checks_each_named_attribute_with_its_prefix():
    class Owner:
        lr, eps, decay = 0.1, 1e-8, 0.0

    check_numbers("t.", Owner, ("lr", "eps"))
    check_numbers("t.", Owner, ("decay",), strict=False)
    with pytest.raises(ValueError, match=r"t.decay must be a positive number, got 0.0"):
        check_numbers("t.", Owner, ("lr", "decay"))
    Owner.eps = math.nan
    with pytest.raises(ValueError, match=r"t.eps must be a non-negative number, got nan"):
        check_numbers("t.", Owner, ("lr", "eps"), strict=False)
