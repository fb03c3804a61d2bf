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
from tests.tool_data import expected_call, tool_use_data

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
def test_adapter_learns_to_call_tools_on_held_out_prompts(tiny_base, tmp_path):
    """200 steps of LoRA on 168 tool-use records; every held-out prompt pairs a city and a phrasing
    never seen together. Measured here: held-out exact calls 15/16 (tool chosen 16/16), base 0/16."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.model.generate import generate, load_for_inference
    from finetune.training.loop import train

    records, held = tool_use_data()
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = recipe_from_dict({
        "model": {"base": str(tiny_base), "quantization": "none"}, "datasets": [{"path": str(data)}],
        "data": {"max_seq_len": 256, "cache_dir": str(tmp_path / "cache")},
        "lora": {"r": 16, "alpha": 32, "targets": ["attention", "mlp"]},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 200, "batch_size": 16, "lr": 3e-3,
                  "warmup": 10, "gradient_checkpointing": False, "group_by_length": False, "seed": 1}})
    train(recipe)

    def held_out(adapter, base):
        model, processor, chat, _ = load_for_inference(adapter, base)
        exact = tool = 0
        for record in held:
            conv = parse_record(record, "messages", "held-out", ".")
            conv.messages = conv.messages[:1]  # the user's question: the model decides to call
            calls = read_calls(generate(model, processor, chat, conv, [], [], max_new_tokens=24, raw=True), chat)
            exact += calls == expected_call(record)
            tool += bool(calls) and calls[0]["name"] == expected_call(record)[0]["name"]
        return exact / len(held), tool / len(held)

    exact, tool = held_out(str(tmp_path / "out" / "adapter"), None)
    base_exact, base_tool = held_out(None, str(tiny_base))
    print(f"held-out tool calls: adapter exact {exact:.3f} (tool {tool:.3f}), base exact {base_exact:.3f}")
    assert exact >= 0.8 and tool == 1.0
    assert base_exact == base_tool == 0.0
