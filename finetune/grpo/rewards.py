"""Verifiable rewards for GRPO: the built-ins, user functions, and their weighted sum.

Every reward is called like TRL's reward functions: `fn(prompts, completions, **columns) ->
list[float]`, one value per completion. `prompts` are the served prompts' text, `completions`
the answers as served (the text after any thought channel, special tokens dropped); `columns`
hold `solution` (the reference: the record's last assistant message), `raw_completions` and
`raw_solution` (every token written, special ones included: what `tool_call` and `format` read)
and `modality`. A user function is `module:function`, imported from the current folder or the
Python path.

A function that raises, returns the wrong number of values or a non-number is a `UserError`
naming the function and the item (its record's origin): the reward is re-run item by item to
find which one fails, since a batch call only says that one did.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _norm(text: str) -> str:
    """Case, punctuation (but commas) and spacing do not make an answer wrong: what `finetune
    eval`'s exact match ignores too, so the reward trains what the eval measures."""
    return " ".join(re.sub(r"[^\w\s,]", "", str(text).casefold()).split())


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(str(text).replace(",", ""))
    return float(found[-1]) if found else None


def exact_match(prompts, completions, solution, **_) -> list[float]:
    return [float(_norm(c) == _norm(s)) for c, s in zip(completions, solution)]


def contains(prompts, completions, solution, **_) -> list[float]:
    return [float(_norm(s) in _norm(c)) for c, s in zip(completions, solution)]


def make_regex(pattern: str) -> Callable:
    rx = re.compile(pattern, re.DOTALL)

    def regex(prompts, completions, **_) -> list[float]:
        return [float(rx.fullmatch(c.strip()) is not None) for c in completions]
    return regex


def make_numeric(tolerance: float) -> Callable:
    def numeric(prompts, completions, solution, **_) -> list[float]:
        out = []
        for c, s in zip(completions, solution):
            got, want = _last_number(c), _last_number(s)
            out.append(float(got is not None and want is not None and abs(got - want) <= tolerance))
        return out
    return numeric


def make_tool_call(chat) -> Callable:
    """1 when the completion's calls parse in the family's call syntax and equal the reference's
    (names and arguments, in order); 0 for a malformed call or none where one was due."""
    from finetune.model.generate import read_calls

    def tool_call(prompts, completions, raw_completions, raw_solution, **_) -> list[float]:
        out = []
        for got_raw, want_raw in zip(raw_completions, raw_solution):
            got, want = read_calls(got_raw, chat), read_calls(want_raw, chat)
            out.append(float(bool(want) and got == want))
        return out
    return tool_call


def make_format(chat) -> Callable:
    """1 when the completion is a thinking block (the family's thought channel, non-empty) followed
    by a non-empty answer."""
    head = re.escape(chat.channel_open + chat.thought)
    rx = re.compile(head + r"(?P<thought>.*?)" + re.escape(chat.channel_close) + r"(?P<answer>.*)", re.DOTALL)
    stops = [t for t in (chat.turn_end, chat.call_stop) if t]

    def format_(prompts, completions, raw_completions, **_) -> list[float]:
        out = []
        for raw in raw_completions:
            for t in stops:
                raw = raw.split(t)[0]
            m = rx.match(raw.strip())
            out.append(float(m is not None and bool(m["thought"].strip()) and bool(m["answer"].strip())))
        return out
    return format_


BUILT_INS = ("exact_match", "contains", "regex", "numeric", "tool_call", "format")


def _import(name: str, where: str) -> Callable:
    module, _, fn = name.partition(":")
    if str(Path.cwd()) not in sys.path:  # reward modules beside the recipe, as `python -m` would find them
        sys.path.insert(0, str(Path.cwd()))
    try:
        found = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(where, f"can't import reward {name!r} ({type(e).__name__}: {e})",
                        "Give module:function of a module on the Python path (or in the current folder)") from None
    if not callable(found):
        raise UserError(where, f"{name!r} is not a function", "Point grpo.rewards[].name at a function")
    return found


def build_reward(spec, chat, where: str) -> Callable:
    """The function a `grpo.rewards` entry names (built-in or `module:function`)."""
    name = spec.name
    if name == "exact_match":
        return exact_match
    if name == "contains":
        return contains
    if name == "regex":
        return make_regex(spec.pattern)
    if name == "numeric":
        return make_numeric(spec.tolerance)
    if name == "tool_call":
        return make_tool_call(chat)
    if name == "format":
        return make_format(chat)
    return _import(name, where)


def check_spec(spec, where: str) -> list[UserError]:
    """Recipe-time problems of one `grpo.rewards` entry (no import: modules may load later)."""
    errors = []
    if spec.name not in BUILT_INS and not re.fullmatch(r"[\w.]+:\w+", spec.name):
        errors.append(UserError(f"{where}.name", f"{spec.name!r} is neither a built-in reward nor module:function",
                                f"Use one of {', '.join(BUILT_INS)}, or module:function"))
    if spec.name == "regex":
        if not spec.pattern:
            errors.append(UserError(f"{where}.pattern", "the regex reward needs a pattern", "Set pattern: '...'"))
        else:
            try:
                re.compile(spec.pattern)
            except re.error as e:
                errors.append(UserError(f"{where}.pattern", f"not a valid regex ({e})", "Fix the pattern"))
    return errors


@dataclass
class Reward:
    name: str
    weight: float
    fn: Callable
    where: str


class Rewards:
    """The recipe's rewards: each one's values, and their weighted sum."""

    def __init__(self, specs, chat):
        self.items = [Reward(s.name, s.weight, build_reward(s, chat, f"grpo.rewards[{i}]"), f"grpo.rewards[{i}]")
                      for i, s in enumerate(specs)]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.items]

    def score(self, prompts: list[str], completions: list[str], columns: dict[str, list],
              origins: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, {reward name: its values})."""
        each = {r.name: _call(r, prompts, completions, columns, origins) for r in self.items}
        total = [sum(r.weight * each[r.name][k] for r in self.items) for k in range(len(completions))]
        return total, each


def _call(r: Reward, prompts, completions, columns, origins) -> list[float]:
    try:
        values = r.fn(prompts, completions, **columns)
    except Exception as e:  # noqa: BLE001 - user code: any failure is reported with the item
        k, err = _failing_item(r, prompts, completions, columns, e)
        raise UserError(f"{r.where} ({r.name})", f"raised {type(err).__name__}: {err} on item {k} "
                        f"(record {origins[k]}, completion {completions[k][:60]!r})",
                        "Fix the reward function (it gets prompts, completions and the columns as lists)") from None
    values = list(values) if values is not None else []
    if len(values) != len(completions):
        raise UserError(f"{r.where} ({r.name})", f"returned {len(values)} values for {len(completions)} completions",
                        "Return one float per completion")
    for k, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            raise UserError(f"{r.where} ({r.name})", f"returned {v!r} for item {k} (record {origins[k]})",
                            "Return a float per completion")
    return [float(v) for v in values]


def _failing_item(r: Reward, prompts, completions, columns, first: Exception) -> tuple[int, Exception]:
    """(index, error) of the first item the reward fails on alone (0 and the batch error if none)."""
    for k in range(len(completions)):
        try:
            r.fn(prompts[k:k + 1], completions[k:k + 1], **{c: v[k:k + 1] for c, v in columns.items()})
        except Exception as e:  # noqa: BLE001
            return k, e
    return 0, first


def reward_by_modality(specs, chat, items, answers: dict[str, list[str]], raw: dict[str, list[str]],
                       raw_solution: list[str]) -> dict:
    """`finetune eval` on a GRPO recipe: {side: {modality: {reward, n, by reward name}}} of the
    greedy answers of each side ("base", "adapter") to held-out items (`.id`, `.reference`,
    `.conv`), as in training: `raw` (each side's answers with special tokens) and `raw_solution`
    (the references as the model writes them) are what `tool_call` and `format` read."""
    rewards = Rewards(specs, chat)
    mods = [it.conv.modality() for it in items]
    columns = {"solution": [it.reference for it in items], "raw_solution": raw_solution, "modality": mods}
    prompts = [" ".join(m.text() for m in it.conv.messages[:-1]) for it in items]
    out = {}
    for side, completions in answers.items():
        total, each = rewards.score(prompts, completions, {**columns, "raw_completions": raw[side]},
                                    [it.id for it in items])
        table: dict[str, dict] = {}
        for m in sorted(set(mods)) + ["all"]:
            idx = [k for k, x in enumerate(mods) if m in ("all", x)]
            table[m] = {"reward": round(sum(total[k] for k in idx) / len(idx), 4), "n": len(idx),
                        **{name: round(sum(v[k] for k in idx) / len(idx), 4) for name, v in each.items()}}
        out[side] = table
    return out
