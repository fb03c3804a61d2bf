"""Typed sections from plain YAML: field docs, conversion, every problem reported at once.

The recipe (`finetune.config.recipe`) and the combine spec (`finetune.export.combine`) are dataclasses whose
fields carry a doc string and an optional range (`field_doc`); `build_section` turns a YAML
mapping into one, collecting every problem with its key path instead of stopping at the first.
Reading and writing the YAML itself, and `key.path=value` overrides, are `finetune.config.yaml_io`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import reprlib
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from finetune.errors import UserError


def field_doc(default: Any = dataclasses.MISSING, doc: str = "", lo: float | None = None,
              hi: float | None = None, choices: tuple | None = None, factory: Any = None,
              path: str | None = None):
    """A field with a doc string and an optional numeric range. `path`: the value is a path
    ("local") or a path or hub id ("local_or_hub"), resolved by `resolve_paths`."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)



_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 2


def show(value: Any) -> str:
    """A bounded repr for messages: YAML aliases can make a small file a huge (or shared) tree."""
    return _REPR.repr(value)


def key_name(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str, errors: list[UserError]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            trial: list[UserError] = []
            out = _convert(value, a, where, trial)
            if not trial:
                return out
        errors.append(UserError(where, f"expected {_type_name(tp)}, got {show(value)}"))
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads `on`/`off` (and yes/no) as booleans
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f"Did you mean {close[0]!r}?" if close else ""
        errors.append(UserError(where, f"{show(value)} is not one of {_type_name(tp)}",
                                hint or f"Use one of {_type_name(tp)}"))
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) or not isinstance(value, list):
            if isinstance(value, str) and item_tp is str:
                return [value]  # `targets: attention` reads naturally as a one-item list
            errors.append(UserError(where, f"expected a list, got {type(value).__name__}"))
            return []
        return [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(UserError(where, f"expected a mapping, got {type(value).__name__}"))
            return {}
        out = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                errors.append(UserError(f"{where}.{key_name(k)}", f"expected a name, got {show(v)}",
                                        "Map each name to one column name"))
            else:
                out[str(k)] = str(v)
        return out
    if dataclasses.is_dataclass(tp):
        # `eval:` with every key commented out is an empty section, i.e. all defaults.
        return build_section(tp, {} if value is None else value, where, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .nan passes every range check; .inf overflows the maths
                errors.append(UserError(where, f"{value} is not a finite number", "Give a real number"))
                return None
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    errors.append(UserError(where, f"expected {_type_name(tp)}, got {show(value)}"))
    return None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_section(cls: type, raw: Any, where: str, errors: list[UserError]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        errors.append(UserError(where or "recipe", f"expected a mapping, got {type(raw).__name__}",
                                "Write `key: value` lines"))
        return None
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(key_name(key), list(fields), n=1, cutoff=0.6)
            fix = f"Did you mean {prefix}{close[0]}?" if close else f"Known keys: {', '.join(fields)}"
            errors.append(UserError(f"{prefix}{key_name(key)}", "unknown key", fix))
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                doc = f.metadata.get("doc", "")
                errors.append(UserError(path, "is required", f"Add `{name}:` ({doc})" if doc
                                        else f"Add `{name}:`"))
            continue
        n_before = len(errors)
        value = _convert(raw[name], hints[name], path, errors)
        if len(errors) == n_before and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = f.metadata.get("lo"), f.metadata.get("hi")
            if lo is not None and value < lo:
                errors.append(UserError(path, f"{value} is below the minimum {lo}",
                                        f"Use a value >= {lo}"))
            if hi is not None and value > hi:
                errors.append(UserError(path, f"{value} is above the maximum {hi}",
                                        f"Use a value <= {hi}"))
        if len(errors) == n_before:
            kwargs[name] = value
    # A section with errors still returns so sibling sections get checked; the caller raises.
    try:
        return cls(**kwargs)
    except TypeError:  # a required field was missing or bad: already reported
        return None


# ---------------------------------------------------------------- paths


def _element_type(tp: Any) -> Any:
    """The dataclass a field holds directly, in a list, or in `X | None`."""
    origin = typing.get_origin(tp)
    if origin is list:
        return _element_type(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _element_type(inner[0]) if len(inner) == 1 else tp
    return tp


def path_kind(cls: type, keys: list[str]) -> str | None:
    """The `path` kind of the field that `keys` (an override's key path) names, or None."""
    tp: Any = cls
    meta = None
    for key in keys:
        tp = _element_type(tp)
        if key.isdigit() or not dataclasses.is_dataclass(tp):
            continue
        fields = {f.name: f for f in dataclasses.fields(tp)}
        if key not in fields:
            return None
        meta, tp = fields[key].metadata, _hints(tp)[key]
    return meta.get("path") if meta else None


def resolve_path(value: str, kind: str, base_dir: Path) -> str:
    """`value` against `base_dir` when relative; a hub id (for "local_or_hub" fields) stays one."""
    from data_tools.locations import is_hub_id

    if kind == "local_or_hub" and is_hub_id(value, str(base_dir)):
        return value
    expanded = Path(os.path.expanduser(value))  # not Path.expanduser: "~nobody" raises there
    # normpath: "recipes/../runs/demo" reads as "runs/demo" in every message (lexical: links kept)
    return os.path.normpath(expanded if expanded.is_absolute() else (base_dir / expanded).absolute())


def resolve_paths(cls: type, raw: Any, base_dir: Path) -> None:
    """Resolve, in place, every path field of a raw mapping shaped like `cls` against `base_dir`.
    Values of the wrong type are left for `build_section` to report."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        value, kind = raw[f.name], f.metadata.get("path")
        if kind and isinstance(value, str) and value:
            raw[f.name] = resolve_path(value, kind, base_dir)
            continue
        inner = _element_type(hints[f.name])
        for item in value if isinstance(value, list) else [value]:
            resolve_paths(inner, item, base_dir)
