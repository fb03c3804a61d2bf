"""Greedy generation, the way the model is served: one module for every caller.

The prompt is the chat template with the generation prompt (for Gemma 4 with thinking off it
ends with the empty thinking scaffold; with thinking on the model writes its own thought
channel, and the answer is what follows it), decoding stops at the end-of-turn token and at
the token that ends a turn of tool calls, and the media placeholder and boundary tokens are
suppressed: a model that emitted `<|image|>` would crash its own next step ("Image features and
image tokens do not match"). Several prompts are batched with left padding, grouped by their
media layout (the processor wants one layout per batch). `read_calls` reads the tool calls
out of a raw answer.
"""

from __future__ import annotations

import functools
import re
import sys
from collections import defaultdict

import torch

from data_tools.chat_text import split_thought
from data_tools.conversation import Conversation
from data_tools.render import ChatFormat, Renderer, RenderSettings
from finetune.errors import UserError
from finetune.model.load import held_out_mode


@functools.lru_cache(maxsize=4)
def in_step(model) -> dict:
    """`generate` keywords for a model sharded by FSDP2 (its layers all-gather at every forward,
    a collective): `synced_gpus`, so every rank runs forwards until all ranks' rows are done."""
    return {"synced_gpus": True} if any(hasattr(m, "unshard") for m in model.modules()) else {}


def renderer(processor, chat: ChatFormat) -> Renderer:
    """One per processor: building it renders probe templates to pick its fast paths."""
    return Renderer(processor, RenderSettings(), chat)


def stop_ids(processor, chat: ChatFormat) -> list[int]:
    """End of turn, <eos>, and the end of a turn of tool calls (when the tokenizer has it)."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(chat.turn_end), tok.eos_token_id]
    if chat.call_stop and tok.convert_tokens_to_ids(chat.call_stop) != tok.unk_token_id:
        ids.append(tok.convert_tokens_to_ids(chat.call_stop))
    return ids


def suppressed_ids(processor, chat: ChatFormat, thinking: bool = False) -> list[list[int]]:
    """Media placeholders/boundaries, and with thinking off the thinking-channel markers: the
    prompt then already holds the empty scaffold, so the answer never opens a channel."""
    channel = processor.tokenizer.convert_tokens_to_ids([chat.channel_open, chat.channel_close])
    return [[i] for i in sorted(renderer(processor, chat).media_ids | (set() if thinking else set(channel)))]


def wants_thinking(mode: str | bool, conv: Conversation, chat: ChatFormat) -> bool:
    """`data.thinking` for one prompt: on, off, or auto (on when its reference carries a trace)."""
    if isinstance(mode, bool):
        return mode
    if mode != "auto":
        return mode == "on"
    return any(m.role == "assistant" and (m.thinking or split_thought(m.text(), chat)[0])
               for m in conv.messages)


def prompt_inputs(processor, chat: ChatFormat, convs: list[Conversation], images: list[list],
                  audios: list[list], image_tokens: int, thinking: bool = False) -> dict:
    """Processor outputs for the served prompts of `convs` (left-padded when several)."""
    r = renderer(processor, chat)
    kwargs = {}
    if any(images):
        kwargs.update(images=images if len(convs) > 1 else images[0],
                      images_kwargs={"max_soft_tokens": image_tokens})
    flat_audio = [a for clips in audios for a in clips]
    if flat_audio:
        kwargs["audio"] = flat_audio
    texts = [r.prompt_text(c, thinking) for c in convs]
    if len(convs) == 1:
        return processor(text=texts[0], add_special_tokens=False, return_tensors="pt", **kwargs)
    return processor(text=texts, add_special_tokens=False, return_tensors="pt", padding=True,
                     padding_side="left", **kwargs)


def greedy(model, processor, chat: ChatFormat, inputs: dict, *, max_new_tokens: int,
           streamer=None, thinking: bool = False, raw: bool = False) -> list[str]:
    """Greedy answers for processor outputs (one row per prompt, left-padded when several):
    stop at end of turn, suppress media (and with thinking off channel) tokens, return the
    decoded new text: the answer after the thought channel, or with `raw` everything written,
    special tokens included (tool calls, the thought, the stop token)."""
    pairs = greedy_both(model, processor, chat, inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                        thinking=thinking)
    return [r if raw else a for a, r in pairs]


@torch.no_grad()
def greedy_both(model, processor, chat: ChatFormat, inputs: dict, *, max_new_tokens: int,
                streamer=None, thinking: bool = False) -> list[tuple[str, str]]:
    """(answer, raw) per row of `greedy`: both decodings of one generation."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype  # media enter in the embeddings' dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    tok = processor.tokenizer
    with held_out_mode(model):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids(processor, chat), pad_token_id=tok.pad_token_id,
                             bad_words_ids=suppressed_ids(processor, chat, thinking), streamer=streamer,
                             use_cache=True)
    n = inputs["input_ids"].shape[1]
    close = tok.convert_tokens_to_ids(chat.channel_close)
    answers = []
    for row in out[:, n:].tolist():
        row = [t for t in row if t != tok.pad_token_id]
        raw = tok.decode(row, skip_special_tokens=False)
        if thinking and close in row:  # the answer is what follows the thought channel
            row = row[len(row) - row[::-1].index(close):]
        answers.append((tok.decode(row, skip_special_tokens=True).strip(), raw))
    return answers


def generate(model, processor, chat: ChatFormat, conv: Conversation, images: list, audios: list, *,
             max_new_tokens: int = 32, image_tokens: int = 280, streamer=None, thinking: bool = False,
             raw: bool = False) -> str:
    inputs = prompt_inputs(processor, chat, [conv], [images], [audios], image_tokens, thinking)
    return greedy(model, processor, chat, inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                  thinking=thinking, raw=raw)[0]


def generate_items(model, processor, chat: ChatFormat, items, *, max_new_tokens: int, image_tokens: int,
                   batch_size: int, progress: bool = True, thinking: str | bool = False,
                   raw: list | None = None) -> list[str]:
    """Answers for items with `.conv`, `.images`, `.audios`, batched by media layout.
    `thinking`: a bool, or `data.thinking` (auto | on | off) decided per item. `raw`: a list that
    receives each item's raw text too (special tokens kept: what GRPO's format rewards read)."""
    from tqdm import tqdm

    groups: dict[tuple[int, int, bool], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[(len(it.images), len(it.audios), wants_thinking(thinking, it.conv, chat))].append(i)
    outputs, raws = [""] * len(items), [""] * len(items)
    with tqdm(total=len(items), desc="generate", unit=" item", leave=False, file=sys.stderr,
              disable=not progress) as bar:
        for (_, _, think), idx in groups.items():
            for k in range(0, len(idx), batch_size):
                chunk = [items[i] for i in idx[k:k + batch_size]]
                inputs = prompt_inputs(processor, chat, [it.conv for it in chunk], [it.images for it in chunk],
                                       [it.audios for it in chunk], image_tokens, think)
                answers = greedy_both(model, processor, chat, inputs, max_new_tokens=max_new_tokens,
                                      thinking=think)
                for i, (a, r) in zip(idx[k:k + batch_size], answers):
                    outputs[i], raws[i] = a, r
                bar.update(len(chunk))
    if raw is not None:
        raw.extend(raws)
    return outputs


def load_for_inference(adapter: str | None, base: str | None):
    """(model, processor, chat format, image_tokens). With an adapter, the base it was trained on (or
    `base`) in the quantization its run recorded (NF4 when unknown: QLoRA's default);
    without, `base` in full precision (a merged folder or a plain base)."""
    from pathlib import Path

    import yaml

    from finetune.model.adapters import load_adapter, open_adapter
    from finetune.model.load import base_family, load_base, load_processor

    if not adapter and not base:
        raise UserError("generate", "no model given",
                        "Pass --adapter DIR, or --base DIR for a merged or base model")
    quant, image_tokens = "none", None
    if adapter:
        base = open_adapter(adapter, base=base)[2]  # proven to fit before anything big loads
        quant = "nf4"
        lock = Path(adapter).parent / "recipe.lock.yaml"  # written by `finetune train` next to adapter/
        if lock.exists():
            run = yaml.safe_load(lock.read_text()) or {}
            quant = run.get("model", {}).get("quantization", quant)
            image_tokens = run.get("data", {}).get("image_tokens")
    processor = load_processor(base, image_tokens)
    model = load_base(base, quantization=quant)
    if adapter:
        model = load_adapter(model, adapter)
    model.eval()
    chat = base_family(base).chat
    return model, processor, chat, image_tokens or processor.image_processor.max_soft_tokens


# ---------------------------------------------------------------- tool calls in an answer

_CALL = re.compile(r"call:([\w.\-]+)\{")


def read_calls(raw: str, chat: ChatFormat) -> list[dict] | None:
    """`[{"name", "arguments"}]` for each complete call in a raw answer (`greedy(raw=True)`), in
    Gemma 4's call syntax: `<|tool_call>call:NAME{key:value,...}<tool_call|>`, strings between
    `<|"|>`, nested `{...}` and `[...]`. None when a call can't be read (the model wrote a
    malformed one); [] when there is none."""
    calls = []
    for chunk in raw.split(chat.call_open)[1:]:
        body, closed, _ = chunk.partition(chat.call_close)
        m = _CALL.match(body)
        if not closed or not m or not body.endswith("}"):
            return None
        try:
            args, end = _value(body, m.end() - 1, chat.quote)
        except (ValueError, IndexError):
            return None
        if end != len(body) or not isinstance(args, dict):
            return None
        calls.append({"name": m.group(1), "arguments": args})
    return calls


def _value(s: str, i: int, quote: str):
    """(value, index after it) for the value starting at s[i] in the call syntax."""
    if s.startswith(quote, i):
        j = s.index(quote, i + len(quote))
        return s[i + len(quote): j], j + len(quote)
    if s[i] in "{[":
        close, out, i = ("}", {}, i + 1) if s[i] == "{" else ("]", [], i + 1)
        while s[i] != close:
            if isinstance(out, dict):
                key, _, _ = s[i:].partition(":")
                value, i = _value(s, i + len(key) + 1, quote)
                out[key] = value
            else:
                value, i = _value(s, i, quote)
                out.append(value)
            if s[i] == ",":
                i += 1
        return out, i + 1
    m = re.compile(r"[^,}\]]*").match(s, i)
    word = m.group(0)
    literal = {"true": True, "false": False, "null": None, "None": None}
    if word in literal:
        return literal[word], m.end()
    return (float(word) if any(c in word for c in ".eE") else int(word)), m.end()
