"""The 12B for the GPU run, without a download: random weights built straight into NF4, and
samples shaped like the mixed recipe's (an image of 280 tokens, 10 s of audio, text).

Weights don't change memory or speed, so random ones measure what the real checkpoint would.
Built module by module on the device: host memory stays small. (The user's path, from_pretrained
of a sharded bf16 checkpoint quantized on load, is measured separately: benchmarks/gpu_load.py.)
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from data_tools.render import IGNORE
from finetune.plan.estimate import AUDIO_TOKENS_PER_S
from finetune.plan.skeleton import model_class, not_quantized

IMAGE_TOKENS = 280
AUDIO_SECONDS = 10.0
DRY_MEDIA = {"image_tokens": 70, "audio_s": 1.0}  # the CPU dry run's tiny rows: a 14 × 5 image, 1 s


# ---------------------------------------------------------------- the model


def build_quantized(config, device: str, dtype: torch.dtype, double_quant: bool = True, seed: int = 0):
    """The model with random weights, NF4 linears, built module by module on `device`.

    Same choices as `finetune.model.load_base`: bitsandbytes NF4 for every Linear except the
    tied lm_head (the rule `finetune plan` counts with), everything else in `dtype`."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        model = model_class(config, None)(config)
    skip, should_convert = not_quantized(model)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and should_convert(name, skip):
            model.set_submodule(name, bnb.nn.Linear4bit(
                mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
                compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8, device="meta"))
    gen = torch.Generator(device=device).manual_seed(seed)
    for _, mod in list(model.named_modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if isinstance(mod, bnb.nn.Linear4bit) and pname == "weight":
                # one bf16 weight at a time, quantized on the device, then freed
                w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
                mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant, quant_storage=torch.uint8,
                                               module=mod).to(device)
                del w
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if pname == "bias":
                t.zero_()
            elif isinstance(mod, nn.LayerNorm) or "RMSNorm" in type(mod).__name__:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=gen)
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, device)
    model.is_loaded_in_4bit = True  # PEFT dispatches its bnb LoRA layer on this flag
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def _materialize_buffers(model, device: str) -> None:
    """Buffers computed in __init__ (RoPE frequencies, scales) were made on meta: redo them."""
    for name, mod in list(model.named_modules()):
        metas = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta]
        if not metas:
            continue
        if type(mod).__name__.endswith("RotaryEmbedding"):
            model.set_submodule(name, type(mod)(config=mod.config, device=device))
        elif metas == ["embed_scale"]:
            mod.embed_scale = torch.tensor(mod.scalar_embed_scale, device=device)
        elif metas == ["layer_scalar"]:
            mod.layer_scalar = torch.ones(1, device=device)
        else:
            raise RuntimeError(f"don't know how to build buffers {metas} of {name} ({type(mod).__name__})")
    left = [n for n, t in [*model.named_buffers(), *model.named_parameters()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta: {left[:5]}")


# ---------------------------------------------------------------- samples


def make_sample(config, rng: random.Random, *, text: int, answer: int, image_tokens: int, audio_s: float) -> dict:
    """One rendered sample as `data_tools` holds it: prompt text, [image], [audio], answer."""
    vocab_hi = min(getattr(config, a) for a in ("image_token_id", "boi_token_id", "audio_token_id"))
    ids, types, media = [], [], {}
    words = lambda n: [rng.randrange(3, vocab_hi) for _ in range(n)]  # noqa: E731
    ids += words(text)
    if image_tokens:
        ids += [config.boi_token_id] + [config.image_token_id] * image_tokens + [config.eoi_token_id]
        v = config.vision_config
        patch_dim = (v.patch_size * v.pooling_kernel_size) ** 2 * 3
        side = 14  # a 14 × 20 grid of 48-px patches = 280 soft tokens
        pos = np.stack(np.meshgrid(np.arange(side), np.arange(image_tokens // side), indexing="xy"), -1)
        media["pixel_values"] = [np.random.default_rng(rng.randrange(1 << 30)).integers(
            0, 256, (image_tokens, patch_dim), dtype=np.uint8)]
        media["image_position_ids"] = [pos.reshape(-1, 2).astype(np.int32)]
    if audio_s:
        frames = int(audio_s * AUDIO_TOKENS_PER_S)
        ids += [config.boa_token_id] + [config.audio_token_id] * frames + [config.eoa_token_index]
        media["input_features"] = [np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
            (frames, config.audio_config.audio_embed_dim), dtype=np.float32) * 0.1]
    prompt = len(ids)
    ids += words(answer)
    types = [1 if i == config.image_token_id else 3 if i == config.audio_token_id else 0 for i in ids]
    labels = [IGNORE] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, **media}


def full_row(config, seq_len: int, seed: int = 0, image_tokens: int = IMAGE_TOKENS,
             audio_s: float = AUDIO_SECONDS) -> dict:
    """`seq_len` tokens: an image, 10 s of audio, text, and an answer of a quarter (≤ 1024)."""
    media = image_tokens + 2 + int(audio_s * AUDIO_TOKENS_PER_S) + 2
    answer = min(1024, seq_len // 4)
    assert seq_len - media - answer > 0, "the row is shorter than its media"
    return make_sample(config, random.Random(seed), text=seq_len - media - answer, answer=answer,
                       image_tokens=image_tokens, audio_s=audio_s)


def mixed_samples(config, n: int, max_len: int, seed: int = 0, image_tokens: int = IMAGE_TOKENS,
                  audio_s: float = AUDIO_SECONDS) -> list[dict]:
    """The mixed recipe's kinds in its weights (0.4 image QA, 0.3 audio, 0.3 text chat), at
    lengths such data has; `max_len` scales the text (4096: ~720 tokens a sample on average)."""
    rng, out, k = random.Random(seed), [], max_len / 4096
    a = audio_s / AUDIO_SECONDS
    for _ in range(n):
        kind = rng.choices(["image", "audio", "text"], [0.4, 0.3, 0.3])[0]
        if kind == "image":
            s = make_sample(config, rng, text=int(rng.randint(20, 80) * k) + 1, answer=int(rng.randint(10, 60) * k) + 1,
                            image_tokens=image_tokens, audio_s=0)
        elif kind == "audio":
            s = make_sample(config, rng, text=int(20 * k) + 1, answer=int(rng.randint(20, 150) * k) + 1,
                            image_tokens=0, audio_s=rng.uniform(3, 30) * a)
        else:
            s = text_samples(config, 1, max_len, rng.randrange(1 << 30))[0]
        out.append(s)
    return out


def text_samples(config, n: int, max_len: int, seed: int = 0) -> list[dict]:
    """`n` text chats of the mixed recipe's lengths (for peers that carry no media)."""
    rng, k = random.Random(seed), max_len / 4096
    return [make_sample(config, rng, text=int(rng.randint(100, 1700) * k) + 1,
                        answer=int(rng.randint(100, 800) * k) + 1, image_tokens=0, audio_s=0) for _ in range(n)]


def preference_pair(config, seq_len: int, seed: int = 0, **media) -> dict:
    """A DPO pair as `data_tools.preference` renders it: one full row whose answer is the chosen
    side, `rejected_ids` the other answer (same length: both rows fill `seq_len`)."""
    s = full_row(config, seq_len, seed, **media)
    rng = random.Random(seed + 1)
    answer = sum(1 for x in s["labels"] if x != IGNORE)
    vocab_hi = min(getattr(config, a) for a in ("image_token_id", "boi_token_id", "audio_token_id"))
    return {**s, "rejected_ids": [rng.randrange(3, vocab_hi) for _ in range(answer)]}


def concat_samples(samples: list[dict], pad_id: int, seq_len: int) -> dict:
    """Samples joined into one row and padded to `seq_len`, as a user packs for a trainer that has
    no packed masks (one causal mask over the row: samples see each other)."""
    row: dict = {"input_ids": [], "labels": [], "mm_token_type_ids": []}
    for s in samples:
        for k in ("input_ids", "labels", "mm_token_type_ids"):
            row[k] += list(s[k])
        for k in ("pixel_values", "image_position_ids", "input_features"):
            if k in s:
                row.setdefault(k, []).extend(s[k])
    fill = seq_len - len(row["input_ids"])
    row["input_ids"] += [pad_id] * fill
    row["labels"] += [IGNORE] * fill
    row["mm_token_type_ids"] += [0] * fill
    return row
