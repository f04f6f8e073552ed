"""The command line: `distill TOOL ...` (the console script) runs one of the tools, as `python -m pipeline.TOOL ...`
does; and the argument types the tools share, so a number out of range is argparse's one-line error (exit 2) naming
the option, before any config, model or data is read."""
from __future__ import annotations

import argparse
import importlib
import math
import sys

from pipeline.run import signals


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


# `distill TOOL ...` (the console script): the same as `python -m pipeline.TOOL ...`
TOOLS = {"train": "pipeline.train", "prepare": "pipeline.prepare", "precompute-teacher": "pipeline.precompute_teacher",
         "teacher-cache": "pipeline.teacher_cache", "plan": "pipeline.plan", "submit": "pipeline.submit",
         "evaluate": "pipeline.evaluate", "study": "pipeline.study.cli", "demo": "pipeline.demo",
         "compare": "pipeline.compare", "config-reference": "pipeline.config_reference",
         "teacher-server": "pipeline.teacher_server"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in TOOLS:
        print(f"usage: distill {{{','.join(TOOLS)}}} [options]   (the same as python -m pipeline.TOOL; TOOL --help "
              f"for its options)", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "train":  # as `python -m pipeline.train` does: a signal during start-up is a stop request
        signals.install()
    return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
