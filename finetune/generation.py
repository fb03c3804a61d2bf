"""Greedy generation from conversations, the way the model is served.

The prompt is the chat template with the generation prompt (so for Gemma 4 it ends with the
empty thinking scaffold), decoding stops at the end-of-turn token, and the media placeholder
and boundary tokens are suppressed: a model that emitted `<|image|>` would crash its own next
step ("Image features and image tokens do not match").
"""

from __future__ import annotations

import functools

import torch

from data_tools.conversation import Conversation
from data_tools.render import Renderer, RenderSettings
from finetune.families import FAMILIES


@functools.lru_cache(maxsize=4)
def _renderer(processor) -> Renderer:
    # One per processor: building it renders probe templates to pick its fast paths.
    chat = next(f.chat for f in FAMILIES.values() if f.processor_class == type(processor).__name__)
    return Renderer(processor, RenderSettings(), chat)


def prompt_inputs(processor, conv: Conversation, images: list, audios: list, image_tokens: int) -> dict:
    r = _renderer(processor)
    text = r.prompt_text(conv)
    kwargs = {}
    if images:
        kwargs["images"] = images
        kwargs["images_kwargs"] = {"max_soft_tokens": image_tokens}
    if audios:
        kwargs["audio"] = audios
    return processor(text=text, add_special_tokens=False, return_tensors="pt", **kwargs)


def suppressed_ids(processor) -> list[list[int]]:
    """Media placeholders/boundaries, and the thinking-channel markers: with thinking off the
    prompt already holds the empty scaffold, so the answer never opens a channel."""
    r = _renderer(processor)
    channel = processor.tokenizer.convert_tokens_to_ids(["<|channel>", "<channel|>"])
    return [[i] for i in sorted(r.media_ids | set(channel))]


@torch.no_grad()
def greedy(model, processor, inputs: dict, *, max_new_tokens: int, streamer=None) -> list[str]:
    """Greedy answers for processor outputs (one row per prompt, left-padded when several):
    stop at end of turn, suppress media and channel tokens, return the decoded new text."""
    device, dtype = next(model.parameters()).device, _float_dtype(model)
    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=[_renderer(processor).eot_id, tok.eos_token_id],
                         pad_token_id=tok.pad_token_id, bad_words_ids=suppressed_ids(processor),
                         streamer=streamer, use_cache=True)
    if was_training:
        model.train()
    n = inputs["input_ids"].shape[1]
    return [tok.decode(row[n:], skip_special_tokens=True).strip() for row in out]


def generate(model, processor, conv: Conversation, images: list, audios: list, *,
             max_new_tokens: int = 32, image_tokens: int = 280, streamer=None) -> str:
    inputs = prompt_inputs(processor, conv, images, audios, image_tokens)
    return greedy(model, processor, inputs, max_new_tokens=max_new_tokens, streamer=streamer)[0]


def _float_dtype(model) -> torch.dtype:
    """Media enter in the dtype the embeddings compute in (bnb can't cast them itself)."""
    from finetune.train import unwrap

    return unwrap(model).model.language_model.embed_tokens.weight.dtype


def preview_items(model, processor, recipe) -> list[dict]:
    """The first few held-out items, answered by the model as it is now."""
    from finetune.evaluate import eval_items

    items, _ = eval_items(recipe, processor, limit=recipe.train.preview_items, log=lambda *_: None)
    return [{"id": it.id, "modality": it.conv.modality(), "reference": it.reference,
             "output": generate(model, processor, it.conv, it.images, it.audios,
                                max_new_tokens=recipe.eval.max_new_tokens,
                                image_tokens=recipe.data.image_tokens)} for it in items]
