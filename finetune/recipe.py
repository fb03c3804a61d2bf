"""Typed recipes: YAML in, a validated `Recipe` out, every problem reported at once.

Each section is a small dataclass owned by the module that uses it; the field docs are the
reference for recipe authors (`finetune validate` prints them in error messages). The
loader never runs code from the YAML: a `yaml.SafeLoader` subclass (`_RecipeLoader`) only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune.errors import RecipeErrors, UserError


def _f(default: Any = dataclasses.MISSING, doc: str = "", lo: float | None = None,
       hi: float | None = None, choices: tuple | None = None, factory: Any = None):
    """A field with a doc string and an optional numeric range."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    base: str = _f(doc="hub id or local folder of the base model (a gemma4_unified checkpoint)")
    quantization: Literal["nf4", "int8", "none"] = _f("nf4", "how the frozen base is stored")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "compute dtype; auto = bf16 on CUDA, fp32 on CPU")
    double_quant: bool = _f(True, "NF4 double quantization of the block scales")
    quant_storage: Literal["uint8", "bf16"] = _f(
        "uint8", "storage dtype of 4-bit weights; FSDP needs bf16")
    trust_remote_code: bool = _f(False, "run code shipped with the model (off unless you trust it)")
    allow_pickle: bool = _f(False, "allow .bin/.pt weights (pickle can run code)")


@dataclass
class DatasetSpec:
    path: str = _f(doc="file, folder, glob, HF datasets folder or hub id")
    format: Literal["messages", "sharegpt", "text", "instruction"] = _f("messages", "record layout")
    weight: float = _f(1.0, "share of the mix", lo=0.0)
    split: str | None = _f(None, "split of a HF dataset")
    max_samples: int | None = _f(None, "take at most this many records", lo=1)
    columns: dict[str, str] = _f(factory=dict, doc="rename columns: {our_name: their_name}")
    metric: Literal["exact_match", "token_f1", "cer", "wer"] | None = _f(
        None, "eval metric for this dataset (default: eval.metric)")


@dataclass
class DataSection:
    max_seq_len: int = _f(2048, "tokens per sample, media included", lo=16, hi=1_048_576)
    on_bad_record: Literal["error", "skip"] = _f("error", "stop on a bad record, or skip and log it")
    train_on: Literal["assistant", "last_assistant", "all"] = _f("assistant", "which tokens carry loss")
    image_tokens: Literal[70, 140, 280, 560, 1120] = _f(280, "soft tokens per image")
    overflow: Literal["drop", "shrink", "truncate_text"] = _f(
        "shrink", "what to do with a sample longer than max_seq_len")
    max_audio_seconds: float = _f(30.0, "longest audio clip", lo=0.04)
    audio_overflow: Literal["trim", "reject"] = _f("trim", "what to do with a longer clip")
    max_image_pixels: int = _f(50_000_000, "refuse larger images (decompression bombs)", lo=1)
    max_media_bytes: int = _f(100_000_000, "refuse larger media files", lo=1)
    allow_network_media: bool = _f(False, "fetch http(s) media URLs")
    mix_by: Literal["samples", "tokens"] = _f("samples", "what dataset weights balance")
    eval_fraction: float = _f(0.0, "held-out share when no eval_datasets are given", lo=0.0, hi=0.9)
    num_proc: int = _f(1, "processes for preprocessing", lo=1, hi=256)
    streaming: bool = _f(False, "tokenize on the fly instead of caching")
    cache_dir: str | None = _f(None, "tokenized cache (default: <output_dir>/../.cache/data)")
    seed: int = _f(0, "seed for splits and mixing")


@dataclass
class LoraSection:
    r: int = _f(16, "LoRA rank", lo=1, hi=4096)
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)", lo=0.0)
    dropout: float = _f(0.0, "LoRA dropout", lo=0.0, hi=0.9)
    targets: list[str] = _f(factory=lambda: ["attention", "mlp"],
                            doc="presets attention, mlp, vision, audio, all, or regexes")
    use_rslora: bool = _f(False, "rank-stabilised LoRA scaling")


@dataclass
class TrainSection:
    output_dir: str = _f("runs/train", "where adapter, checkpoints and logs go")
    max_steps: int = _f(100, "optimizer steps", lo=1)
    lr: float = _f(2e-4, "peak learning rate", lo=0.0, hi=1.0)
    batch_size: int = _f(1, "samples per micro-batch per process", lo=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", lo=1)
    seed: int = _f(0, "seed for init, shuffling and dropout")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)", lo=0)
    keep_checkpoints: int = _f(2, "newest checkpoints to keep", lo=1)
    eval_every: int = _f(0, "eval loss every N steps (0 = off)", lo=0)
    preview_every: int = _f(0, "generate on held-out items every N steps (0 = off)", lo=0)
    preview_items: int = _f(3, "how many held-out items to preview", lo=1)
    chunked_ce: bool = _f(True, "cross-entropy in chunks over label positions only")
    ce_chunk_size: int = _f(256, "label positions per chunk", lo=1)
    gradient_checkpointing: bool = _f(True, "recompute decoder layers in backward")
    offload_activations: bool = _f(False, "keep checkpointed inputs in pinned CPU memory (CUDA)")
    group_by_length: bool = _f(True, "batch samples of similar length")
    packing: bool = _f(False, "pack several samples per row")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = _f("adamw")
    scheduler: Literal["cosine", "linear", "constant"] = _f("cosine")
    warmup: float = _f(0.0, "warmup steps (>= 1) or fraction of max_steps (< 1)", lo=0.0)
    weight_decay: float = _f(0.0, lo=0.0)
    max_grad_norm: float = _f(1.0, "clip gradients (0 = off)", lo=0.0)
    report_to: list[str] = _f(factory=list, doc="tensorboard and/or wandb")
    log_every: int = _f(1, "write metrics every N steps", lo=1)


@dataclass
class EvalSection:
    metric: Literal["exact_match", "token_f1", "cer", "wer"] = _f("exact_match")
    max_new_tokens: int = _f(32, lo=1)
    max_items: int | None = _f(None, lo=1)
    batch_size: int = _f(8, lo=1)


@dataclass
class Recipe:
    model: ModelSection
    datasets: list[DatasetSpec]
    eval_datasets: list[DatasetSpec] = _f(factory=list)
    data: DataSection = _f(factory=DataSection)
    lora: LoraSection = _f(factory=LoraSection)
    train: TrainSection = _f(factory=TrainSection)
    eval: EvalSection = _f(factory=EvalSection)
    source: str = field(default="<recipe>", metadata={"internal": True})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out


REPORT_TO = ("tensorboard", "wandb")


# ---------------------------------------------------------------- generic checking

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 2


def _show(value: Any) -> str:
    """A bounded repr for messages: YAML aliases can make a small file a huge (or shared) tree."""
    return _REPR.repr(value)


def _key(key: Any) -> str:
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
        errors.append(UserError(where, f"expected {_type_name(tp)}, got {_show(value)}"))
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f"Did you mean {close[0]!r}?" if close else ""
        errors.append(UserError(where, f"{_show(value)} is not one of {_type_name(tp)}",
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
                errors.append(UserError(f"{where}.{_key(k)}", f"expected a name, got {_show(v)}",
                                        "Map each name to one column name"))
            else:
                out[str(k)] = str(v)
        return out
    if dataclasses.is_dataclass(tp):
        # `eval:` with every key commented out is an empty section, i.e. all defaults.
        return _build(tp, {} if value is None else value, where, errors)
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
    errors.append(UserError(where, f"expected {_type_name(tp)}, got {_show(value)}"))
    return None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, where: str, errors: list[UserError]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        errors.append(UserError(where or "recipe", f"expected a mapping, got {type(raw).__name__}",
                                "Write `key: value` lines"))
        return None
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(_key(key), list(fields), n=1, cutoff=0.6)
            fix = f"Did you mean {prefix}{close[0]}?" if close else f"Known keys: {', '.join(fields)}"
            errors.append(UserError(f"{prefix}{_key(key)}", "unknown key", fix))
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


def _cross_checks(r: Recipe, errors: list[UserError]) -> None:
    """Rules that span several keys."""
    if not r.datasets:
        errors.append(UserError("datasets", "is empty", "List at least one dataset"))
    if r.datasets and sum(d.weight for d in r.datasets) <= 0:
        errors.append(UserError("datasets", "all weights are zero", "Give one dataset a weight > 0"))
    for i, name in enumerate(r.train.report_to):
        if name not in REPORT_TO:
            errors.append(UserError(f"train.report_to[{i}]", f"{name!r} is not a known tracker",
                                    f"Use one of {', '.join(REPORT_TO)}"))
    from finetune.lora import PRESETS, check_target

    for i, t in enumerate(r.lora.targets):
        try:
            problem = check_target(t)
        except (RecursionError, OverflowError, ValueError) as e:  # re.compile on pathological patterns
            problem = f"{_show(t)} is not a valid regex ({type(e).__name__})"
        if problem:
            errors.append(UserError(f"lora.targets[{i}]", problem,
                                    f"Use a preset ({', '.join(PRESETS)}) or a valid regex"))
    if r.train.packing and r.data.streaming:
        errors.append(UserError("train.packing", "packing needs the cached dataset",
                                "Set data.streaming: false or train.packing: false"))


# ---------------------------------------------------------------- loading


_STD_TAG = "tag:yaml.org,2002:"


class _RecipeLoader(yaml.SafeLoader):
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
                        f"duplicate key {_key(key_node.value)!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError):
            raise
        except Exception as e:  # an explicit tag on a bad value (!!int x, !!timestamp 2024-99-01)
            raise yaml.constructor.ConstructorError(
                None, None, f"bad {node.tag.replace(_STD_TAG, '!!')} value {_show(node.value)} ({e})",
                node.start_mark) from None


_RecipeLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.1 reads `1e-4` (no dot) as a string; everyone writes learning rates that way.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")
_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


class _RecipeDumper(yaml.SafeDumper):
    """Quotes every string the loader would read as something else (`1e5`, `2024-01-01`)."""


_RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)  # a SafeLoader: equivalent to yaml.safe_load


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
            raise UserError(where, f"is {_show(node)}, not a section", "Override a key inside a mapping")


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


def recipe_from_dict(raw: Any, source: str = "<recipe>") -> Recipe:
    errors: list[UserError] = []
    if raw is None:
        raise UserError(source, "the recipe is empty", "Add model:, datasets: and train: sections")
    recipe = _build(Recipe, raw, "", errors)
    if recipe is not None and not errors:
        _cross_checks(recipe, errors)
    if errors:
        raise RecipeErrors(errors)
    recipe.source = source
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise UserError(str(path), f"the recipe must be a mapping, got {type(raw).__name__}",
                        "Start with `model:` at the top level")
    raw = raw or {}
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return recipe_from_dict(raw if raw else None, str(path))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.dump(recipe.to_dict(), Dumper=_RecipeDumper, sort_keys=False))
