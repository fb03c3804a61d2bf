"""The real Gemma 4 tokenizer and all three of Google's templates (tier `realtok`: `bash
scripts/setup_llamacpp.sh --source-only` first, which unpacks llama-cpp-python's source archive).

llama.cpp ships the Gemma 4 vocabulary as `models/ggml-vocab-gemma-4.gguf` (262,144 tokens, the
chat template embedded) with its own test vectors. Converted by transformers' converter
(finetune.demo.tokenizer) it must reproduce those vectors; a tiny base built on it
(`finetune tiny-model DIR --tokenizer GGUF`) then renders with each template variant — the two in
llama.cpp's `models/templates/` and the one in the GGUF — and for every labelled step the prompt
ids followed by the label ids are exactly the tokenization of the served prompt + completion
text, the served prompt is what the template renders before that step, no scaffold is doubled
or missing, and every thought block is labelled one way. The tool-use data renders through it
and a short train + eval runs on it. Nothing converted is committed (it lives in tmp folders).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import tests.data_tools.test_official_templates as official_cases
import tests.data_tools.test_steps as step_cases
from data_tools.formats import parse_record
from data_tools.render import Renderer, RenderSettings
from data_tools.steps import step_ids
from data_tools.tools import fold_tool_responses
from finetune.model.families import GEMMA4_UNIFIED
from tests.tool_data import tool_use_data

pytestmark = pytest.mark.realtok

REPO = Path(__file__).resolve().parents[2]
CHAT = GEMMA4_UNIFIED.chat
THOUGHT = "<|channel>thought\n"
SCAFFOLD = THOUGHT + "<channel|>"
VARIANTS = ["google-gemma-4-31B-it.jinja", "google-gemma-4-31B-it-interleaved.jinja", "gguf"]
# Ids of the bundled 12B config (finetune/configs) that the converted tokenizer must give.
SPECIAL_IDS = {"<|turn>": 105, "<turn|>": 106, "<|think|>": 98, "<|channel>": 100, "<channel|>": 101,
               "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49, "<|tool_response>": 50,
               "<tool_response|>": 51, '<|"|>': 52, "<|image>": 255999, "<|audio>": 256000,
               "<|image|>": 258880, "<|audio|>": 258881, "<image|>": 258882, "<audio|>": 258883,
               "<|video|>": 258884, "<bos>": 2, "<eos>": 1, "<pad>": 0}


def source(rel: str) -> Path:
    """A file of llama.cpp's tree in the unpacked llama-cpp-python source archive."""
    root = Path(os.environ.get("LLAMACPP_SRC") or REPO / ".cache" / "llamacpp-src")
    found = [p for p in (root / rel, root / "vendor/llama.cpp" / rel, *sorted(root.glob(f"*/vendor/llama.cpp/{rel}")))
             if p.is_file()]
    if not found:
        pytest.skip(f"{rel} is not under {root}: run scripts/setup_llamacpp.sh --source-only or set LLAMACPP_SRC")
    return found[-1]


@pytest.fixture(scope="module")
def vocab() -> Path:
    return source("models/ggml-vocab-gemma-4.gguf")


@pytest.fixture(scope="module")
def real_tokenizer(vocab):
    from finetune.demo.tokenizer import load_gemma4_tokenizer

    return load_gemma4_tokenizer(vocab)


def test_converted_tokenizer_reproduces_llama_cpp_vectors(vocab, real_tokenizer):
    inputs = Path(f"{vocab}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = Path(f"{vocab}.out").read_text(encoding="utf-8").splitlines()
    inputs[-1] = inputs[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    assert len(inputs) == len(outputs) == 46
    for text, ids in zip(inputs, outputs):
        assert real_tokenizer.encode(text, add_special_tokens=False) == [int(x) for x in ids.split()], text
    assert len(real_tokenizer) == 262144
    assert {t: real_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_IDS} == SPECIAL_IDS


@pytest.fixture(scope="module")
def real_base(vocab, tmp_path_factory) -> Path:
    """`finetune tiny-model DIR --tokenizer GGUF`, as a user builds it."""
    from finetune.cli.main import main

    out = tmp_path_factory.mktemp("realtok") / "base"
    assert main(["tiny-model", str(out), "--tokenizer", str(vocab)]) == 0
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, real_base, vocab, tmp_path_factory):
    """(variant, processor of a copy of the real-tokenizer base that carries that template)."""
    from finetune.model.load import load_processor

    base = tmp_path_factory.mktemp("variant") / "base"
    shutil.copytree(real_base, base, ignore=shutil.ignore_patterns("*.safetensors", "drafter"))
    if request.param != "gguf":
        (base / "chat_template.jinja").write_text(source(f"models/templates/{request.param}").read_text())
    processor = load_processor(str(base), 70)
    assert len(processor.tokenizer) == 262144
    return request.param, processor


def served(processor, record: dict, upto: int, thinking: bool, folds: bool) -> str:
    """What a server renders before the answer at `upto` (llama.cpp folds `tool` messages into
    the calling turn for templates that do not read them)."""
    msgs = []
    for m in record["messages"][:upto]:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": c["function"]["arguments"]
                                                  if isinstance(c["function"]["arguments"], dict)
                                                  else json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if not thinking:
            m.pop("reasoning_content", None)
        msgs.append(m)
    if folds:
        msgs = fold_tool_responses(msgs)
    kw = {"tools": record["tools"]} if record.get("tools") else {}
    return processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=thinking, **kw)


def records() -> dict[str, dict]:
    text_only = {k: r for k, (r, data, *_) in official_cases.CASES.items()
                 if not data and "image" not in k and not isinstance(r["messages"][0]["content"], list)}
    train, held = tool_use_data()
    return {**step_cases.RECORDS, **text_only, "tool-use-flow": held[0], "tool-use-call": train[0]}


def test_every_step_is_served_exactly_with_the_real_tokenizer(variant):
    name, processor = variant
    tok = processor.tokenizer
    r = Renderer(processor, RenderSettings(max_seq_len=4096), CHAT)
    folds = not r.chat_text.reads_tool_messages()
    assert folds == (name != VARIANTS[0])  # the interleaved and the GGUF's read `tool_responses`
    for case, record in records().items():
        conv = parse_record(json.loads(json.dumps(record)), "messages", case, ".")
        thinking = r.chat_text.thinking_for(conv)
        sample = r.render(conv, [], [])
        steps = step_ids(sample)
        answers = [k for k, m in enumerate(record["messages"]) if m["role"] == "assistant"]
        assert len(steps) == len(answers), case
        for (prompt, done), k in zip(steps, answers):
            text, written = tok.decode(prompt), tok.decode(done)
            assert text == served(processor, record, k, thinking, folds), (case, k)
            assert prompt + done == r.encode(text + written), (case, k)  # no merge across the boundary
            # The empty scaffold: never doubled, never written by the model, never missing before
            # a step that opens a model turn with thinking off, never there with thinking on.
            full = text + written
            assert SCAFFOLD + SCAFFOLD not in full and SCAFFOLD + THOUGHT not in full
            assert SCAFFOLD not in written and written.count(THOUGHT) <= 1
            assert not text.endswith("<|turn>model\n" if not thinking else SCAFFOLD), (case, k)
            assert written.endswith(("<turn|>", "<|tool_response>"))
            if THOUGHT in written:  # one way: the trace, then at once the channel's end
                assert re.fullmatch(r"<\|channel>thought\n[^\n](?:.*[^\n])?<channel\|>.*", written, re.S), written


def test_tool_use_data_renders_and_trains_with_the_real_tokenizer(real_base, tmp_path):
    """The tool-use data through the pipeline, then a short train and eval on the real vocabulary."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.eval.evaluate import evaluate_adapter
    from finetune.training.loop import train

    train_records, held = tool_use_data()
    data, held_file = tmp_path / "tools.jsonl", tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train_records))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held[:4]))
    recipe = recipe_from_dict({
        "model": {"base": str(real_base), "quantization": "none"},
        "datasets": [{"path": str(data)}], "eval_datasets": [{"path": str(held_file)}],
        "data": {"max_seq_len": 512, "cache_dir": str(tmp_path / "cache")},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "batch_size": 4,
                  "gradient_checkpointing": False},
        "eval": {"max_new_tokens": 8}})
    train(recipe)
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())["total"]
    assert stats["rejected"] == 0 and stats["used"] == len(train_records)
    result, items = evaluate_adapter(recipe, tmp_path / "out" / "adapter")
    assert len(items) == 4 and result["summary"]
