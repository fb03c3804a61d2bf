"""The agent loop of `finetune eval` (finetune.eval.agent): calls read in the official syntax,
answered from the recorded responses or a named function, fed back exactly as the template serves
them, scored per step and on the final answer. The model here writes a fixed script, so that the
harness is checked against known answers; tests/eval/test_tool_use.py runs it on trained models."""

from __future__ import annotations

import json

import pytest

from data_tools.formats import parse_record
from data_tools.render import Renderer, RenderSettings
from finetune.errors import UserError
from finetune.eval.agent import is_agent_item, python_responder, recorded_responder, run_agent
from finetune.eval.evaluate import exact_match
from finetune.model.families import GEMMA4_UNIFIED
from tests.tool_data import TOOLS, parallel_flow

CHAT = GEMMA4_UNIFIED.chat
CALL = '<|tool_call>call:{}{{city:<|"|>{}<|"|>}}<tool_call|>'


def _record() -> dict:
    """A greeting, then one question answered in three steps: two parallel calls, one more call,
    the answer."""
    first = parallel_flow("Halden", "Weather and time in Halden, then the weather in Mirovo?", 0)["messages"]
    mirovo = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Mirovo"}'}}
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *first[:4],
        {"role": "assistant", "content": None, "tool_calls": [mirovo]},
        {"role": "tool", "tool_call_id": "c", "content": "rainy"},
        {"role": "assistant", "content": "Sunny at 0:00 in Halden, rainy in Mirovo."}]}


RECORD = _record()
GOOD = [CALL.format("get_weather", "Halden") + CALL.format("get_time", "Halden") + "<|tool_response>",
        CALL.format("get_weather", "Mirovo") + "<|tool_response>",
        "Sunny at 0:00 in Halden, rainy in Mirovo.<turn|>"]


def scripted(processor, conv, script: list[str], seen: list[str]):
    """A 'model' that writes `script` step by step and records the prompt it was served."""
    r = Renderer(processor, RenderSettings(), CHAT)

    def generate(state):
        seen.append(r.prompt_text(state))
        return script[len(seen) - 1]
    return generate


def test_a_perfect_agent_scores_one_and_is_served_the_recorded_prompts(processor):
    conv = parse_record(json.loads(json.dumps(RECORD)), "messages", "t", ".")
    assert is_agent_item(conv)
    seen = []
    out = run_agent(conv, scripted(processor, conv, GOOD, seen), CHAT, recorded_responder(conv), exact_match)
    assert out["call_accuracy"] == 1.0 and out["final_exact"] == 1.0 and len(out["steps"]) == 3
    assert out["steps"][0]["calls"] == [{"name": "get_weather", "arguments": {"city": "Halden"}},
                                        {"name": "get_time", "arguments": {"city": "Halden"}}]
    # Each prompt is what a server renders for the recorded conversation up to that step.
    r = Renderer(processor, RenderSettings(), CHAT)
    msgs = RECORD["messages"]
    for k, prompt in zip((3, 6, 8), seen):
        prefix = parse_record({"tools": TOOLS, "messages": msgs[:k] + [{"role": "assistant", "content": "x"}]},
                              "messages", "t", ".")
        assert prompt == r.prompt_text(prefix), k


def test_wrong_calls_and_answers_are_scored_per_step(processor):
    conv = parse_record(json.loads(json.dumps(RECORD)), "messages", "t", ".")
    # Parallel calls in another order are the same calls; a wrong city is not.
    script = [CALL.format("get_time", "Halden") + CALL.format("get_weather", "Halden") + "<|tool_response>",
              CALL.format("get_weather", "Tessel") + "<|tool_response>", "It is rainy.<turn|>"]
    seen = []
    out = run_agent(conv, scripted(processor, conv, script, seen), CHAT, recorded_responder(conv), exact_match)
    assert out["call_accuracy"] == 0.5 and out["final_exact"] == 0.0
    assert 'response:get_time{value:<|"|>0:00<|"|>}' in seen[1]  # answered by name and arguments
    assert out["final"] == "It is rainy."
    # The unrecorded call got an error as its response, as a real tool would answer it.
    assert recorded_responder(conv)("get_weather", {"city": "Tessel"}).startswith("error:")
    # A model that never calls answers at once: no call step right, its answer compared.
    out = run_agent(conv, scripted(processor, conv, [GOOD[2]], []),
                    CHAT, recorded_responder(conv), exact_match)
    assert out["call_accuracy"] == 0.0 and out["final_exact"] == 1.0 and len(out["steps"]) == 1
    # An unreadable call ends the loop as a (wrong) answer.
    out = run_agent(conv, scripted(processor, conv, ['<|tool_call>call:get_weather{city:<|"|>Pa'], []),
                    CHAT, recorded_responder(conv), exact_match)
    assert out["call_accuracy"] == 0.0 and out["final_exact"] == 0.0


def weather(name: str, arguments: dict) -> str:
    """A tool implementation for `eval.tool_responder: tests.eval.test_agent:weather`."""
    return {"get_weather": "sunny", "get_time": "0:00"}[name] if arguments["city"] == "Halden" else "rainy"


def test_a_named_function_answers_the_calls(processor):
    conv = parse_record(json.loads(json.dumps(RECORD)), "messages", "t", ".")
    seen = []
    out = run_agent(conv, scripted(processor, conv, GOOD, seen), CHAT, python_responder("tests.eval.test_agent:weather"), exact_match)
    assert out["call_accuracy"] == 1.0 and "<|tool_response>response:get_weather{value:<|\"|>rainy" in seen[2]
    with pytest.raises(UserError) as e:
        python_responder("tests.eval.test_agent:nothing")
    assert e.value.where == "eval.tool_responder"


def test_report_shows_the_agent_loop(tmp_path):
    from finetune.eval.report import write_report

    empty = {"n": 0, "wins": 0, "losses": 0, "ties": 0, "metrics": {}}
    result = {"summary": empty, "by_modality": {}, "by_dataset": {}, "items": [],
              "agent": {"base": {"n": 2, "call_accuracy": 0.0, "final_exact": None},
                        "adapter": {"n": 2, "call_accuracy": 1.0, "final_exact": 0.5}}}
    text = write_report(tmp_path / "r.html", result, [], "t").read_text()
    assert "<tr><td>base</td><td>2</td><td>0.000</td><td>–</td></tr>" in text
    assert "<tr><td>adapter</td><td>2</td><td>1.000</td><td>0.500</td></tr>" in text
