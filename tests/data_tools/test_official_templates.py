"""The official Gemma 4 chat templates render our samples (tier `templates`: `bash
scripts/setup_llamacpp.sh` first, which unpacks the llama-cpp-python source archive).

llama.cpp keeps Google's templates (`models/templates/google-gemma-4-31B-it.jinja` and
`...-interleaved.jinja`); each goes into a copy of the tiny base, never into this repository.
For every sample: the decoded sequence (media blocks as their one placeholder) equals what the
template renders for the conversation — the served prompt (`add_generation_prompt=True`) then
what the model writes — and the labels are exactly the trained parts. Cases: system + user +
assistant, multi-turn, image and audio parts, thinking traces, single and parallel tool calls,
`train_on` assistant / last_assistant / all, the demo data and the tool-use data. Our own tiny
template renders the same text as the official one on all of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_tools.formats import parse_record
from data_tools.preview import sample_view
from data_tools.render import IGNORE, Renderer, RenderSettings
from data_tools.render_pool import RecordWorker
from data_tools.tools import fold_tool_responses
from finetune.model.families import GEMMA4_UNIFIED
from tests.tool_data import tool_use_data

pytestmark = pytest.mark.templates

REPO = Path(__file__).resolve().parents[2]
CHAT = GEMMA4_UNIFIED.chat
MAIN, INTERLEAVED = "google-gemma-4-31B-it.jinja", "google-gemma-4-31B-it-interleaved.jinja"
THOUGHT = "<|channel>thought\n"
SCAFFOLD = "<|channel>thought\n<channel|>"


def official_template(name: str) -> Path:
    """One of llama.cpp's copies of Google's templates, from the unpacked source archive."""
    root = Path(os.environ.get("LLAMACPP_SRC") or REPO / ".cache" / "llamacpp-src")
    rel = f"models/templates/{name}"
    found = [p for p in (root / rel, root / "vendor/llama.cpp" / rel, *sorted(root.glob(f"*/vendor/llama.cpp/{rel}")))
             if p.is_file()]
    if not found:
        pytest.skip(f"the official template {name} is not under {root} (llama-cpp-python's source archive): "
                    "run scripts/setup_llamacpp.sh or set LLAMACPP_SRC")
    return found[-1]


@pytest.fixture(scope="module", params=[MAIN, INTERLEAVED])
def official(request, tiny_base, tmp_path_factory):
    """(template name, processor of a tiny-base copy that carries the official template)."""
    from finetune.model.load import load_processor

    text = official_template(request.param).read_text()
    base = tmp_path_factory.mktemp("official") / "base"
    shutil.copytree(tiny_base, base)
    (base / "chat_template.jinja").write_text(text)
    processor = load_processor(str(base), 70)
    assert processor.chat_template == text
    return request.param, processor


def test_every_token_the_template_writes_is_one_special_token(official):
    """The markers the official template emits (`<|tool_call>`, `<|"|>`, `<|think|>`, ...) are each
    one token of the tiny tokenizer, as in the real Gemma 4 tokenizer."""
    _, processor = official
    tok = processor.tokenizer
    markers = set(re.findall(r"<\|[\w\"]+\|?>|<\w+\|>", processor.chat_template))
    assert {"<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>",
            "<|tool>", "<tool|>", "<|channel>", "<channel|>", "<|turn>", "<turn|>"} <= markers
    for m in markers:
        assert tok.convert_ids_to_tokens(tok.encode(m, add_special_tokens=False)) == [m], m


# ---------------------------------------------------------------- the cases

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "description": "City name"},
                                                "days": {"type": "integer"}}, "required": ["city"]}}}


def call(city, id_, days=None):
    args = {"city": city} | ({"days": days} if days else {})
    return {"id": id_, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}


def call_text(city, days=None):
    return f'<|tool_call>call:get_weather{{city:<|"|>{city}<|"|>{f",days:{days}" if days else ""}}}<tool_call|>'


USER = {"role": "user", "content": "Weather in Paris?"}
ONE_CALL = {"role": "assistant", "content": None, "tool_calls": [call("Paris", "a")]}
TWO_CALLS = {"role": "assistant", "content": None, "tool_calls": [call("Paris", "a"), call("Rome", "b", 2)]}
SUNNY = {"role": "tool", "tool_call_id": "a", "content": "sunny"}
RAIN = {"role": "tool", "tool_call_id": "b", "content": '{"sky": "rain"}'}
STOP = "<|tool_response>"

# name: (record, data settings, the model-written part of the last answer, labelled spans for
# train_on assistant — per template where they differ —, for last_assistant)
CASES = {
    "system-user-assistant": (
        {"messages": [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                      {"role": "user", "content": "Capital of Norvia?"}, {"role": "assistant", "content": "Halden"}]},
        {}, "Halden<turn|>", ["Halden<turn|>"], ["Halden<turn|>"]),
    "multi-turn": (
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Capital of Norvia?"}, {"role": "assistant", "content": "Halden"},
                      {"role": "user", "content": "And of Quentar?"}, {"role": "assistant", "content": "Mirovo"}]},
        {}, "Mirovo<turn|>", ["Halden<turn|>", "Mirovo<turn|>"], ["Mirovo<turn|>"]),
    "image-and-audio": (
        {"messages": [{"role": "system", "content": "Answer with one word."},
                      {"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                   {"type": "audio", "path": "tone.wav"},
                                                   {"type": "text", "text": "Colour and pitch?"}]},
                      {"role": "assistant", "content": "red, high"}]},
        {}, "red, high<turn|>", ["red, high<turn|>"], ["red, high<turn|>"]),
    "thinking-reasoning_content": (
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "reasoning_content": "Add them.", "content": "4"}]},
        {}, THOUGHT + "Add them.<channel|>4<turn|>", [THOUGHT + "Add them.<channel|>4<turn|>"],
        [THOUGHT + "Add them.<channel|>4<turn|>"]),
    "thinking-in-content-with-history": (
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<|channel>thought\nAdd.<channel|>4"},
                      {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "<|channel>thought\nAdd again.<channel|>6"}]},
        {}, THOUGHT + "Add again.<channel|>6<turn|>",
        [THOUGHT + "Add.<channel|>4<turn|>", THOUGHT + "Add again.<channel|>6<turn|>"],
        [THOUGHT + "Add again.<channel|>6<turn|>"]),
    "thinking-off": (
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "reasoning_content": "Add them.", "content": "4"}]},
        {"thinking": "off"}, "4<turn|>", ["4<turn|>"], ["4<turn|>"]),
    "tool-call-single": (
        {"tools": [WEATHER], "messages": [USER, ONE_CALL, SUNNY, {"role": "assistant", "content": "Sunny."}]},
        {}, "Sunny.<turn|>", [call_text("Paris") + STOP, "Sunny.<turn|>"], ["Sunny.<turn|>"]),
    "tool-call-parallel": (
        {"tools": [WEATHER], "messages": [USER, TWO_CALLS, SUNNY, RAIN, {"role": "assistant", "content": "Mixed."}]},
        {}, "Mixed.<turn|>", [call_text("Paris") + call_text("Rome", 2) + STOP, "Mixed.<turn|>"], ["Mixed.<turn|>"]),
    "tool-call-last": (
        {"tools": [WEATHER], "messages": [{"role": "system", "content": "Use tools."}, USER, TWO_CALLS]},
        {}, call_text("Paris") + call_text("Rome", 2) + STOP, [call_text("Paris") + call_text("Rome", 2) + STOP],
        [call_text("Paris") + call_text("Rome", 2) + STOP]),
    "tool-call-thinking": (
        {"tools": [WEATHER], "messages": [USER, {**ONE_CALL, "reasoning_content": "Look it up."}, SUNNY,
                                          {"role": "assistant", "reasoning_content": "Got it.", "content": "Sunny."}]},
        {}, THOUGHT + "Got it.<channel|>Sunny.<turn|>",
        [THOUGHT + "Look it up.<channel|>" + call_text("Paris") + STOP, THOUGHT + "Got it.<channel|>Sunny.<turn|>"],
        [THOUGHT + "Got it.<channel|>Sunny.<turn|>"]),
}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    Image.new("RGB", (96, 64), (220, 30, 30)).save(folder / "red.png")
    t = np.arange(8000) / 16000
    sf.write(folder / "tone.wav", (0.5 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32), 16000)
    return folder


def render(processor, make_recipe, record, base_dir=".", **data):
    recipe = make_recipe([{"path": "unused.jsonl"}], data={"image_tokens": 70, "max_seq_len": 1024, **data})
    worker = RecordWorker(processor, recipe.data, CHAT)
    conv, images, audios = worker.load(("t.jsonl:1", record, str(base_dir), "messages", "0:t"))
    return worker.renderer.render(conv, images, audios), conv


def served_prompt(processor, name, record, thinking, upto: int = -1) -> str:
    """The template applied as a server applies it: the messages before the answer at `upto` (the
    last by default; text-only content as strings, arguments decoded), the record's tools, the
    generation prompt. The older (interleaved) template gets tool messages folded into the calling
    turn, as llama.cpp does."""
    msgs = []
    for m in record["messages"][:upto]:
        m = dict(m)
        if isinstance(m.get("content"), list) and all(p["type"] == "text" for p in m["content"]):
            m["content"] = "".join(p["text"] for p in m["content"])
        elif isinstance(m.get("content"), list):
            m["content"] = [{"type": p["type"], **({"text": p["text"]} if p["type"] == "text" else {})}
                            for p in m["content"]]
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if not thinking:
            m.pop("reasoning_content", None)
        msgs.append(m)
    if name == INTERLEAVED:
        msgs = fold_tool_responses(msgs)
    kw = {"tools": record["tools"]} if record.get("tools") else {}
    if thinking:
        kw["enable_thinking"] = True
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)


def carries_trace(record) -> bool:
    return any(m.get("reasoning_content") or "<|channel>" in str(m.get("content")) for m in record["messages"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
def test_sample_is_the_template_render_and_labels_the_written_parts(official, make_recipe, media, case, train_on):
    name, processor = official
    record, data, written, spans, last_spans = CASES[case]
    sample, _ = render(processor, make_recipe, record, media, train_on=train_on, **data)
    view = sample_view(sample, processor)
    thinking = data.get("thinking", "auto") == "on" or (data.get("thinking") != "off" and carries_trace(record))
    prompt = served_prompt(processor, name, record, thinking)
    assert view["text"] == prompt + written + ("\n" if written.endswith("<turn|>") else "")
    if thinking:  # served with thinking on: no empty scaffold anywhere, the model opens its channel
        assert SCAFFOLD not in view["text"] and "<|think|>" in prompt
    if train_on == "all":
        media_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in (
            processor.image_token, processor.boi_token, processor.eoi_token, processor.audio_token,
            processor.boa_token, processor.eoa_token)}
        assert sample["labels"] == [IGNORE] + [t if t not in media_ids else IGNORE for t in sample["input_ids"][1:]]
    else:
        want = spans if train_on == "assistant" else last_spans
        assert view["labels"] == (want[name] if isinstance(want, dict) else want)
        # Every step after exactly the prompt a server renders before it.
        steps = [k for k, m in enumerate(record["messages"]) if m["role"] == "assistant"]
        steps = steps if train_on == "assistant" else steps[-1:]
        assert [s["prompt"] for s in view["steps"]] == [served_prompt(processor, name, record, thinking, k)
                                                         for k in steps]
    assert "[{'type'" not in view["text"] and SCAFFOLD + "<|channel>" not in view["text"]


def test_the_templates_differ_where_we_say(official, make_recipe):
    """What the official templates do that ours need not: a list-valued system content is printed
    as its repr; the interleaved template writes `tool` messages as turns of their own (so
    they are folded into the calling turn) and, after tool responses, the empty scaffold."""
    name, processor = official
    listed = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
              {"role": "user", "content": "hi"}]
    assert "<|turn>system\n[{'type': 'text', 'text': 'Answer briefly.'}]<turn|>" in processor.apply_chat_template(
        listed, tokenize=False)
    r = Renderer(processor, RenderSettings(), CHAT)
    assert r.chat_text.reads_tool_messages() == (name == MAIN)
    sample, _ = render(processor, make_recipe, CASES["tool-call-single"][0])
    text = sample_view(sample, processor)["text"]
    assert text.endswith("<tool_response|>" + ("" if name == MAIN else SCAFFOLD) + "Sunny.<turn|>\n")
    assert "<|turn>tool" not in text


def test_our_template_renders_what_the_official_main_one_renders(official, processor):
    """Our tiny template against the official one on every case and both prompt kinds."""
    name, official_processor = official
    if name != MAIN:
        pytest.skip("the interleaved template folds tool messages; ours follows the main template")
    ours = Renderer(processor, RenderSettings(), CHAT).chat_text
    theirs = Renderer(official_processor, RenderSettings(), CHAT).chat_text
    for case, (record, *_) in CASES.items():
        conv = parse_record(record, "messages", case, ".")
        for thinking in (False, True):
            msgs = ours.messages(conv, thinking)
            for k in range(1, len(msgs) + 1):
                for gen in (False, True):
                    got = ours.render(msgs[:k], gen, conv.tools, thinking, case)
                    assert got == theirs.render(msgs[:k], gen, conv.tools, thinking, case), (case, k, gen)


def test_demo_and_tool_use_data_render_through_the_official_template(official, demo_data, make_recipe, tmp_path):
    """Every record of the demo data and of the tool-use data, through the pipeline."""
    from data_tools.render_pool import collect

    name, processor = official
    train, held = tool_use_data()
    tools = tmp_path / "tools.jsonl"
    tools.write_text("".join(json.dumps(r) + "\n" for r in train + held))
    files = sorted(demo_data.glob("*.jsonl")) + [tools]
    recipe = make_recipe([{"path": str(f)} for f in files], data={"image_tokens": 70, "max_seq_len": 512})
    samples, _, total, _ = collect(recipe.datasets, processor, recipe.data, CHAT, rejects_path=None, progress=False)
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert total.rejected == 0 and len(samples) == len(records) == total.records
    for sample, record in zip(samples, records):
        view = sample_view(sample, processor)
        last = record["messages"][-1]
        if last.get("tool_calls"):
            fn = last["tool_calls"][0]["function"]
            written = f'<|tool_call>call:{fn["name"]}{{city:<|"|>{json.loads(fn["arguments"])["city"]}<|"|>}}<tool_call|>' + STOP
        else:
            written = last["content"] + "<turn|>"
        prompt = served_prompt(processor, name, record, False)
        assert view["text"] == prompt + written + ("\n" if written.endswith("<turn|>") else "")
        assert view["labels"][-1] == written and "[{'type'" not in view["text"]
