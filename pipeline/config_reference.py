"""docs/config.md, generated from the config dataclasses: every field with its type, default and the docstring
written under it in pipeline/config.py. tests/test_layout.py fails when the page is stale.

    python -m pipeline.config_reference            # rewrite docs/config.md
    python -m pipeline.config_reference --check    # exit 1 if it differs
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import typing

from pipeline import config as C

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
HEADER = """# Config reference

Generated from `pipeline/config.py` (`python -m pipeline.config_reference`); do not edit by hand. A YAML file sets
any of these fields, `--section.key=value` on the command line overrides them; every value is checked before any
model loads, and a bad one is an error naming the field.
"""


def field_docs(cls) -> dict[str, str]:
    """{field: the docstring that follows it in the class body}."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    out = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            out[node.target.id] = " ".join(str(after.value.value).split())
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    return f"`{value!r}`"


def _row(name: str, tp, f: dataclasses.Field, doc: str) -> str:
    if typing.get_origin(tp) is typing.Literal:
        kind = "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    else:
        kind = f"`{getattr(tp, '__name__', None) if not typing.get_args(tp) else str(tp).replace('typing.', '')}`"
    cells = [f"`{name}`", kind, _default(f), doc]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # a pipe would split the cell


def rows(cls, prefix: str = "") -> list[str]:
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += rows(tp, f"{prefix}{f.name}.")
            continue
        out.append(_row(prefix + f.name, tp, f, docs.get(f.name, "")))
    return out


def render() -> str:
    sections = []
    top = [f for f in dataclasses.fields(C.Config) if not dataclasses.is_dataclass(typing.get_type_hints(C.Config)[f.name])]
    table = "| field | type | default | meaning |\n|---|---|---|---|\n"
    hints, docs = typing.get_type_hints(C.Config), field_docs(C.Config)
    if top:
        sections.append("## Top level\n\n" + table + "\n".join(
            _row(f.name, hints[f.name], f, docs.get(f.name, "")) for f in top))
    for f in dataclasses.fields(C.Config):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            intro = f"\n\n{docs[f.name]}" if docs.get(f.name) else ""
            sections.append(f"## `{f.name}`{intro}\n\n" + table + "\n".join(rows(tp, f"{f.name}.")))
    return HEADER + "\n" + "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not what the code generates")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = open(PAGE).read() if os.path.exists(PAGE) else ""
        if current != text:
            print(f"{PAGE} is stale: run python -m pipeline.config_reference", file=sys.stderr)
            return 1
        return 0
    os.makedirs(os.path.dirname(PAGE), exist_ok=True)
    with open(PAGE, "w") as f:
        f.write(text)
    print(PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
