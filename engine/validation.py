"""Argument checks shared by the API boundaries: each raises a message naming value and expectation."""
import math

import torch

from .errors import InvalidInputError, InvalidTypeError


def check_choice(name, value, choices):
    if value not in choices:
        raise InvalidInputError(f"{name}={value!r}; expected one of {', '.join(choices)}")


def check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name}={value!r} of type {type(value).__name__}; expected int")
    if value < low:
        raise InvalidInputError(f"{name}={value}; expected an integer >= {low}")


def check_real(name, value, low=-math.inf, high=math.inf, low_open=False):
    """Raise unless value is a real number in [low, high] (or (low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name}={value!r} of type {type(value).__name__}; expected a number")
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidInputError(f"{name}={value}; expected a number in {bracket}{low}, {high}]")
