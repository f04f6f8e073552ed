"""Argument types the command-line tools share: a number out of range is argparse's one-line error (exit 2) naming
the option, before any config, model or data is read."""
from __future__ import annotations

import argparse
import math


def _number(kind, low: float, high: float | None = None, low_ok: bool = False):
    what = "an integer" if kind is int else "a number"
    bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(v) or v < low or (v == low and not low_ok) or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0)                 # > 0
count = _number(int, 0, low_ok=True)           # >= 0
positive_float = _number(float, 0)             # > 0
nonnegative_float = _number(float, 0, low_ok=True)
fraction = _number(float, 0, 1.0)              # (0, 1]
