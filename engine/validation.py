"""Argument checks shared by the API boundaries: each raises a message naming value and expectation."""
import math

import torch

from .errors import InvalidInputError, InvalidTypeError


def check_choice(name, value, choices):
    """Raise unless value is one of choices."""
    if value not in choices:
        raise InvalidInputError(f"{name}={value!r}; expected one of {', '.join(choices)}")


def check_int(name, value, low, high=None):
    """Raise unless value is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidTypeError(f"{name}={value!r} of type {type(value).__name__}; expected int")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidInputError(f"{name}={value}; expected an integer {bound}")


def check_real(name, value, low=-math.inf, high=math.inf, low_open=False):
    """Raise unless value is a real number in [low, high] (or (low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTypeError(f"{name}={value!r} of type {type(value).__name__}; expected a number")
    if math.isnan(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise InvalidInputError(f"{name}={value}; expected a number in {bracket}{low}, {high}]")


def check_embeddings(name: str, emb, width: int) -> None:
    """prompt embeddings: a finite floating tensor [B, L, width]."""
    if not isinstance(emb, torch.Tensor):
        raise InvalidTypeError(f"{name} of type {type(emb).__name__}; expected a torch.Tensor [B, L, {width}]")
    if emb.ndim != 3 or emb.shape[-1] != width:
        raise InvalidInputError(f"{name} of shape {tuple(emb.shape)}; expected [B, L, {width}] "
                                f"(the UNet's cross_attention_dim is {width})")
    check_finite(name, emb)


def check_latents(latents, shape: tuple) -> None:
    """latents: a finite floating tensor of exactly `shape`."""
    if not isinstance(latents, torch.Tensor):
        raise InvalidTypeError(f"latents of type {type(latents).__name__}; expected a torch.Tensor {list(shape)}")
    if tuple(latents.shape) != tuple(shape):
        raise InvalidInputError(f"latents of shape {tuple(latents.shape)}; expected {tuple(shape)} "
                                "(batch x num_images_per_prompt, UNet in_channels, height/f, width/f)")
    check_finite("latents", latents)


def check_finite(name: str, t: torch.Tensor) -> None:
    """A floating tensor with no NaN or inf (one host sync, at the API boundary only)."""
    if not t.is_floating_point():
        raise InvalidTypeError(f"{name} of dtype {t.dtype}; expected a floating-point tensor")
    if not bool(torch.isfinite(t).all()):
        raise InvalidInputError(f"{name} contains NaN or inf; expected finite values")
