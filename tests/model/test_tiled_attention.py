"""finetune.model.tiled_attention: the attention over sequence tiles (`train.tile_attention`) gives
the untiled blocked attention's loss and gradients, LoRA on q/k/v/o included, in float64 (to
float32's rounding where the norms compute in float32), on the tiny gemma4_unified (sliding and
full layers, k_eq_v) with padded rows (lazy transformers masks), packed rows (lazy packed masks)
and gradient checkpointing; a base whose layers reuse an earlier layer's k/v is refused (not
proven there; the 12B shares none)."""

from __future__ import annotations

import pytest
import torch

from tests.model.test_attention import batches, loss_and_grads, samples  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def lora_model(tiny_base):
    from peft import LoraConfig, get_peft_model

    from finetune.model.load import enable_gradient_checkpointing, load_base

    m = load_base(str(tiny_base), quantization="none", device="cpu").double()
    enable_gradient_checkpointing(m)
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q|k|v|o)_proj"))
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return m.double().train()


# Gemma 4's RMSNorm computes in float32 (`hidden_states.float()`), in a float64 model too, so this
# comparison is float32-bound where the q/k/v norms run, and the tiled path runs them on tile- and
# block-shaped tensors. On an AMD EPYC (AVX-512) packed rows came out 1.4e-8 of the largest gradient
# apart (5.2e-8 with 24-token tiles; below one float32 ulp, 6e-8), the loss bit-equal, where the
# CPU this was first run on gave float64 rounding; with the norms computing in float64 (tried
# locally by replacing their forward) the gap there is 1e-14. The bound is 16 float32 ulps (a wrong
# mask, span or tile moves gradients by ~1e-2).
TOL_F32 = 1e-6


@pytest.mark.parametrize("kind", ["padded", "packed_lazy"])
def test_tiled_attention_equals_untiled(lora_model, samples, kind):  # noqa: F811
    from finetune.model.attention import set_attention
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.tiled_attention import TiledAttention, tile_attention, untile_attention

    batch = batches(lora_model, samples)[kind]
    rows = 24
    set_attention(lora_model, "blocked", rows)
    loss, grads = loss_and_grads(lora_model, batch)
    layers = len(lora_model.base_model.model.model.language_model.layers)
    assert tile_attention(lora_model, 16, GEMMA4_UNIFIED.attention_blocks) == layers
    names = {n for n, _ in lora_model.named_parameters()}
    try:
        loss_t, grads_t = loss_and_grads(lora_model, batch)
    finally:
        assert untile_attention(lora_model) == layers
        set_attention(lora_model, "sdpa")
    assert not any(isinstance(m, TiledAttention) for m in lora_model.modules())
    assert {n for n, _ in lora_model.named_parameters()} == names  # parameter names unchanged by the wrap
    lora = [k for k in grads if "lora_A" in k and "self_attn" in k]
    assert grads.keys() == grads_t.keys() and len(lora) >= 3 * layers  # q, k, o everywhere; v off the k_eq_v layers
    scale = max(float(g.abs().max()) for g in grads.values())
    worst = max(float((grads[k] - grads_t[k]).abs().max()) for k in grads)
    print(f"tiled {kind}: loss {abs(loss - loss_t) / abs(loss):.1e}, grads {worst / scale:.1e}")
    assert abs(loss - loss_t) <= TOL_F32 * abs(loss) and worst <= TOL_F32 * scale


def test_tile_attention_needs_the_blocked_attention(tiny_base, tmp_path):
    from finetune.config.recipe import recipe_from_dict
    from finetune.errors import RecipeErrors

    with pytest.raises(RecipeErrors) as e:
        recipe_from_dict({"model": {"base": str(tiny_base)}, "datasets": [{"path": "d.jsonl"}],
                          "train": {"output_dir": str(tmp_path), "tile_attention": True}})
    assert "train.tile_attention: tiles the blocked attention, not 'sdpa'" in str(e.value)
    assert "Set train.attention: blocked, or train.tile_attention: false" in str(e.value)


def test_tile_attention_refuses_layers_sharing_kv(tmp_path):
    from finetune.demo.tiny_model import build_tiny_model
    from finetune.errors import UserError
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.tiled_attention import tile_attention

    model = build_tiny_model(0, num_kv_shared_layers=2)
    with pytest.raises(UserError, match="reuse an earlier layer's k/v"):
        tile_attention(model, 16, GEMMA4_UNIFIED.attention_blocks)


def test_plan_counts_the_tiled_attention():
    """The 12B mixed recipe at 32k, one GPU's activations: tiling changes the layer's recompute to
    what stays (the four norms' fp32 upcasts, the attention input the tiles read, k and v on the
    widest k/v layers: 2048 wide) and the backward's top; under FSDP2 on 4 × 16 GB it then fits."""
    from finetune.config.recipe import load_recipe
    from finetune.plan.estimate import _layer_saved, _lora, estimate
    from finetune.plan.report import plan
    from finetune.plan.skeleton import load_config, skeleton

    common = ["data.max_seq_len=32768", "train.optimizer=adamw", "model.quant_storage=bf16", "train.attention=blocked"]
    path = "recipes/gemma4-12b/mixed-image-audio-text.yaml"
    blocked = load_recipe(path, common)
    tiled = load_recipe(path, [*common, "train.tile_attention=true"])
    config, source = load_config(blocked.model)
    sk = skeleton(config, source)
    a, b = estimate(blocked, sk, "cuda")["items"], estimate(tiled, sk, "cuda")["items"]
    S, H, ab, tile = 32768, 3840, 2, 2048
    assert {k for k in a if a[k] != b[k]} == {"layer_recompute", "backward_transients", "allocator_slack"}
    _, targeted = _lora(sk, tiled)
    mlp = _layer_saved(sk.layers[0], H, targeted, 16, ab, 4, True, "blocked", True)[1]
    assert b["layer_recompute"] == S * (4 * 4 * H + ab * H + 2 * ab * 2048) + tile * mlp + ab * H * S
    assert a["layer_recompute"] - b["layer_recompute"] > 3.5 * 2**30  # 6.6 → 3.0 GiB (LoRA dropout on)
    peaks = {n: plan(tiled, gpus=n, strategy="fsdp")["peak_gib"] for n in (2, 4)}
    assert peaks == {2: pytest.approx(15.49, abs=0.005), 4: pytest.approx(13.34, abs=0.005)}
    assert plan(blocked, gpus=4, strategy="fsdp")["peak_gib"] == pytest.approx(17.02, abs=0.005)
