"""Property-based: whatever the input, the recipe loader and the renderer answer with a valid
object or our error type (UserError / BadRecord), never another exception.

The record parser's own property test lives in test_sources_formats.py.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from finetune.config.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict
from finetune.config.schema import resolve_paths
from finetune.errors import UserError

# -- what a recipe is made of, read from the dataclasses so new keys are fuzzed too ----------------

SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")}
HINTS = typing.get_type_hints(Recipe)
FIELDS = {name: list(typing.get_type_hints(typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp))
          for name, tp in HINTS.items() if name in SECTIONS}
VALUES = ["nf4", "int8", "none", "auto", "bf16", "messages", "sharegpt", "text", "instruction", "error", "skip",
          "drop", "shrink", "assistant", "all", "attention", "mlp", "vision", "audio", "q_proj$", "(", "",
          "adamw", "cosine", "wandb", "exact_match", "a.jsonl", "some/base", 70, 280, 1, 0, -1, 16, 0.5, 2e-4,
          1e300, True, False, None]

_scalar = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
           | st.binary(max_size=4) | st.sampled_from(VALUES))
_key = st.sampled_from(sorted(SECTIONS) + sorted({k for ks in FIELDS.values() for k in ks})) | st.text(max_size=5)
_tree = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_key, inner, max_size=4),
                     max_leaves=16)


def _or_junk(strategy):
    return st.integers(0, 9).flatmap(lambda n: _tree if n == 5 else strategy)


def _section(name: str):
    body = st.dictionaries(st.sampled_from(FIELDS[name]), _or_junk(st.sampled_from(VALUES)), max_size=5)
    return st.lists(_or_junk(body), max_size=3) if name in ("datasets", "eval_datasets") else body


# Mostly recipe-shaped (every key path gets reached), sometimes anything at all.
_recipe_like = st.fixed_dictionaries({}, optional={name: _or_junk(_section(name)) for name in SECTIONS})
_anything = _or_junk(_recipe_like)


def _check_error(e: UserError) -> None:
    for line in e.lines():
        assert "\n" not in line and len(line) < 800, line
        assert re.match(r"^.+: .+[.?!]$", line), line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_anything)
def test_recipe_from_dict_gives_a_recipe_or_a_user_error(raw):
    try:
        recipe = recipe_from_dict(raw)
    except UserError as e:
        _check_error(e)
        return
    assert isinstance(recipe, Recipe)
    # A valid recipe survives its own dump: what `finetune train` writes as recipe.lock.yaml.
    assert recipe_from_dict(recipe.to_dict()).to_dict() == recipe.to_dict()


_TRICKY = ["1e5", "-1E-3", "2024-01-01", "2024-13-45", "yes", "off", "null", "~", "0x1f", "0o17", "1_000", ".nan",
           "-.inf", "true", "12:30:00", "'q'", '"', "- a", "a: b", "#c", "!tag", "&x", "*x", " pad ", "\t", "é"]
_str = st.text(min_size=1, max_size=8) | st.sampled_from(_TRICKY)


def _valid_recipe():
    base = {"model": st.fixed_dictionaries({"base": _str}),
            "datasets": st.lists(st.fixed_dictionaries({"path": _str},
                                                       optional={"weight": st.floats(0.5, 3)}),
                                 min_size=1, max_size=2)}
    return st.fixed_dictionaries(base, optional={
        "train": st.fixed_dictionaries({}, optional={"output_dir": _str, "lr": st.floats(0, 1)}),
        "data": st.fixed_dictionaries({}, optional={"cache_dir": st.none() | _str})})


_TMP = Path(tempfile.mkdtemp(prefix="finetune-fuzz-"))


@settings(max_examples=40, deadline=None)
@given(raw=_valid_recipe())
def test_lock_file_round_trips_any_strings(raw):
    """Strings that look like numbers, dates, booleans or nulls stay strings through YAML."""
    try:
        recipe = recipe_from_dict(raw)
    except UserError:
        assume(False)
    dump_recipe(recipe, _TMP / "lock.yaml")
    # Read back from a file, its relative paths resolve against the file's folder.
    expected = recipe.to_dict()
    resolve_paths(Recipe, expected, _TMP)
    assert load_recipe(_TMP / "lock.yaml").to_dict() == expected


# -- arbitrary files ---------------------------------------------------------------------------

_FRAGMENTS = ["model:", "datasets:", "lora:", "train:", "data:", "\n", "\n  ", "\n  - ", "- ", ": ", "base: x",
              "path: a.jsonl", "r: 8", "lr: 1e-4", "{", "}", "[", "]", ",", "'", '"', "&a ", "*a", "<<: *a", "? ",
              "!!python/object/apply:os.getcwd []", "!!int x", "!!float", "!!binary ====", "!!set {a}", "!!omap",
              "!!timestamp 2024-99-01", "2024-13-45", "!foo", "%YAML 1.1\n---", "---", "...", "|", ">", "#",
              "\t", "\\", "\x00", "\ufeff", "é", ".nan", ".inf", "~", "0x1f", "0o7", "1_000", ":x"]
_yamlish = st.lists(st.sampled_from(_FRAGMENTS) | st.text(max_size=4), max_size=25).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=_yamlish | st.text(max_size=60) | st.binary(max_size=60))
def test_load_recipe_on_any_file_gives_a_recipe_or_a_user_error(content):
    path = _TMP / "fuzz.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    try:
        assert isinstance(load_recipe(path), Recipe)
    except UserError as e:
        _check_error(e)


_override = st.tuples(
    st.lists(st.sampled_from(["model", "base", "datasets", "eval_datasets", "0", "1", "9", "lora", "r", "targets",
                              "train", "lr", "x", ""]) | st.text(max_size=3), min_size=1, max_size=4).map(".".join),
    st.sampled_from(["=", "=", ""]),
    _yamlish | st.sampled_from(["8", "[a, b]", "{a: 1}", "null", "true", "1e-4"]),
).map("".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(_override, max_size=3))
def test_overrides_give_a_recipe_or_a_user_error(overrides):
    path = _TMP / "good.yaml"
    path.write_text("model:\n  base: some/base\ndatasets:\n  - path: a.jsonl\n")
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except UserError as e:
        _check_error(e)


# -- rendering: parsed records through the tiny processor --------------------------------------------

_TEXT = st.lists(st.sampled_from(["a", "hi", " ", "\n", "é", "<|image|>", "<|audio|>", "<turn|>", "<|turn>",
                                  "<bos>", "<eos>", "<|channel>", "model\n", "<image>"]) | st.text(max_size=3),
                 max_size=8).map("".join)
_TURN = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _TEXT})


@pytest.fixture(scope="module")
def processor():
    from finetune.demo.tiny_model import build_processor

    return build_processor()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(turns=st.lists(_TURN, min_size=1, max_size=4), fmt=st.sampled_from(["messages", "text"]),
       max_seq_len=st.sampled_from([16, 24, 64, 512]), overflow=st.sampled_from(["drop", "shrink", "truncate_text"]),
       train_on=st.sampled_from(["assistant", "last_assistant", "all"]))
def test_render_gives_a_sample_or_a_bad_record(processor, turns, fmt, max_seq_len, overflow, train_on):
    from data_tools.conversation import REASONS, BadRecord
    from data_tools.formats import parse_record
    from data_tools.render import IGNORE, Renderer, RenderSettings
    from finetune.model.families import GEMMA4_UNIFIED

    record = {"messages": turns} if fmt == "messages" else {"text": turns[0]["content"]}
    renderer = Renderer(processor, RenderSettings(max_seq_len=max_seq_len, train_on=train_on, overflow=overflow),
                        GEMMA4_UNIFIED.chat)
    try:
        sample = renderer.render(parse_record(record, fmt, "f.jsonl:1", "."), [], [])
    except BadRecord as bad:
        assert bad.reason in REASONS
        return
    assert len(sample["input_ids"]) == len(sample["labels"]) == len(sample["mm_token_type_ids"])
    assert len(sample["input_ids"]) <= max_seq_len
    assert any(x != IGNORE for x in sample["labels"])
