"""Checking the values of settings: whether a value has a field's type (`has_type`), a `Literal`'s choices
(`choices`), number bounds (`BOUNDS`, `out_of_range`, `range_problems`), reading a config file (`load_overrides`)
and the docstrings under the fields (`field_docs`, the --help text). Nothing here knows a particular setting."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import numbers
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal


def has_type(value: Any, hint: Any) -> bool:
    """Whether `value` fits the type `hint` of a settings field (numbers of any numeric type where they fit)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or dataclasses.is_dataclass(hint):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(has_type(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, (bool, np_bool_types()))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def np_bool_types() -> tuple:
    """numpy's bool type when numpy is already loaded (values from Optuna), without importing it here."""
    import sys

    numpy = sys.modules.get("numpy")
    return (numpy.bool_,) if numpy is not None else ()


def type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a text", type(None): "none"}
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    def listed(a: Any) -> str:
        items = choices(typing.get_args(a)[0]) if typing.get_args(a) else None
        return f"a list of {', '.join(items)}" if items else "a list"

    return " or ".join(names.get(a, listed(a) if typing.get_origin(a) is list else str(a)) for a in args)


def choices(hint: Any) -> tuple | None:
    """The values of a `Literal[...]` type (also inside `| None`), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg) + ((None,) if type(None) in typing.get_args(hint) else ())
    return None


BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
"""Field metadata that bounds a number setting: `metadata={"gt": 0, "lt": 1}` means 0 < value < 1. A number setting
that takes any value says `"unbounded": True` instead (tests/test_values.py checks that each says one or the
other); the CLI checks every bound right after parsing (`range_problems`), before anything is read or written."""
_CHECKS = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def out_of_range(value: Any, metadata: Any) -> str | None:
    """What is wrong with `value` given its field's bounds ('must be >= 1'), or None (None and non-numbers pass)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    limits = [(key, metadata[key]) for key in BOUNDS if key in metadata]
    if not limits:
        return None
    if not math.isfinite(value):
        return "must be a finite number"
    if all(_CHECKS[key](value, bound) for key, bound in limits):
        return None
    return "must be " + " and ".join(f"{BOUNDS[key]} {bound}" for key, bound in limits)


def range_problems(obj: Any, prefix: str = "") -> list[tuple[str, dataclasses.Field, str]]:
    """The number settings of a settings dataclass (and of the dataclasses in it) outside their bounds, as
    (dotted name, field, 'must be >= 1, not 0')."""
    problems = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            problems += range_problems(value, f"{prefix}{f.name}.")
        elif (why := out_of_range(value, f.metadata)) is not None:
            problems.append((prefix + f.name, f, f"{why}, not {value!r}"))
    return problems


def load_overrides(path: str | Path) -> dict[str, Any]:
    """Read a config file (JSON for .json, else YAML, which also reads JSON) holding only the settings it changes;
    ValueError naming the file and the line for a file that does not parse."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; a config file is YAML or JSON") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            hint = " (a YAML file needs a .yaml or .yml name)" if ":" in text and not text.lstrip().startswith("{") \
                else ""
            raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}{hint}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, not {type(data).__name__}")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass and of its dataclass bases (used for --help)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
