"""YAML in and out, safely: a loader that runs nothing, a dumper, and `key.path=value` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from finetune.config.schema import key_name, show
from finetune.errors import UserError

_STD_TAG = "tag:yaml.org,2002:"


class SafeYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` (plain data only: no Python tags, nothing runs) with two changes.

    Dates stay text: a value like `2024-13-45` would otherwise crash the date constructor.
    Duplicate keys are errors: YAML silently keeps the last one, hiding a half-edited recipe.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key {key_name(key_node.value)!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # an explicit tag on a bad value (!!int x, !!timestamp 2024-99-01)
            raise yaml.constructor.ConstructorError(
                None, None, f"bad {node.tag.replace(_STD_TAG, '!!')} value {show(node.value)} ({e})",
                node.start_mark) from None


SafeYamlLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.1 reads `1e-4` (no dot) as a string; everyone writes learning rates that way.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
SafeYamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


class YamlDumper(yaml.SafeDumper):
    """Quotes every string the loader would read as something else (`1e5`, `2024-01-01`)."""


YamlDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=SafeYamlLoader)  # a SafeLoader: equivalent to yaml.safe_load


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(text.strip() or repr(text), "an override must look like key.path=value",
                        "Write for example train.lr=1e-4")
    key, _, value = text.partition("=")
    if not key.strip():
        raise UserError(text, "the override names no key", "Write for example train.lr=1e-4")
    try:
        parsed = _safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
        parsed = value  # not YAML: take it as the string the user typed
    return key.strip().split("."), parsed


def _is_index(key: str) -> bool:
    return key.isascii() and key.isdigit()  # not str.isdigit alone: '²' is a digit int() refuses


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set `raw[path...] = value`. A digit indexes a list; index == len appends a new item."""
    node: Any = raw
    for i, key in enumerate(path):
        where = ".".join(path[: i + 1])
        last = i == len(path) - 1
        child_default: Any = None if last else ([] if _is_index(path[i + 1]) else {})
        if isinstance(node, list):
            if not _is_index(key) or int(key) > len(node):
                raise UserError(where, "no such list item",
                                f"The list has {len(node)} items; use an index from 0 to {len(node)}")
            if int(key) == len(node):
                node.append(child_default)
            if last:
                node[int(key)] = value
                return
            if node[int(key)] is None:
                node[int(key)] = child_default
            node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            if node.get(key) is None:  # absent, or an empty `section:` line
                node[key] = child_default
            node = node[key]
        else:
            where = ".".join(path[:i])
            raise UserError(where, f"is {show(node)}, not a section", "Override a key inside a mapping")


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.exists():
        raise UserError(str(p), "file not found", "Check the path")
    if p.is_dir():
        raise UserError(str(p), "is a directory, not a recipe file", "Pass a .yaml file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(str(p), f"cannot read the file ({e.strerror or e})", "Check its permissions") from None
    if b"\x00" in data:
        raise UserError(str(p), "is a binary file, not YAML", "Pass a .yaml recipe")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(str(p), "is not UTF-8 text", "Save the recipe as UTF-8") from None
    try:
        return _safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = e.problem or str(e).splitlines()[0]
        if isinstance(e, yaml.constructor.ConstructorError):
            if "could not determine a constructor" in problem:
                tag = problem.rpartition("tag ")[2].replace(_STD_TAG, "!!")
                raise UserError(where, f"YAML tag {tag} is not allowed",
                                "Recipes are plain data: remove the tag") from None
            if problem.startswith("duplicate key"):
                raise UserError(where, problem, "Keep one of them") from None
            if problem.startswith("bad "):
                raise UserError(where, f"YAML {problem}", "Quote the value or remove its !! tag") from None
            raise UserError(where, f"YAML error: {e.context or ''} {problem}",
                            "Write plain keys, lists and values") from None
        raise UserError(where, f"YAML syntax error: {problem}",
                        "Fix the indentation or quoting on that line") from None
    except yaml.YAMLError as e:
        raise UserError(str(p), f"YAML error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        "Fix the file") from None
    except (ValueError, TypeError, OverflowError) as e:  # an explicit tag with a bad value: !!int x
        raise UserError(str(p), f"YAML value error ({e})", "Quote the value or remove its !! tag") from None
    except RecursionError:
        raise UserError(str(p), "nested too deeply", "A recipe is a few levels of keys and lists") from None




def dump_yaml(data: Any) -> str:
    """YAML that `read_yaml` reads back to the same values."""
    return yaml.dump(data, Dumper=YamlDumper, sort_keys=False)
