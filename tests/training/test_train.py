"""finetune.training: every memory trick leaves the loss unchanged, accumulation is token-weighted,
packing equals no packing, KV-sharing trains without a cache, golden QLoRA losses, adapter
round trip.

All on the tiny gemma4_unified (soft-capped logits, sliding window 64, k_eq_v full layers)
and a few rendered demo samples holding text, an image, a tone, or both.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.collate import collate, collate_packed
from data_tools.render import IGNORE
from finetune.config.recipe import recipe_from_dict

# Small and fixed: the golden losses below depend on these numbers (and on the tiny base
# from finetune.demo.tiny_model with seed 0).
DEMO_SIZES = dict(n_image=4, n_audio=4, n_text_repeat=1, n_mixed=2, n_eval_each=1)
TARGETS = ["attention", "mlp", "vision", "audio"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_base, demo_data):
    """The shared tiny base and demo data (tests/conftest.py), plus a KV-sharing tiny base."""
    from finetune.demo.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("train")
    return SimpleNamespace(root=root, base=tiny_base, data=demo_data,
                           kv_base=write_tiny_model(root / "base-kv", seed=0, num_kv_shared_layers=2))


def make_recipe(assets, out: Path, *, base=None, model=None, data_dir=None, **train):
    data = Path(data_dir or assets.data)
    raw = {
        "model": {"base": str(base or assets.base), "quantization": "none", **(model or {})},
        "datasets": [{"path": str(p), "format": "messages"} for p in sorted(data.glob("train_*.jsonl"))],
        "eval_datasets": [{"path": str(data / "eval.jsonl"), "format": "messages"}],
        "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(assets.root / "cache")},
        "lora": {"r": 8, "alpha": 16, "targets": TARGETS},
        "train": {"output_dir": str(out), "max_steps": 4, "batch_size": 4, "lr": 1e-3,
                  "warmup": 0, "seed": 0, **train},
    }
    return recipe_from_dict(raw)


@pytest.fixture(scope="module")
def samples(assets):
    """Rendered training samples by modality: {"image": [...], "audio": [...], ...}."""
    from data_tools.pipeline import prepare
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import load_processor

    recipe = make_recipe(assets, assets.root / "prep")
    (assets.root / "prep").mkdir(parents=True, exist_ok=True)
    data = prepare(recipe, load_processor(str(assets.base), 70), str(assets.base),
                   rejects_path=assets.root / "prep" / "rejects.jsonl", chat=GEMMA4_UNIFIED.chat, log=None)
    out: dict[str, list] = {}
    for i in range(len(data.train)):
        s = data.train[i]
        out.setdefault(s["modality"], []).append(s)
    assert set(out) == {"image", "audio", "text", "mixed"}
    return out


def lora_model(base, *, seed: int = 0, quantization: str = "none", targets=TARGETS):
    """Base + LoRA with *random* B (PEFT's zero B would make every lora_A gradient zero)."""
    from finetune.model.families import family_for
    from finetune.model.load import load_base
    from finetune.model.lora import attach_lora

    model = load_base(str(base), quantization=quantization, device="cpu")
    lora = SimpleNamespace(r=8, alpha=16.0, dropout=0.0, targets=targets, use_rslora=False)
    torch.manual_seed(seed)
    model = attach_lora(model, lora, family_for("gemma4_unified"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def fp32(batch: dict) -> dict:
    from finetune.training.wrappers import to_device

    return to_device(batch, "cpu", torch.float32)


def f64(batch: dict) -> dict:
    """Equivalence checks run in float64: two float32 sums in different orders differ by what
    the CPU's vector width makes of them (1.4e-5 on one 2-core CPU), float64 ones by ~1e-13."""
    from finetune.training.wrappers import to_device

    return to_device(batch, "cpu", torch.float64)


EXACT = 1e-9  # the same forward, two float64 loss computations: ~1e-13 apart
# Batches of another composition (padding, trimming, packing, a KV cache) run transformers' eager
# attention, whose softmax is float32 even on float64 inputs: its rounding (6e-8 relative) in a
# different summation order moves the result by a few of those. All in float32 they moved by 1.4e-5.
F32_SOFTMAX = 1e-6


def loss_and_grads(model, batch: dict, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean token loss and the LoRA gradients of that mean."""
    from finetune.objectives.sft import loss_sum, n_labels

    model.zero_grad(set_to_none=True)
    n = n_labels(batch)
    loss = loss_sum(model, batch, **kw) / n
    loss.backward()
    loss = loss.detach()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def max_grad_diff(a: dict, b: dict) -> float:
    """Largest gradient difference relative to the largest gradient (LoRA grads here are ~1,
    so fp32 summation order alone moves them by a few 1e-6 in absolute terms)."""
    assert a.keys() == b.keys()
    scale = max(float(a[k].abs().max()) for k in a)
    return max(float((a[k] - b[k]).abs().max()) for k in a) / scale


@pytest.fixture(scope="module")
def model(assets):
    return lora_model(assets.base)


@pytest.fixture(scope="module")
def model64(assets):
    """The same base + LoRA in float64, for the equivalence checks."""
    return lora_model(assets.base).double()


@pytest.fixture(scope="module")
def mixed_batch(samples):
    """Four samples, one of each modality, padded to the longest (> the sliding window 64)."""
    picked = [samples[m][0] for m in ("image", "audio", "text", "mixed")]
    batch = fp32(collate(picked, pad_id=0))
    assert batch["input_ids"].shape[1] > 64
    return batch


# ---------------------------------------------------------------- chunked cross-entropy


def test_chunked_ce_matches_full_logits(model64, mixed_batch):
    model = model64
    cap = model.get_base_model().config.get_text_config().final_logit_softcapping
    assert cap == 30.0, "the soft-cap path must be exercised"
    batch = f64(mixed_batch)
    full, g_full = loss_and_grads(model, batch, chunked=False)
    # A chunk of 3 label positions: several chunks, the last one ragged.
    chunked, g_chunked = loss_and_grads(model, batch, chunked=True, chunk_size=3)
    assert abs(full - chunked) <= EXACT, (full, chunked)
    assert max_grad_diff(g_full, g_chunked) <= EXACT
    # The image and audio projections' LoRA receive gradient through this loss.
    assert any(float(g.abs().sum()) > 0 for k, g in g_chunked.items() if "embed_vision" in k)
    assert any(float(g.abs().sum()) > 0 for k, g in g_chunked.items() if "embed_audio" in k)


# ---------------------------------------------------------------- token-weighted accumulation


class _GradCapture:
    """Stands in for the optimizer: `step` records the accumulated gradients."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {k: p.grad.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_accumulation_is_token_weighted(model64, samples):
    from accelerate import Accelerator

    from finetune.objectives.sft import SFT, loss_sum, n_labels
    from finetune.training.step import optimizer_step

    model = model64
    picked = [samples["mixed"][0], samples["text"][0], samples["image"][0], samples["audio"][0]]
    counts = [n_labels(collate([s], 0)) for s in picked]
    assert len(set(counts)) > 1, f"need samples with different label counts, got {counts}"
    acc = Accelerator(cpu=True)
    t = SimpleNamespace(chunked_ce=True, ce_chunk_size=256, offload_activations=False)
    sft = SFT(SimpleNamespace(train=t))
    sched = SimpleNamespace(step=lambda: None)

    opt = _GradCapture(model)
    loss4, n4, _ = optimizer_step(model, opt, sched, [f64(collate(picked, 0))], acc, sft, 0.0)
    g4 = opt.grads
    loss1, n1, _ = optimizer_step(model, opt, sched, [f64(collate([s], 0)) for s in picked], acc, sft, 0.0)
    g1 = opt.grads
    assert n4 == n1 == sum(counts)
    assert abs(loss4 - loss1) <= F32_SOFTMAX
    assert max_grad_diff(g4, g1) <= F32_SOFTMAX

    # What a per-micro-batch mean (the usual accumulation) would have given: clearly different,
    # so the comparison above can fail.
    model.zero_grad(set_to_none=True)
    for s in picked:
        b = f64(collate([s], 0))
        (loss_sum(model, b, chunked=True) / n_labels(b) / len(picked)).backward()
    naive = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    assert max_grad_diff(g4, naive) > 1e-3


# ---------------------------------------------------------------- packing


def _text_labels_everywhere(s: dict) -> dict:
    """Labels on every text token, the first (bos) one included, like `train_on: all`."""
    s = dict(s)
    s["labels"] = [i if t == 0 else IGNORE for i, t in zip(s["input_ids"], s["mm_token_type_ids"])]
    assert s["labels"][0] != IGNORE
    return s


@pytest.mark.parametrize("labels", ["assistant", "all_text"])
def test_packed_loss_equals_unpacked(model, samples, labels):
    from finetune.objectives.sft import loss_sum, n_labels

    rows = [[samples["image"][0], samples["audio"][0], samples["mixed"][0]],
            [samples["text"][0], samples["image"][1]]]
    if labels == "all_text":
        rows = [[_text_labels_everywhere(s) for s in row] for row in rows]
    flat = [s for row in rows for s in row]
    assert max(len(s["input_ids"]) for s in flat) > 64  # some samples exceed the sliding window
    cfg = model.get_base_model().config.get_text_config()
    packed = fp32(collate_packed(rows, 0, cfg.sliding_window, cfg.layer_types))
    assert packed["input_ids"].shape[1] > 2 * cfg.sliding_window

    with torch.no_grad():
        alone = [fp32(collate([s], 0)) for s in flat]
        n_alone = sum(n_labels(b) for b in alone)
        sum_alone = sum(float(loss_sum(model, b, chunked=True)) for b in alone)
        assert n_labels(packed) == n_alone
        sum_packed = float(loss_sum(model, packed, chunked=True))
        assert abs(sum_packed - sum_alone) / n_alone <= 1e-4, (sum_packed / n_alone, sum_alone / n_alone)

        # The mask matters: one plain causal mask over the row (samples see each other, no
        # image bidirectionality, no window) gives a clearly different loss.
        leaky = dict(packed, attention_mask=(packed["input_ids"] != -1).long())
        assert abs(float(loss_sum(model, leaky, chunked=True)) - sum_alone) / n_alone > 1e-3


# ---------------------------------------------------------------- trimmed tails


def _labels_only_before_media(sample: dict) -> dict:
    """The image sample with its answer unlabelled and one label before the image: the
    image block then lies after the last label (like an unanswered trailing user turn)."""
    import numpy as np

    types = np.asarray(sample["mm_token_type_ids"])
    first_media = int(np.flatnonzero(types != 0)[0])
    labels = [IGNORE] * len(sample["labels"])
    labels[first_media - 1] = int(sample["input_ids"][first_media - 1])
    return dict(sample, labels=labels)


def test_trimmed_tails_leave_loss_and_gradients_unchanged(model64, samples):
    """collate(trim_tail=True) drops the tokens after each sample's last label (the newline
    after `<turn|>`), except a media block, which stays whole."""
    import numpy as np

    from data_tools.collate import useful_length

    model = model64
    picked = [samples[m][0] for m in ("image", "audio", "text", "mixed")]
    for s in picked:  # the rendered chat template leaves exactly one token after `<turn|>`
        assert useful_length(s) == len(s["input_ids"]) - 1
    late = _labels_only_before_media(samples["image"][1])
    types = np.asarray(late["mm_token_type_ids"])
    last_media = int(np.flatnonzero(types != 0)[-1])
    assert useful_length(late) == last_media + 1  # the whole image, nothing after it

    for batch_samples in (picked, [late, samples["audio"][1]]):
        full, trimmed = (f64(collate(batch_samples, 0, trim_tail=trim)) for trim in (False, True))
        assert trimmed["input_ids"].shape[1] < full["input_ids"].shape[1]
        assert torch.equal(trimmed["pixel_values"], full["pixel_values"])
        loss_full, g_full = loss_and_grads(model, full, chunked=True)
        loss_trim, g_trim = loss_and_grads(model, trimmed, chunked=True)
        assert abs(loss_full - loss_trim) <= F32_SOFTMAX
        assert max_grad_diff(g_full, g_trim) <= F32_SOFTMAX

    cfg = model.get_base_model().config.get_text_config()
    rows = [[samples["image"][0], samples["audio"][0]], [samples["text"][0], late]]
    packed = [f64(collate_packed(rows, 0, cfg.sliding_window, cfg.layer_types, trim_tail=trim))
              for trim in (False, True)]
    assert packed[1]["input_ids"].shape[1] < packed[0]["input_ids"].shape[1]
    losses = [loss_and_grads(model, b, chunked=True)[0] for b in packed]
    assert abs(losses[0] - losses[1]) <= F32_SOFTMAX


# ---------------------------------------------------------------- KV sharing


def test_kv_shared_layers_train_without_cache(assets, samples):
    """num_kv_shared_layers > 0: later layers reuse earlier K/V. The uncached training forward
    (and its checkpointed variant) must match the cached forward."""
    from finetune.model.load import enable_gradient_checkpointing
    from finetune.objectives.losses import full_ce_sum
    from finetune.objectives.sft import loss_labels, n_labels

    model = lora_model(assets.kv_base).double()
    cfg = model.get_base_model().config.get_text_config()
    assert cfg.num_kv_shared_layers == 2
    batch = f64(collate([samples["image"][0], samples["mixed"][0], samples["text"][0]], 0))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        cached = model(**inputs, use_cache=True)
        assert cached.past_key_values is not None or getattr(cached, "cache", None) is not None
        cached_loss = float(full_ce_sum(cached.logits, loss_labels(batch))) / n_labels(batch)

    loss, grads = loss_and_grads(model, batch, chunked=True)
    assert abs(loss - cached_loss) <= F32_SOFTMAX, (loss, cached_loss)
    loss_full, _ = loss_and_grads(model, batch, chunked=False)
    assert abs(loss_full - cached_loss) <= F32_SOFTMAX

    enable_gradient_checkpointing(model)
    loss_gc, grads_gc = loss_and_grads(model, batch, chunked=True)
    assert abs(loss_gc - loss) <= 1e-6
    assert max_grad_diff(grads, grads_gc) <= 1e-6
    # The shared layers' loss reaches the K projections of the layers that stored K/V.
    assert float(grads_gc["base_model.model.model.language_model.layers.0.self_attn.k_proj.lora_A.default.weight"]
                 .abs().sum()) > 0


# ---------------------------------------------------------------- memory tricks: loss unchanged


def test_gradient_checkpointing_leaves_loss_unchanged(assets, mixed_batch):
    from finetune.model.load import enable_gradient_checkpointing

    model = lora_model(assets.base)
    loss, grads = loss_and_grads(model, mixed_batch, chunked=True)
    enable_gradient_checkpointing(model)
    assert model.get_base_model().model.language_model.gradient_checkpointing
    loss_gc, grads_gc = loss_and_grads(model, mixed_batch, chunked=True)
    assert abs(loss - loss_gc) <= 1e-6
    assert max_grad_diff(grads, grads_gc) <= 1e-6


def test_offload_activations_leaves_loss_unchanged(assets, mixed_batch, monkeypatch):
    import finetune.model.memory_tricks as tr
    from finetune.model.load import enable_gradient_checkpointing

    model = lora_model(assets.base)
    enable_gradient_checkpointing(model)  # offloading is meant for checkpointed layer inputs
    loss, grads = loss_and_grads(model, mixed_batch, chunked=True)

    used = []

    class Counting(tr.ActivationOffload):
        def __init__(self):
            super().__init__()
            used.append(self)

    monkeypatch.setattr(tr, "ActivationOffload", Counting)
    loss_off, grads_off = loss_and_grads(model, mixed_batch, chunked=True, offload=True)
    assert abs(loss - loss_off) <= 1e-6
    assert max_grad_diff(grads, grads_off) <= 1e-6
    # The mechanism ran: the decoder layers' inputs went through the hooks.
    hidden = model.get_base_model().config.get_text_config().hidden_size
    layer_input = mixed_batch["input_ids"].numel() * hidden * 4
    assert len(used) == 1 and used[0].saved_bytes >= 4 * layer_input


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlp_leaves_loss_unchanged(assets, mixed_batch, checkpointing):
    """MLP in sequence tiles under their own recompute: same loss and LoRA gradients, same
    parameter names (adapters save and load as without tiling)."""
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.load import enable_gradient_checkpointing
    from finetune.model.memory_tricks import TiledMLP, tile_mlp

    model = lora_model(assets.base)
    if checkpointing:
        enable_gradient_checkpointing(model)  # the tiles' recompute nests inside the layer's
    names = [n for n, _ in model.named_parameters()]
    loss, grads = loss_and_grads(model, mixed_batch, chunked=True)
    tile = 16
    assert mixed_batch["input_ids"].shape[1] > 3 * tile  # several tiles, a ragged last one
    assert tile_mlp(model, tile, GEMMA4_UNIFIED.mlp_blocks) == 4
    assert [n for n, _ in model.named_parameters()] == names
    assert sum(isinstance(m, TiledMLP) for m in model.modules()) == 4
    calls = []
    inner = model.get_base_model().model.language_model.layers[0].mlp.inner
    handle = inner.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
    loss_t, grads_t = loss_and_grads(model, mixed_batch, chunked=True)
    handle.remove()
    assert abs(loss - loss_t) <= 1e-6
    assert max_grad_diff(grads, grads_t) <= 1e-6
    assert max(calls) == tile  # the MLP never saw the whole sequence at once


# ---------------------------------------------------------------- golden QLoRA losses

# Four QLoRA steps (NF4 base, fp32 compute on CPU, seed 0) on DEMO_SIZES data with
# make_recipe's settings. A change here means training changed: the model, the tokenizer,
# rendering, batching, the loss, or the optimizer. If the change is intended, regenerate with
#   GOLDEN_PRINT=1 pytest tests/training/test_train.py -k golden -s
# and paste the printed list. Step 1 is the same on every CPU; later steps drift by up to ~2e-3
# between CPUs (bitsandbytes' and oneDNN's kernels pick different vector paths), far below what
# any change to the training itself moves them (a different loss, batch or lr moves them by >0.05).
GOLDEN_LOSSES = [7.882812, 7.057746, 7.734322, 8.178582]  # tiny tokenizer with the tool/think tokens (#14)
GOLDEN_ABS = 5e-3


def test_golden_qlora_losses(assets):
    import os

    from finetune.demo.data import make_demo_data
    from finetune.training.loop import train

    # Its own data, so a change to the shared fixture's sizes can't move the golden numbers.
    data = make_demo_data(assets.root / "golden-data", seed=0, **DEMO_SIZES)
    out = assets.root / "golden"
    recipe = make_recipe(assets, out, model={"quantization": "nf4"}, data_dir=data, eval_every=4)
    result = train(recipe, log=lambda *_: None)
    if os.environ.get("GOLDEN_PRINT"):
        print("GOLDEN_LOSSES =", [round(x, 6) for x in result.losses])
    assert result.losses[0] == pytest.approx(GOLDEN_LOSSES[0], abs=1e-5)
    assert result.losses == pytest.approx(GOLDEN_LOSSES, abs=GOLDEN_ABS)

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens", "tokens_per_s"} <= rows[0].keys()
    assert {"eval_loss", "eval_loss_image", "eval_loss_audio", "eval_loss_text"} <= rows[-1].keys()
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- adapter round trip


def test_adapter_save_reload_gives_identical_logits(assets, mixed_batch, tmp_path):
    from finetune.model.adapters import load_adapter
    from finetune.model.load import load_base

    model = lora_model(assets.base, quantization="nf4").eval()
    inputs = {k: v for k, v in mixed_batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = load_adapter(load_base(str(assets.base), quantization="nf4", device="cpu"),
                            str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        after = reloaded(**inputs).logits
        plain = reloaded.get_base_model()
        with reloaded.disable_adapter():
            base_logits = plain(**inputs).logits
    assert torch.equal(before, after)
    assert float((after - base_logits).abs().max()) > 1e-2  # the adapter does something


# ---------------------------------------------------------------- the loop end to end


def test_train_loop_chunked_or_not_packed_with_eval(assets):
    """The whole loop with packing and eval, once with chunked CE and once with full logits:
    the same losses (the flag changes memory, never the numbers)."""
    from finetune.training.loop import train

    runs = {}
    for chunked in (True, False):
        out = assets.root / f"loop-{chunked}"
        recipe = make_recipe(assets, out, max_steps=2, batch_size=2, packing=True, chunked_ce=chunked,
                             eval_every=2, gradient_checkpointing=False)
        runs[chunked] = train(recipe, log=lambda *_: None).losses
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"eval_loss", "eval_loss_image", "eval_loss_audio", "eval_loss_text"} <= last.keys()
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


def test_cuda_out_of_memory_is_one_line_with_the_settings_to_change(assets, monkeypatch):
    import finetune.training.loop as tr
    from finetune.errors import UserError

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tr, "optimizer_step", oom)
    recipe = make_recipe(assets, assets.root / "oom", max_steps=1)
    with pytest.raises(UserError) as e:
        tr.train(recipe, log=lambda *_: None)
    line = e.value.line()
    assert "\n" not in line and "out of memory at step 1" in line
    assert "finetune plan" in line and "data.max_seq_len" in line and "train.batch_size" in line


def test_previews_and_tensorboard(assets, tmp_path):
    """preview_every writes held-out answers to previews.jsonl and tensorboard (text), and the
    tensorboard tracker receives the per-step loss."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.training.loop import train

    out = tmp_path / "run"
    recipe = make_recipe(assets, out, max_steps=2, preview_every=2, preview_items=2,
                         report_to=["tensorboard"])
    train(recipe, log=lambda *_: None)
    rows = [json.loads(x) for x in (out / "previews.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 2]
    assert all(r["reference"] and "output" in r for r in rows)
    events = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent),
                              size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert "previews/text_summary" in events.Tags()["tensors"]
