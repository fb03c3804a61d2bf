"""The GRPO rewards: golden values of each built-in, user functions, and the errors that name
the function and the item."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from finetune.errors import UserError
from finetune.grpo.rewards import Rewards, check_spec
from finetune.model.families import GEMMA4_UNIFIED

CHAT = GEMMA4_UNIFIED.chat


def spec(name, weight=1.0, pattern=None, tolerance=0.0):
    return SimpleNamespace(name=name, weight=weight, pattern=pattern, tolerance=tolerance)


def score(specs, completions, solution, raw_completions=None, raw_solution=None, **extra):
    n = len(completions)
    columns = {"solution": solution, "raw_completions": raw_completions or completions,
               "raw_solution": raw_solution or solution, "modality": ["text"] * n, **extra}
    return Rewards(specs, CHAT).score(["q"] * n, completions, columns, [f"f.jsonl:{k}" for k in range(n)])


def test_built_ins_golden_values():
    total, each = score([spec("exact_match"), spec("contains", 0.5), spec("numeric", 2.0, tolerance=0.01),
                         spec("regex", pattern=r"[a-z ]+")],
                        [" Red ", "it is red", "3.141", "x = 2", "RED"], ["red", "red", "3.14", "2.5", "red"])
    assert each["exact_match"] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert each["contains"] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert each["numeric"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert each["regex"] == [0.0, 1.0, 0.0, 0.0, 0.0]  # the whole (stripped) completion must match
    assert total == [1.5, 1.5, 2.5, 0.0, 1.5]


def test_tool_call_and_format():
    call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
    other = '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>,days:3}<tool_call|>'
    broken = '<|tool_call>call:get_weather{city:<|"|>Paris<tool_call|>'
    _, each = score([spec("tool_call")], ["", "", "", ""], [""] * 4, raw_completions=[call, other, broken, "Paris"],
                    raw_solution=[call] * 4)
    assert each["tool_call"] == [1.0, 0.0, 0.0, 0.0]
    good = "<|channel>thought\nIt is red.<channel|>red<turn|>"
    _, each = score([spec("format")], ["red"] * 4, ["red"] * 4,
                    raw_completions=[good, "red<turn|>", "<|channel>thought\n<channel|>red", "<|channel>thought\nx<channel|>"])
    assert each["format"] == [1.0, 0.0, 0.0, 0.0]


def test_user_functions_get_the_columns(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    total, each = score([spec("grpo_rewards_user:length_bonus"), spec("grpo_rewards_user:echo_column", 2.0)],
                        ["abc", "abcdefghijklmno"], ["x", "y"], difficulty=[1, 3])
    assert each["grpo_rewards_user:length_bonus"] == [0.3, 1.0]
    assert total == [0.3 + 2.0, 1.0 + 6.0]


def test_a_failing_reward_names_the_function_and_the_item(monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    with pytest.raises(UserError) as e:
        score([spec("exact_match"), spec("grpo_rewards_user:fails_on_blue")], ["red", "green", "blue"], ["red"] * 3)
    assert e.value.where == "grpo.rewards[1] (grpo_rewards_user:fails_on_blue)"
    assert "ZeroDivisionError" in e.value.what and "item 2 (record f.jsonl:2" in e.value.what
    with pytest.raises(UserError) as e:
        score([spec("grpo_rewards_user:too_few")], ["a", "b"], ["a", "b"])
    assert "returned 1 values for 2 completions" in e.value.what
    with pytest.raises(UserError) as e:
        score([spec("grpo_rewards_user:nothing_here")], ["a"], ["a"])
    assert e.value.where == "grpo.rewards[0]" and "AttributeError" in e.value.what


def test_specs_are_checked():
    assert [e.where for e in check_spec(spec("regex"), "grpo.rewards[0]")] == ["grpo.rewards[0].pattern"]
    assert "not a valid regex" in check_spec(spec("regex", pattern="(a"), "r")[0].what
    assert check_spec(spec("exact_match"), "r") == [] and check_spec(spec("pkg.mod:fn"), "r") == []
    assert "neither a built-in" in check_spec(spec("exactmatch"), "r")[0].what


def test_eval_scores_the_raw_text_as_training_does(processor):
    """`finetune eval` on a GRPO recipe: `format` reads each side's raw answer (the thought channel
    is gone from the served text) and `tool_call` the reference as the model writes it."""
    from data_tools.formats import parse_record
    from finetune.grpo.rewards import reward_by_modality
    from finetune.model.generate import renderer

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    rec = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Look it up.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]}
    conv = parse_record(rec, "messages", "f.jsonl:1", "/data")
    written = renderer(processor, CHAT).answer_text(conv, thinking=True)
    assert written == ('<|channel>thought\nLook it up.<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>}'
                       '<tool_call|><|tool_response>')  # the call stop is what the model writes last
    item = SimpleNamespace(id="w", reference="", conv=conv)
    raw = {"base": ["<tool_call|>"], "adapter": [written]}
    out = reward_by_modality([spec("tool_call"), spec("format")], CHAT, [item], {"base": [""], "adapter": [""]},
                             raw, [written])
    assert out["adapter"]["text"]["tool_call"] == 1.0 and out["base"]["text"]["tool_call"] == 0.0
    # a thought, then the call: the format holds; the served text alone (thought dropped) would not
    assert out["adapter"]["text"]["format"] == 1.0 and out["base"]["text"]["format"] == 0.0
    out = reward_by_modality([spec("format")], CHAT, [item], {"adapter": ["red"]}, {"adapter": ["red<turn|>"]},
                             [written])
    assert out["adapter"]["all"]["format"] == 0.0
