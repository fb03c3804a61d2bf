"""Tool use end to end on the tiny base: it stops where the real Gemma 4 stops, calls written by
the template are read back exactly, and a LoRA adapter learns to call a tool on held-out
prompts (tests/tool_data.py) where the base never does."""

from __future__ import annotations

import json

import pytest

from data_tools.formats import parse_record
from data_tools.render import Renderer, RenderSettings
from finetune.model.families import GEMMA4_UNIFIED
from finetune.model.generate import read_calls, stop_ids
from tests.tool_data import tool_use_data

CHAT = GEMMA4_UNIFIED.chat


def test_tiny_base_stops_at_end_of_turn_and_at_the_tool_handover(tiny_base, processor):
    """Like the released instruction-tuned Gemma 4 ([<eos>, <turn|>, <|tool_response>]); merged and
    exported folders copy this file."""
    tok = processor.tokenizer
    want = [tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>"), tok.convert_tokens_to_ids("<|tool_response>")]
    assert json.loads((tiny_base / "generation_config.json").read_text())["eos_token_id"] == want
    assert sorted(stop_ids(processor, CHAT)) == sorted(want) and tok.unk_token_id not in want


@pytest.mark.parametrize("args", [
    {"city": "Paris"},
    {"city": "New York, NY", "days": 3, "metric": True, "ratio": 0.5, "none": None},
    {"filter": {"kind": "rain", "min": -2}, "cities": ["Oslo", "Rome"], "empty": {}, "nothing": []},
])
def test_calls_written_by_the_template_read_back_exactly(processor, args):
    record = {"tools": [{"type": "function", "function": {"name": "get_weather", "description": "d"}}],
              "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "tool_calls": [
                  {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}},
                  {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]}
    r = Renderer(processor, RenderSettings(), CHAT)
    text, _, _ = r.text_and_labels(parse_record(record, "messages", "t", "."))
    assert read_calls(text, CHAT) == [{"name": "get_weather", "arguments": args},
                                      {"name": "get_weather", "arguments": {}}]
    assert read_calls("It is sunny.", CHAT) == []
    assert read_calls('<|tool_call>call:get_weather{city:<|"|>Pa<tool_call|>', CHAT) is None


@pytest.mark.slow
@pytest.mark.agent_loop
def test_adapter_runs_held_out_tool_flows_as_an_agent(tiny_base, tmp_path):
    """LoRA on the tool-use data (every step served-exact), then `finetune eval` runs each held-out
    flow (a call or two parallel calls, the responses, the answer; every prompt pairs a city and a
    phrasing never seen together, and the results are drawn at random, so the answer must be copied
    from the responses) as an agent loop, base vs adapter. Measured here (450 steps, 36 held-out
    flows): per-step call accuracy adapter 1.0, base 0.0; final answer exact adapter 1.0, base 0.0, on
    train.seed 1 and 2 alike (300 steps: 1.0 and 0.83; 400 with group_by_length: 1.0 and 0.67)."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.eval.evaluate import evaluate_adapter
    from finetune.training.loop import train

    records, held = tool_use_data()
    data, held_file = tmp_path / "tools.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
    recipe = recipe_from_dict({
        "model": {"base": str(tiny_base), "quantization": "none"}, "datasets": [{"path": str(data)}],
        "eval_datasets": [{"path": str(held_file)}],
        "data": {"max_seq_len": 320, "cache_dir": str(tmp_path / "cache")},
        "lora": {"r": 16, "alpha": 32, "targets": ["attention", "mlp"]},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 450, "batch_size": 16, "lr": 3e-3,
                  "warmup": 10, "gradient_checkpointing": False, "group_by_length": False, "seed": 1},
        "eval": {"max_new_tokens": 40}})
    train(recipe)
    result, items = evaluate_adapter(recipe, tmp_path / "out" / "adapter")
    agent = result["agent"]
    print("agent loop:", json.dumps({k: agent[k] for k in ("base", "adapter")}))
    assert agent["adapter"]["n"] == len(items) == len(held) and result["summary"]["n"] == 0
    assert agent["adapter"]["call_accuracy"] >= 0.9 and agent["adapter"]["final_exact"] >= 0.9, agent["adapter"]
    assert agent["base"]["call_accuracy"] <= 0.1 and agent["base"]["final_exact"] <= 0.1, agent["base"]
