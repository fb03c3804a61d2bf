"""finetune.plan (`finetune plan`): parameter counts, arithmetic, shipped recipes, CPU calibration."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.config.recipe import load_recipe, recipe_from_dict
from finetune.errors import UserError
from finetune.plan.report import plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes" / "gemma4-12b").glob("*.yaml"))


def _recipe(base: str, **sections) -> object:
    raw = {"model": {"base": base}, "datasets": [{"path": "data/x.jsonl"}]}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw)


def tiny_config():
    """A gemma4_unified with the 12B's quirks: sliding + full layers, a wider global head,
    k_eq_v full layers with one kv head (no v_proj there), soft-capped logits."""
    from transformers import Gemma4UnifiedConfig

    return Gemma4UnifiedConfig(
        text_config=dict(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=30.0, max_position_embeddings=1024,
            pad_token_id=0, eos_token_id=1, bos_token_id=2),
        vision_config=dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=64, mm_posemb_size=32,
                           output_proj_dims=64),
        audio_config=dict(audio_embed_dim=32),
        boi_token_id=500, eoi_token_id=501, image_token_id=502, video_token_id=503,
        boa_token_id=504, eoa_token_index=505, audio_token_id=506)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with config.json + random weights, the model in fp32)."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(tiny_config())
    folder = tmp_path_factory.mktemp("tiny-gemma4")
    model.save_pretrained(folder)
    return folder, model


# ---- (a) the 12B skeleton ---------------------------------------------------------------


def test_12b_parameter_counts_match_the_known_model():
    out = plan(_recipe("google/gemma-4-12B-it"))
    p = out["params"]
    assert p["total"] == pytest.approx(11.96e9, rel=0.005)
    assert p["embeddings"] == pytest.approx(1.007e9, rel=0.005)
    # 8 full layers have no v_proj (k_eq_v): with one, the total would be 16 M higher
    assert p["total"] == 11_959_730_176
    assert p["total"] == (p["embeddings"] + p["quantizable_linear"] + p["linear_not_quantized"]
                          + p["norms_and_other"])
    # FACTS: "LoRA r=16 on attention+MLP ≈ 66 M params"
    assert p["lora_trainable"] == pytest.approx(66e6, rel=0.01)
    assert out["assumptions"]["config"].startswith("bundled:")


def test_12b_alias_is_case_insensitive_and_unknown_hub_id_fails_offline(monkeypatch):
    assert plan(_recipe("google/gemma-4-12b-it"))["params"]["total"] == 11_959_730_176
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="model.base"):
        plan(_recipe("someone/not-a-cached-model"))


def test_local_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        plan(_recipe(str(tmp_path)))


# ---- (b) the tiny model: counts equal the real model's ---------------------------------


def test_tiny_counts_equal_the_real_model_and_breakdown_adds_up(tiny):
    from peft import get_peft_model

    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.lora import lora_config

    folder, model = tiny
    recipe = _recipe(str(folder), lora={"r": 4, "targets": ["all"]})
    out = plan(recipe)
    p = out["params"]
    assert p["total"] == sum(t.numel() for t in model.parameters())
    assert p["total"] == (p["embeddings"] + p["quantizable_linear"] + p["linear_not_quantized"]
                          + p["norms_and_other"])
    assert p["embeddings"] == model.model.language_model.embed_tokens.weight.numel()
    # the LoRA count is what PEFT really creates for the same targets
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), lora_config(recipe.lora, GEMMA4_UNIFIED))
    assert p["lora_trainable"] == sum(t.numel() for t in peft_model.parameters() if t.requires_grad)
    assert sum(out["breakdown"].values()) == pytest.approx(out["peak_gib"], abs=0.002)
    assert out["fits"]


_LAYERS_OF_TINY = range(4)  # finetune.demo.tiny_model's default depth


def test_plan_reacts_to_each_knob(tiny):
    folder, _ = tiny
    base = plan(_recipe(str(folder), data={"max_seq_len": 8192}, train={"chunked_ce": False}))
    longer = plan(_recipe(str(folder), data={"max_seq_len": 16384}, train={"chunked_ce": False}))
    assert longer["peak_gib"] > base["peak_gib"]
    chunked = plan(_recipe(str(folder), data={"max_seq_len": 8192}))
    assert chunked["peak_gib"] <= base["peak_gib"]  # equal: at 8k the decoder backward dominates
    # On the 12B, full logits make the loss the peak phase; chunked, the decoder's backward is.
    # The two phases never overlap, so the breakdown shows one of them only.
    full = plan(load_recipe(RECIPES[0], ["data.max_seq_len=4096", "train.chunked_ce=false"]))
    small = plan(load_recipe(RECIPES[0], ["data.max_seq_len=4096"]))
    assert full["assumptions"]["peak_phase"] == "loss" and "layer_recompute" not in full["breakdown"]
    assert small["assumptions"]["peak_phase"] == "decoder backward"
    assert "logits_and_loss" not in small["breakdown"] and small["peak_gib"] < full["peak_gib"]
    # MLP tiles hold one tile's intermediates; offload keeps 4 layer inputs on the GPU, not all
    untiled = plan(load_recipe(RECIPES[0], ["data.max_seq_len=8192", "train.mlp_tile_tokens=0"]))
    tiled = plan(load_recipe(RECIPES[0], ["data.max_seq_len=8192", "train.mlp_tile_tokens=1024"]))
    assert tiled["breakdown"]["layer_recompute"] < untiled["breakdown"]["layer_recompute"]
    assert tiled["breakdown"]["backward_transients"] < untiled["breakdown"]["backward_transients"]
    kept = plan(_recipe(str(folder), data={"max_seq_len": 8192}, train={"offload_activations": False}))
    assert kept["breakdown"]["checkpointed_inputs"] == pytest.approx(
        chunked["breakdown"]["checkpointed_inputs"] * len(_LAYERS_OF_TINY) / 4, rel=1e-6)
    # bnb keeps 32-bit states for tensors under 4096 values, as the plan does: r=4 saves nothing
    states = [plan(_recipe(str(folder), lora={"r": r}, train={"optimizer": o}))["breakdown_bytes"]
              ["optimizer_states"] for r in (4, 64) for o in ("adamw", "adamw8bit")]
    assert states[0] == states[1] and states[3] < states[2] / 3
    no_gc = plan(_recipe(str(folder), data={"max_seq_len": 8192},
                         train={"chunked_ce": False, "gradient_checkpointing": False}))
    assert no_gc["peak_gib"] > base["peak_gib"] and "saved_activations" in no_gc["breakdown"]


# ---- (c) shipped recipes ----------------------------------------------------------------


def test_there_are_the_four_12b_recipes():
    names = {p.name for p in RECIPES}
    assert {"image-qa.yaml", "audio-tasks.yaml", "mixed-image-audio-text.yaml",
            "text-domain-adaptation.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_12b_recipe_loads_and_fits_16_gib(path):
    recipe = load_recipe(path)
    assert recipe.model.base == "google/gemma-4-12B-it"
    out = plan(recipe, budget_gib=16.0)
    assert out["fits"], out["breakdown"]
    assert out["peak_gib"] < 15.0  # keep headroom for the error bar
    assert out["suggestions"] == []


def test_a_bad_variant_does_not_fit_and_its_suggestions_do(capsys):
    path = RECIPES[0]
    bad = ["data.max_seq_len=32768", "train.chunked_ce=false"]
    out = plan(load_recipe(path, bad))
    assert not out["fits"] and out["peak_gib"] > 16
    assert out["suggestions"]
    first = out["suggested_overrides"][0]
    assert first["fits"] and first["saves_gib"] > 0
    # applying a suggestion really gives the predicted figure
    again = plan(load_recipe(path, bad + first["overrides"]))
    assert again["fits"] and again["peak_gib"] == pytest.approx(first["peak_gib"], abs=0.002)
    assert any(s.startswith("train.chunked_ce=true") for s in out["suggestions"])


def test_cli_table_and_json(capsys):
    from finetune.cli.plan import cmd_plan

    args = SimpleNamespace(recipe=str(RECIPES[0]), overrides=["data.max_seq_len=32768"], json=True,
                           budget_gib=16.0)
    assert cmd_plan(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"peak_gib", "budget_gib", "fits", "breakdown", "suggestions"} <= set(out)
    args.json = False
    assert cmd_plan(args) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    with pytest.raises(UserError):
        cmd_plan(SimpleNamespace(recipe=str(RECIPES[0]), overrides=["lora.rank=8"], json=False,
                                 budget_gib=None))


# ---- (d) calibration on the CPU ---------------------------------------------------------


def _state_bytes(t) -> int:
    return t.numel() * t.element_size()


def test_cpu_fp32_static_memory_matches_real_tensors(tiny):
    """Weights + LoRA + grads + AdamW states, counted from the live tensors after one step.

    Exact up to AdamW's per-tensor `step` scalars, so the tolerance is 0.1 %. Activations are
    not calibrated here: on the CPU they go through malloc, which torch does not count.
    """
    import copy

    from peft import get_peft_model

    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.lora import lora_config

    folder, model = tiny
    recipe = _recipe(str(folder), model={"quantization": "none", "dtype": "fp32"},
                     lora={"r": 8, "targets": ["attention", "mlp"]}, train={"optimizer": "adamw"})
    peft_model = get_peft_model(copy.deepcopy(model), lora_config(recipe.lora, GEMMA4_UNIFIED))
    trainable = [t for t in peft_model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(3, 400, (1, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    measured = sum(_state_bytes(t) for t in peft_model.parameters())
    measured += sum(_state_bytes(t.grad) for t in trainable)
    measured += sum(_state_bytes(v) for s in opt.state.values() for v in s.values())
    b = plan(recipe, device="cpu")["breakdown_bytes"]
    predicted = sum(b[k] for k in ("linear_weights", "unquantized_weights", "lora_weights",
                                   "lora_grads", "optimizer_states"))
    assert predicted == pytest.approx(measured, rel=1e-3)


def test_cpu_nf4_weight_bytes_match_a_real_bitsandbytes_load(tiny):
    """The NF4 + double-quant formula against what bitsandbytes stores (weights, absmax,
    second-level absmax, code tables), loaded the way finetune loads a base."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig, Gemma4UnifiedForConditionalGeneration

    folder, _ = tiny
    q = Gemma4UnifiedForConditionalGeneration.from_pretrained(
        folder, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))
    measured = 0
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            measured += _state_bytes(m.weight) + _state_bytes(qs.absmax) + _state_bytes(qs.code)
            measured += _state_bytes(qs.state2.absmax) + _state_bytes(qs.state2.code) + 4  # + offset
    out = plan(_recipe(str(folder), model={"quantization": "nf4", "dtype": "fp32"}), device="cpu")
    assert out["breakdown_bytes"]["linear_weights"] == pytest.approx(measured, rel=1e-3)
