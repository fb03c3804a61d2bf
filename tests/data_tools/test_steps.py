"""Every step trained exactly as served (data_tools.chat_text, data_tools.steps).

For each labelled step k of a sample: its prompt tokens decode to
`apply_chat_template(messages[:k], tools, add_generation_prompt=True, enable_thinking=…)`, its
labelled tokens are what the model writes there through the stop token, and prompt ids + label
ids are the tokenization of that text (no merge across the boundary). A branched row gives the
same logits and loss as the steps run one by one (float64). The token overhead of served-exact
training is measured on the tool-use data and on a 10-turn conversation.
"""

from __future__ import annotations

import json

import pytest
import torch

from data_tools.collate import collate
from data_tools.formats import parse_record
from data_tools.render import IGNORE, Renderer, RenderSettings
from data_tools.steps import main_length, step_ids, step_spans, tree_mask
from finetune.model.families import GEMMA4_UNIFIED
from tests.tool_data import TOOLS, tool_use_data

CHAT = GEMMA4_UNIFIED.chat
THOUGHT = "<|channel>thought\n"
SCAFFOLD = THOUGHT + "<channel|>"


def call(name, city, id_):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": {"city": city}}}


def ten_turns() -> dict:
    msgs = []
    for k in range(10):
        msgs += [{"role": "user", "content": f"Question number {k}: what is {k} plus {k}?"},
                 {"role": "assistant", "content": f"It is {2 * k}."}]
    return {"messages": [{"role": "system", "content": "Answer briefly."}, *msgs]}


RECORDS = {
    "ten-turns": ten_turns(),
    "calls-then-answer": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather and time in Halden?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Halden", "a"),
                                                              call("get_time", "Halden", "b")]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "b", "content": "9:00"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Mirovo", "c")]},
        {"role": "tool", "tool_call_id": "c", "content": "rainy"},
        {"role": "assistant", "content": "Sunny at 9:00 in Halden; rainy in Mirovo."},
        {"role": "user", "content": "And Tessel?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", "Tessel", "d")]},
        {"role": "tool", "tool_call_id": "d", "content": "snowy"},
        {"role": "assistant", "content": "Snowy."}]},
    "thinking": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "reasoning_content": "Add them.", "content": "4"},
        {"role": "user", "content": "Weather in Porta?"},
        {"role": "assistant", "reasoning_content": "Look it up.", "content": None,
         "tool_calls": [call("get_weather", "Porta", "a")]},
        {"role": "tool", "tool_call_id": "a", "content": "windy"},
        {"role": "assistant", "reasoning_content": "Got it.", "content": "Windy."}]},
}
# What the model writes at each step (tiny template = the official main one's syntax).
CALL = '<|tool_call>call:{}{{city:<|"|>{}<|"|>}}<tool_call|>'
WRITTEN = {
    "ten-turns": [f"It is {2 * k}.<turn|>" for k in range(10)],
    "calls-then-answer": [CALL.format("get_weather", "Halden") + CALL.format("get_time", "Halden") + "<|tool_response>",
                          CALL.format("get_weather", "Mirovo") + "<|tool_response>",
                          "Sunny at 9:00 in Halden; rainy in Mirovo.<turn|>",
                          CALL.format("get_weather", "Tessel") + "<|tool_response>", "Snowy.<turn|>"],
    "thinking": [THOUGHT + "Add them.<channel|>4<turn|>",
                 THOUGHT + "Look it up.<channel|>" + CALL.format("get_weather", "Porta") + "<|tool_response>",
                 THOUGHT + "Got it.<channel|>Windy.<turn|>"],
}


def render(processor, record, **settings):
    r = Renderer(processor, RenderSettings(max_seq_len=4096, **settings), CHAT)
    conv = parse_record(json.loads(json.dumps(record)), "messages", "t", ".")
    return r.render(conv, [], []), r


def served_prompts(processor, record) -> list[str]:
    """The template applied as a server applies it before each assistant step."""
    thinking = any(m.get("reasoning_content") for m in record["messages"])
    kw = {"tools": record["tools"]} if record.get("tools") else {}
    msgs = record["messages"]
    return [processor.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True,
                                          enable_thinking=thinking, **kw)
            for k, m in enumerate(msgs) if m["role"] == "assistant"]


@pytest.mark.parametrize("name", list(RECORDS))
def test_every_step_is_trained_after_its_served_prompt(processor, name):
    sample, r = render(processor, RECORDS[name])
    tok = processor.tokenizer
    steps = step_ids(sample)
    prompts = served_prompts(processor, RECORDS[name])
    assert [tok.decode(p) for p, _ in steps] == prompts
    assert [tok.decode(d) for _, d in steps] == WRITTEN[name]
    for (prompt, done), text in zip(steps, prompts):
        assert prompt + done == r.encode(text + tok.decode(done))  # no merge across the boundary
        assert tok.decode(done).count(THOUGHT) <= 1 and SCAFFOLD not in tok.decode(done)
    # The main row is the conversation as its last step is served.
    assert tok.decode(sample["input_ids"][: main_length(sample)]) == prompts[-1] + WRITTEN[name][-1] + (
        "\n" if WRITTEN[name][-1].endswith("<turn|>") else "")
    last, _ = render(processor, RECORDS[name], train_on="last_assistant")
    assert [tok.decode(d) for _, d in step_ids(last)] == WRITTEN[name][-1:] and "position_ids" not in last


def test_tree_mask_is_causal_along_each_branch():
    # main 0..5; a branch repeating token 3 (positions 3, 4); a deeper one repeating token 4.
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 4, 5, 3, 4]])
    m = tree_mask(pos)[0]
    sees = {q: [k for k in range(10) if m[q, k]] for q in range(10)}
    assert sees[5] == [0, 1, 2, 3, 4, 5]
    assert sees[7] == [0, 1, 2, 3, 6, 7]
    assert sees[9] == [0, 1, 2, 8, 9]
    assert torch.equal(tree_mask(torch.arange(6).view(1, 6))[0], torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.fixture(scope="module")
def model64(tiny_base):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(tiny_base), dtype=torch.float64,
                                                       attn_implementation="sdpa").eval()


@pytest.mark.parametrize("name", ["ten-turns", "thinking"])
def test_branched_row_equals_the_steps_run_apart(processor, model64, name):
    """Logits of every labelled token and the summed loss, float64: the branched row against each
    step's own sequence (served prompt + what it writes), which is what serving computes."""
    from finetune.objectives.sft import loss_sum, n_labels

    sample, _ = render(processor, RECORDS[name])
    cfg = model64.config.get_text_config()
    assert max(sample["position_ids"]) > cfg.sliding_window  # the window is measured in positions
    row = collate([sample], 0, sliding_window=cfg.sliding_window, layer_types=cfg.layer_types)
    with torch.no_grad():
        logits = model64(**{k: v for k, v in row.items() if k != "labels"}).logits[0]
        total = float(loss_sum(model64, row, chunked=False))
        labels = row["labels"][0]
        apart_total, n_apart = 0.0, 0
        for path, span in step_spans(sample):
            prompt, done = row["input_ids"][0][path].tolist(), labels[list(span)].tolist()
            alone = {"input_ids": prompt + done, "labels": [IGNORE] * len(prompt) + done,
                     "mm_token_type_ids": [0] * (len(prompt) + len(done))}
            b = collate([alone], 0)
            got = model64(**{k: v for k, v in b.items() if k != "labels"}).logits[0][len(prompt) - 1:-1]
            assert torch.allclose(logits[[t - 1 for t in span]], got, atol=1e-10, rtol=0)
            apart_total += float(loss_sum(model64, b, chunked=False))
            n_apart += n_labels(b)
        # The CE itself runs in float32 (finetune.losses): ~60 terms of relative error 6e-8 each.
        assert n_labels(row) == n_apart and abs(total - apart_total) <= 1e-6 * abs(apart_total)
        # The mask matters: a plain causal mask over the row (branches see each other) differs.
        leaky = dict(row, attention_mask=torch.ones_like(row["input_ids"]))
        leaky.pop("position_ids")
        assert abs(float(loss_sum(model64, leaky, chunked=False)) - total) > 1e-3 * abs(total)


def overhead(processor, records) -> float:
    """Tokens of the branched rows over the tokens of the conversations (main rows), minus 1."""
    rows = [render(processor, r)[0] for r in records]
    return sum(len(s["input_ids"]) for s in rows) / sum(main_length(s) for s in rows) - 1


def test_served_exact_overhead(processor):
    """Measured here: tool-use data 14.2 % (the issue's bound is 15 %), its multi-step flows alone
    15.4 % (a third of them parallel: two calls branch); a 10-turn conversation (thinking off:
    every earlier answer branches after the scaffold) 33 %."""
    train, held = tool_use_data()
    flows = [r for r in train + held if len(r["messages"]) > 2]
    figures = {"tool_use": overhead(processor, train + held), "flows": overhead(processor, flows),
               "ten_turns": overhead(processor, [ten_turns()])}
    print(json.dumps(figures))
    assert figures["tool_use"] <= 0.15 and figures["tool_use"] <= figures["flows"] < figures["ten_turns"]


def test_preview_rows_show_each_step(processor):
    """`finetune data preview --jsonl` rows: `steps` = each served prompt and what it writes."""
    from data_tools.preview import sample_view

    record = RECORDS["calls-then-answer"]
    sample, _ = render(processor, record)
    view = sample_view(sample, processor)
    assert view["steps"] == [{"prompt": p, "completion": w}
                             for p, w in zip(served_prompts(processor, record), WRITTEN["calls-then-answer"])]
    assert view["labels"] == WRITTEN["calls-then-answer"] and view["text"].endswith("Snowy.<turn|>\n")


def test_micro_batches_of_branched_samples(processor):
    """Training collates a branched sample with its tree mask (objectives that pack), or keeps its
    main row (objectives that don't, e.g. the drafter's served prompts)."""
    from types import SimpleNamespace

    from data_tools.collate import collate_packed
    from finetune.training.batches import branch_aware

    sample, _ = render(processor, RECORDS["ten-turns"])
    n = len(sample["input_ids"])
    cfg = SimpleNamespace(sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    batch = branch_aware(collate, collate_packed, cfg)([sample], 0)
    assert batch["position_ids"][0].tolist() == sample["position_ids"]
    assert torch.equal(batch["attention_mask"]["full_attention"][0, 0], tree_mask(batch["position_ids"])[0])
    assert batch["attention_mask"]["sliding_attention"].shape == (1, 1, n, n)
    plain = branch_aware(collate, None, cfg)([sample], 0)
    assert plain["input_ids"][0].tolist() == sample["input_ids"][: main_length(sample)]
    assert "position_ids" not in plain
