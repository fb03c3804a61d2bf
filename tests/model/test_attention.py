"""finetune.model.attention: attention without repeated k/v (`train.attention`) gives the stock
sdpa path's loss and gradients, in float64, on the tiny gemma4_unified's sliding and full layers
(k_eq_v, 1 global k/v head), an image's bidirectional span, padding and packed 4-D masks; and
`finetune plan` counts what it saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from data_tools.collate import collate, collate_packed
from data_tools.masks import PackedMask
from data_tools.render import IGNORE

ROOT = Path(__file__).resolve().parents[2]
# float64: the paths differ only in summation order (blocks, folded heads), ~1e-16 relative
TOL = 1e-10


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_base, demo_data):
    """Rendered demo samples by modality (image, audio, text, mixed)."""
    from data_tools.pipeline import prepare
    from finetune.config.recipe import recipe_from_dict
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import load_processor

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
    lazy = f64(collate_packed(rows, 0, cfg.sliding_window, cfg.layer_types, lazy_masks=True))
    assert all(isinstance(m, PackedMask) for m in lazy["attention_mask"].values())
    # the lazy masks' dense form is the dense masks (the stock run below takes it dense)
    assert all(torch.equal(m.dense(), packed["attention_mask"][k]) for k, m in lazy["attention_mask"].items())
    return {"padded": padded, "packed": packed, "packed_lazy": lazy}


@pytest.mark.parametrize("kind", ["padded", "packed", "packed_lazy"])
@pytest.mark.parametrize("name", ["blocked", "sdpa_gqa"])
def test_attention_without_repeated_kv_equals_stock(model, samples, kind, name):
    from finetune.model.attention import set_attention

    batch = batches(model, samples)[kind]
    S = batch["input_ids"].shape[1]
    text = model.config.get_text_config()
    if kind != "padded":  # the blocks' own recompute nested in the layers' (the training setting)
        from finetune.model.load import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    set_attention(model, "sdpa")
    if name != "blocked" and kind == "packed_lazy":
        pytest.skip("lazy masks are the blocked attention's")
    dense = {**batch, "attention_mask": {k: m.dense() for k, m in batch["attention_mask"].items()}} \
        if kind == "packed_lazy" else batch
    loss, grads = loss_and_grads(model, dense)
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


# ---------------------------------------------------------------- what `finetune plan` counts

PLAN_COMMON = ["data.image_tokens=280", "data.max_audio_seconds=10.0", "train.batch_size=1", "train.grad_accum=1"]


def _estimate(seq: int, attention: str, tiles: int = 1024):
    from finetune.config.recipe import load_recipe
    from finetune.plan.estimate import estimate
    from finetune.plan.report import plan
    from finetune.plan.skeleton import load_config, skeleton

    recipe = load_recipe(ROOT / "recipes/gemma4-12b/mixed-image-audio-text.yaml",
                         [*PLAN_COMMON, f"data.max_seq_len={seq}", f"train.mlp_tile_tokens={tiles}",
                          f"train.attention={attention}"])
    config, source = load_config(recipe.model)
    return plan(recipe, device="cuda"), estimate(recipe, skeleton(config, source), "cuda")


def test_plan_counts_attention_without_repeated_kv():
    """The 12B, the mixed recipe: only the attention terms change, by what the k/v repeat, the
    saved output, the float mask and the whole boolean masks took (the full layers: 16 query heads on 1 k/v head of 512)."""
    S, ab = 16384, 2
    stock, e_stock = _estimate(S, "sdpa")
    blocked, e_blocked = _estimate(S, "blocked")
    gqa, _ = _estimate(S, "sdpa_gqa")
    # the first GPU run's figure for stock sdpa stays (benchmarks/results/gpu.json: 17.76 GiB measured)
    assert stock["peak_gib"] == pytest.approx(17.386, abs=1e-3)
    assert blocked["peak_gib"] == pytest.approx(15.01, abs=1e-3) and blocked["peak_gib"] < 16.0
    assert blocked["peak_gib"] < gqa["peak_gib"] < stock["peak_gib"]
    a, b = e_stock["items"], e_blocked["items"]
    changed = {k for k in a if a[k] != b.get(k)}
    assert changed == {"layer_recompute", "backward_transients", "allocator_slack", "attention_masks"}
    # no whole mask: the lazy masks build one block's rows at a time (2 layer types × S² booleans)
    assert a["attention_masks"] == 2 * S * S and b["attention_masks"] == 0
    # a full layer's recompute: k and v saved at 512 wide, not 8192; no saved output (8192 wide) or
    # fp32 log-sum-exp (16 heads); no float copy of the seq² mask
    Dq, Dk, heads = 16 * 512, 512, 16
    assert a["layer_recompute"] - b["layer_recompute"] == S * (2 * ab * (Dq - Dk) + ab * Dq + 4 * heads) + ab * S * S
    # the backward's top: fp32 dq + q/k/v grads at 8192 wide, against 2 q grads + 4 k/v grads at 512
    # wide and one block (4096 rows = 256 queries × 16 heads) of mask, workspace and grads
    rows = 4096
    block = rows * S * (1 + ab) + heads * (rows // heads) * 512 * (4 + 3 * ab)
    assert a["backward_transients"] - b["backward_transients"] == (
        S * (4 * Dq + 3 * ab * Dq) - (S * (2 * ab * Dq + 4 * ab * Dk) + block))
    four_k, _ = _estimate(4096, "blocked", tiles=2048)
    assert four_k["peak_gib"] == pytest.approx(11.239, abs=1e-3) and four_k["peak_gib"] < 11.5


def test_blocked_attention_through_the_trainer_gives_the_same_run(tiny_base, demo_data, tmp_path):
    """`train.attention: blocked` on a real packed run (the loop switches the attention and keeps
    the packed masks lazy), and with `train.tile_attention`: the same losses as stock sdpa, to fp32
    summation noise."""
    from finetune.config.recipe import recipe_from_dict
    from finetune.training.loop import train

    losses = {}
    for name in ("sdpa", "blocked", "tiled"):
        raw = {"model": {"base": str(tiny_base), "quantization": "none"},
               "datasets": [{"path": str(demo_data / f"train_{kind}.jsonl")} for kind in ("mixed", "text")],
               "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(tmp_path / "cache")},
               "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp"]},
               "train": {"output_dir": str(tmp_path / name), "batch_size": 2, "lr": 1e-3, "seed": 0, "max_steps": 2,
                         "packing": True, "attention": "sdpa" if name == "sdpa" else "blocked",
                         "tile_attention": name == "tiled", "attention_block_rows": 32}}
        losses[name] = train(recipe_from_dict(raw)).losses
    assert losses["blocked"] == pytest.approx(losses["sdpa"], abs=1e-5)
    assert losses["tiled"] == pytest.approx(losses["sdpa"], abs=1e-5)


def test_lazy_masks_build_the_blocks_of_the_dense_masks():
    """`lazy_sdpa_mask` (transformers' mask functions: causal with left padding, sliding window,
    an image's bidirectional block) and `PackedMask` (packed rows: two samples, padding, an image,
    a branched sample) give, block by block, exactly the dense masks."""
    from transformers.masking_utils import (
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    from data_tools.collate import packed_mask
    from data_tools.steps import tree_mask
    from finetune.model.attention import FunctionMask, lazy_sdpa_mask

    S = 12
    padding = torch.ones(2, S, dtype=torch.bool)
    padding[1, :3] = False
    ids = torch.full((2, S), -1)
    ids[:, 4:8] = 0  # an image at 4..7
    cases = [(causal_mask_function, padding, False), (sliding_window_causal_mask_function(3), None, False),
             (or_masks(causal_mask_function, blockwise_overlay(ids)), padding, True)]
    blocks = [(slice(0, 5), slice(0, 5)), (slice(5, 12), slice(2, 9)), (slice(None), slice(None)), (slice(11, 12), slice(0, 12))]
    for fn, pad, vmap in cases:
        kw = dict(batch_size=2, q_length=S, kv_length=S, mask_function=fn, attention_mask=pad, use_vmap=vmap)
        dense = sdpa_mask(**kw, allow_is_causal_skip=False)
        lazy = lazy_sdpa_mask(**kw)
        assert isinstance(lazy, FunctionMask) and lazy.shape == dense.shape == (2, 1, S, S)
        for q, k in blocks:
            assert torch.equal(lazy[:, :, q, k], dense[:, :, q, k])
        assert torch.equal(lazy[..., 5:12, :], dense[..., 5:12, :])
    assert lazy_sdpa_mask(batch_size=2, q_length=S, kv_length=S) is None  # plain causal: sdpa's is_causal
    decode = lazy_sdpa_mask(batch_size=2, q_length=1, kv_length=S, q_offset=S - 1, attention_mask=padding)
    assert torch.is_tensor(decode) and decode.shape == (2, 1, 1, S)  # decoding: the stock function, dense

    seg = torch.tensor([[0] * 5 + [1] * 5 + [-1] * 2, [0] * 12])
    types = torch.zeros(2, S, dtype=torch.long)
    types[0, 6:9] = 1
    pos = torch.tensor([list(range(5)) + list(range(5)) + [0, 0], [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]])  # row 1 branched
    for window in (None, 3):
        lazy = PackedMask(seg, types, window, pos)
        dense = packed_mask(seg, types, window, pos)
        for q, k in blocks:
            assert torch.equal(lazy[:, :, q, k], dense[:, :, q, k])
        assert torch.equal(lazy[1:, :, 2:7, 1:4], dense[1:, :, 2:7, 1:4])
    # independent of PackedMask: row 1 (one branched sample, no image) is its tree mask
    assert torch.equal(packed_mask(seg, types, None, pos)[1, 0], tree_mask(pos)[1])
    with pytest.raises(TypeError, match="slices of rows, queries and keys"):
        PackedMask(seg, types, None, pos)[0, 0]
