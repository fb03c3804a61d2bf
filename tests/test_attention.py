"""finetune.training.attention: attention without repeated k/v (`train.attention`) gives the stock
sdpa path's loss and gradients, in float64, on the tiny gemma4_unified's sliding and full layers
(k_eq_v, 1 global k/v head), an image's bidirectional span, padding and packed 4-D masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from data_tools.collate import collate, collate_packed
from data_tools.render import IGNORE

# float64: the paths differ only in summation order (blocks, folded heads), ~1e-16 relative
TOL = 1e-10


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_base, demo_data):
    """Rendered demo samples by modality (image, audio, text, mixed)."""
    from data_tools.pipeline import prepare
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import load_processor
    from finetune.config.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("attention")
    recipe = recipe_from_dict({
        "model": {"base": str(tiny_base), "quantization": "none"},
        "datasets": [{"path": str(p), "format": "messages"} for p in sorted(demo_data.glob("train_*.jsonl"))],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(root / "cache")},
        "train": {"output_dir": str(root / "out")}})
    data = prepare(recipe, load_processor(str(tiny_base), 70), str(tiny_base), rejects_path=root / "rejects.jsonl",
                   chat=GEMMA4_UNIFIED.chat, log=None)
    out: dict[str, list] = {}
    for i in range(len(data.train)):
        out.setdefault(data.train[i]["modality"], []).append(data.train[i])
    return out


@pytest.fixture(scope="module")
def model(tiny_base):
    from finetune.model.load import load_base

    m = load_base(str(tiny_base), quantization="none", device="cpu").double().train()
    return m.requires_grad_(True)


def f64(batch: dict) -> dict:
    from finetune.training.wrappers import to_device

    return to_device(batch, "cpu", torch.float64)


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


class SdpaCalls(TorchFunctionMode):
    """Records (query heads, key heads, query rows, key columns) of every sdpa call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.calls.append((q.shape[1], k.shape[1], q.shape[2], k.shape[2]))
        return func(*args, **(kwargs or {}))


def batches(model, samples) -> dict[str, dict]:
    cfg = model.config.get_text_config()
    picked = [samples[m][0] for m in ("image", "audio", "text", "mixed")]
    padded = f64(collate(picked, pad_id=0))
    rows = [[samples["image"][0], samples["audio"][0], samples["mixed"][0]], [samples["text"][0], samples["image"][1]]]
    packed = f64(collate_packed(rows, 0, cfg.sliding_window, cfg.layer_types))
    assert padded["input_ids"].shape[1] > cfg.sliding_window and packed["input_ids"].shape[1] > 2 * cfg.sliding_window
    assert (padded["mm_token_type_ids"] == 1).any()  # an image: a bidirectional span on the full layers
    return {"padded": padded, "packed": packed}


@pytest.mark.parametrize("kind", ["padded", "packed"])
@pytest.mark.parametrize("name", ["blocked", "sdpa_gqa"])
def test_attention_without_repeated_kv_equals_stock(model, samples, kind, name):
    from finetune.model.attention import set_attention

    batch = batches(model, samples)[kind]
    S = batch["input_ids"].shape[1]
    text = model.config.get_text_config()
    if kind == "packed":  # the blocks' own recompute nested in the layers' (the training setting)
        from finetune.model.load import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    set_attention(model, "sdpa")
    loss, grads = loss_and_grads(model, batch)
    rows = 24  # 6 queries a block on the full layers (4 heads on 1 k/v head), 12 on the sliding (4 on 2)
    before = set_attention(model, name, rows)
    try:
        with SdpaCalls() as seen:
            loss_n, grads_n = loss_and_grads(model, batch)
    finally:
        set_attention(model, before)
        model.gradient_checkpointing_disable()
    assert before == "sdpa" and model.config.vision_config._attn_implementation == "sdpa"
    print(f"{name} {kind}: loss {abs(loss - loss_n) / abs(loss):.1e}, grads "
          f"{max(float((grads[k] - grads_n[k]).abs().max()) for k in grads) / max(float(g.abs().max()) for g in grads.values()):.1e}")
    assert abs(loss - loss_n) <= TOL * abs(loss)
    assert grads.keys() == grads_n.keys() and len(grads) > 40
    scale = max(float(g.abs().max()) for g in grads.values())
    assert max(float((grads[k] - grads_n[k]).abs().max()) for k in grads) <= TOL * scale
    decoder = [c for c in seen.calls if c[2] >= S or c[3] <= S and c[0] in (1, 2, text.num_attention_heads)]
    heads = {(c[0], c[1]) for c in decoder}
    if name == "sdpa_gqa":  # one call a layer, k/v with their own heads (2 sliding, 1 full)
        assert {(4, 2), (4, 1)} <= heads
    else:
        # k/v never repeated: query heads folded onto each k/v head; blocks of rows // g queries
        assert {(2, 2), (1, 1)} <= heads and not any(q > k for q, k in heads)
        lm = [c for c in seen.calls if c[0] == c[1] and c[2] <= rows]
        assert lm and max(c[2] for c in lm) == rows
        # keys cut to each block's span: on the sliding layers a block's window (plus an image
        # span reaching past it), never the whole row
        sliding = [c[3] for c in lm if c[0] == 2]
        assert max(sliding) < S and min(sliding) < text.sliding_window
        assert sum(sliding) / len(sliding) <= text.sliding_window + rows // 2 + 70


def test_key_spans_follow_the_mask():
    from finetune.model.attention import _key_spans

    S, W, C = 10, 3, 4
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    causal = (j <= i)[None, None]
    window = causal & (i - j < W)
    bidir = causal.clone()
    bidir[..., 1:6, 1:6] = True  # an image at 1..5 sees itself whole
    assert _key_spans(causal, S, S, C, True) == [(0, 4), (0, 8), (0, 10)]
    assert _key_spans(window, S, S, C, True) == [(0, 4), (2, 8), (6, 10)]
    assert _key_spans(bidir, S, S, C, True) == [(0, 6), (0, 8), (0, 10)]
    assert _key_spans(None, S, S, C, True) == [(0, 4), (0, 8), (0, 10)]
    assert _key_spans(None, S, S, C, False) == [(0, 10)] * 3
    padded = causal.clone()
    padded[..., 8:, :] = False  # rows that may attend nothing keep every key, as sdpa sees them
    assert _key_spans(padded, S, S, C, True)[2] == (0, 10)
