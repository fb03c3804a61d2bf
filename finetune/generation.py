"""Greedy generation, the way the model is served: one module for every caller.

The prompt is the chat template with the generation prompt (so for Gemma 4 it ends with the
empty thinking scaffold), decoding stops at the end-of-turn token, and the media placeholder
and boundary tokens are suppressed: a model that emitted `<|image|>` would crash its own next
step ("Image features and image tokens do not match"). Several prompts are batched with left
padding, grouped by their media layout (the processor wants one layout per batch).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict

import torch

from data_tools.conversation import Conversation
from data_tools.render import ChatFormat, Renderer, RenderSettings
from finetune.errors import UserError


@functools.lru_cache(maxsize=4)
def renderer(processor, chat: ChatFormat) -> Renderer:
    """One per processor: building it renders probe templates to pick its fast paths."""
    return Renderer(processor, RenderSettings(), chat)


def stop_ids(processor, chat: ChatFormat) -> list[int]:
    tok = processor.tokenizer
    return [tok.convert_tokens_to_ids(chat.turn_end), tok.eos_token_id]


def suppressed_ids(processor, chat: ChatFormat) -> list[list[int]]:
    """Media placeholders/boundaries, and the thinking-channel markers: with thinking off the
    prompt already holds the empty scaffold, so the answer never opens a channel."""
    channel = processor.tokenizer.convert_tokens_to_ids([chat.channel_open, chat.channel_close])
    return [[i] for i in sorted(renderer(processor, chat).media_ids | set(channel))]


def prompt_inputs(processor, chat: ChatFormat, convs: list[Conversation], images: list[list],
                  audios: list[list], image_tokens: int) -> dict:
    """Processor outputs for the served prompts of `convs` (left-padded when several)."""
    r = renderer(processor, chat)
    kwargs = {}
    if any(images):
        kwargs.update(images=images if len(convs) > 1 else images[0],
                      images_kwargs={"max_soft_tokens": image_tokens})
    flat_audio = [a for clips in audios for a in clips]
    if flat_audio:
        kwargs["audio"] = flat_audio
    texts = [r.prompt_text(c) for c in convs]
    if len(convs) == 1:
        return processor(text=texts[0], add_special_tokens=False, return_tensors="pt", **kwargs)
    return processor(text=texts, add_special_tokens=False, return_tensors="pt", padding=True,
                     padding_side="left", **kwargs)


@torch.no_grad()
def greedy(model, processor, chat: ChatFormat, inputs: dict, *, max_new_tokens: int,
           streamer=None) -> list[str]:
    """Greedy answers for processor outputs (one row per prompt, left-padded when several):
    stop at end of turn, suppress media and channel tokens, return the decoded new text."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype  # media enter in the embeddings' dtype
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=stop_ids(processor, chat), pad_token_id=tok.pad_token_id,
                         bad_words_ids=suppressed_ids(processor, chat), streamer=streamer, use_cache=True)
    if was_training:
        model.train()
    n = inputs["input_ids"].shape[1]
    return [tok.decode(row[n:], skip_special_tokens=True).strip() for row in out]


def generate(model, processor, chat: ChatFormat, conv: Conversation, images: list, audios: list, *,
             max_new_tokens: int = 32, image_tokens: int = 280, streamer=None) -> str:
    inputs = prompt_inputs(processor, chat, [conv], [images], [audios], image_tokens)
    return greedy(model, processor, chat, inputs, max_new_tokens=max_new_tokens, streamer=streamer)[0]


def generate_items(model, processor, chat: ChatFormat, items, *, max_new_tokens: int, image_tokens: int,
                   batch_size: int, progress: bool = True) -> list[str]:
    """Answers for items with `.conv`, `.images`, `.audios`, batched by media layout."""
    from tqdm import tqdm

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[(len(it.images), len(it.audios))].append(i)
    outputs = [""] * len(items)
    with tqdm(total=len(items), desc="generate", unit=" item", leave=False, file=sys.stderr,
              disable=not progress) as bar:
        for idx in groups.values():
            for k in range(0, len(idx), batch_size):
                chunk = [items[i] for i in idx[k:k + batch_size]]
                inputs = prompt_inputs(processor, chat, [it.conv for it in chunk], [it.images for it in chunk],
                                       [it.audios for it in chunk], image_tokens)
                answers = greedy(model, processor, chat, inputs, max_new_tokens=max_new_tokens)
                for i, a in zip(idx[k:k + batch_size], answers):
                    outputs[i] = a
                bar.update(len(chunk))
    return outputs


def load_for_inference(adapter: str | None, base: str | None):
    """(model, processor, chat format, image_tokens). With an adapter, the base it was trained on (or
    `base`) in the quantization its run recorded (NF4 when unknown: QLoRA's default);
    without, `base` in full precision (a merged folder or a plain base)."""
    from pathlib import Path

    import yaml

    from finetune.adapters import load_adapter, open_adapter
    from finetune.model import base_family, load_base, load_processor

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
