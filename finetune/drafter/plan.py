"""Peak GPU memory of one step of drafter alignment (`train.objective: drafter`); pure arithmetic.

What one step of finetune.drafter.objective holds (B = train.batch_size prompts of up to
S = data.max_seq_len tokens, N = drafter.continuation_tokens, T = S + N, Q = N - 1 draft
starts, k = drafter.num_tokens steps, V = vocabulary):

- **Weights**: the frozen target as `finetune.plan.estimate` counts it (NF4/int8/bf16, the
  dequant buffer), its adapter frozen in fp32, and the drafter in fp32 (it trains in fp32 and
  the frozen part of a LoRA drafter is loaded the same way). Trained drafter weights get fp32
  grads and the optimizer's states (AdamW: 8 bytes per weight; 8-bit: 2 + an fp32 absmax per 256).
- **Three phases, one at a time** (the step's peak is the largest, on top of what persists):
  1. *continuation*: greedy generation of N tokens: the KV cache (sliding layers keep their
     window, full layers every token), the prefill's masks and one layer's transients;
  2. *target forward* over T tokens: one layer's transients and the masks;
  3. *drafter*: k unrolled steps with grads over Q starts. Each step keeps its layers' inputs,
     the target's k/v cast to fp32 and repeated to every query head (sdpa repeats kv when a
     mask is passed), its fp32 log-softmax over V and the target's probabilities it is compared
     with; the centroid-masked feedback of an ordered-embedding drafter gathers top-k clusters
     of fp32 output rows for every start (no grad, short-lived).
- **Persisting from phase 2 into 3**: the target's last hidden states (B·T·H), its shared k/v
  (the last sliding and full layer) and its log-probabilities over the continuation (B·N·V fp32).

Not measured on a GPU yet (the target's terms are those `finetune.plan.estimate` calibrated).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from finetune.errors import UserError
from finetune.plan.estimate import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GIB, estimate
from finetune.plan.skeleton import CONFIG_DIR, Skeleton

# Drafter hub ids whose config ships with finetune (lower-cased).
BUNDLED_DRAFTERS = {
    "google/gemma-4-12b-it-assistant": "gemma-4-12b-assistant.json",
    "gemma-4-12b-it-assistant": "gemma-4-12b-assistant.json",
}
LORA_DRAFTER = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "pre_projection", "post_projection")


@dataclasses.dataclass
class DrafterShape:
    source: str
    total: int              # parameters (the tied output embedding once)
    lora: dict[str, tuple[int, int]]  # module -> (in, out) of the linears a drafter LoRA targets
    hidden: int
    heads: int
    layers: list[tuple[str, int, int, int]]  # (layer type, q width, MLP width, head size)
    ordered: bool
    gathered_rows: int      # output rows the centroid mask gathers per position (top_k × vocab/centroids)


def drafter_config(path: str | None):
    """The drafter's config: a local folder, a bundled known drafter, or the hub (cache first)."""
    from transformers import AutoConfig

    if path is None:
        raise UserError("drafter.path", "no drafter to plan for",
                        "Set drafter.path (google/gemma-4-12B-it-assistant for the 12B)")
    p = Path(path).expanduser()
    if p.is_dir():
        return AutoConfig.from_pretrained(str(p)), str(p / "config.json")
    bundled = BUNDLED_DRAFTERS.get(path.lower())
    if bundled:
        raw = json.loads((CONFIG_DIR / bundled).read_text())
        raw.pop("_source", None)
        return AutoConfig.for_model(raw.pop("model_type"), **raw), f"bundled:{bundled}"
    from finetune.drafter.model import read_config

    return read_config(path), f"hub:{path}"


def drafter_shape(config, source: str) -> DrafterShape:
    import torch
    from torch import nn
    from transformers import Gemma4UnifiedAssistantForCausalLM

    with torch.device("meta"):
        model = Gemma4UnifiedAssistantForCausalLM(config)
    text = config.get_text_config()
    lora = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LORA_DRAFTER}
    layers = [(text.layer_types[i], layer.self_attn.q_proj.out_features, layer.mlp.down_proj.in_features,
               layer.self_attn.head_dim) for i, layer in enumerate(model.model.layers)]
    ordered = bool(config.use_ordered_embeddings)
    rows = config.centroid_intermediate_top_k * (text.vocab_size // config.num_centroids) if ordered else 0
    return DrafterShape(source, sum(p.numel() for p in model.parameters()), lora, text.hidden_size,
                        text.num_attention_heads, layers, ordered, rows)


def _kv_layers(target_config) -> list[tuple[str, int, int]]:
    """(type, kv heads, head size) of every target layer."""
    text = target_config.get_text_config()
    return [(t, text.per_layer_config[i].num_key_value_heads, text.per_layer_config[i].head_dim)
            for i, t in enumerate(text.layer_types)]


def estimate_drafter(recipe, sk: Skeleton, device: str, target_config, shape: DrafterShape) -> dict:
    """Bytes per item of one drafter-alignment step (see the module docstring); the same keys as
    `finetune.plan.estimate.estimate` returns, so `finetune plan` shows it the same way."""
    d, t = recipe.drafter, recipe.train
    target = estimate(recipe, sk, device)  # the target's weights, as calibrated there
    ab = target["compute_bytes"]
    B, S, N, k, V, H = t.batch_size, recipe.data.max_seq_len, d.continuation_tokens, d.num_tokens, sk.vocab, sk.hidden
    T, Q = S + N, N - 1
    text = target_config.get_text_config()
    window = text.sliding_window

    items: dict[str, float] = {key: target["items"][key] for key in
                               ("linear_weights", "unquantized_weights", "cublas_workspace", "dequant_buffer")
                               if key in target["items"]}
    if d.adapter or recipe.lora.r:
        items["target_adapter"] = target["lora_params"] * 4  # frozen, fp32 as trained
    if d.method == "lora":
        trainable = sum(d.lora_r * (i + o) for i, o in shape.lora.values())
        items["drafter_weights"] = (shape.total + trainable) * 4
        modules = len(shape.lora)
    else:
        trainable = shape.total
        items["drafter_weights"] = shape.total * 4
        modules = len(shape.layers)
    items["drafter_grads"] = trainable * 4
    items["optimizer_states"] = (2 * trainable + 8 * math.ceil(trainable / 256) if "8bit" in t.optimizer
                                 else 8 * trainable)

    kv = _kv_layers(target_config)
    inter = max(layer.inter for layer in sk.layers) if sk.layers else 4 * H
    q_out = max(layer.q_out for layer in sk.layers) if sk.layers else H
    masks = sk.layer_types * B * T * T  # bool 4-D masks built from the 2-D padding mask
    layer_transient = B * T * (3 * inter + 3 * q_out + 4 * H) * ab
    cache = sum(B * (min(T, window) if kind == "sliding_attention" else T) * heads * dim * 2 * ab
                for kind, heads, dim in kv)
    stored = {kind: (heads, dim) for kind, heads, dim in kv}  # the last of each type is what's shared
    shared_kv = sum(B * T * heads * dim * 2 * ab for heads, dim in stored.values())
    persistent = {"target_hidden_and_kv": B * T * H * ab + shared_kv,
                  "target_log_probs": B * N * V * 4}
    phases = {
        "continuation": {"kv_cache": cache, "attention_masks": masks, "layer_transients": layer_transient},
        "target forward": {"attention_masks": masks, "layer_transients": layer_transient,
                           "logits_transient": B * N * V * 4},
    }
    # one drafter step: layer inputs and MLP/attention intermediates in fp32, the kv per layer
    # cast and repeated to every head, and the two [Q, V] fp32 terms of the loss it keeps
    per_step = B * Q * (2 * H + 2 * shape.hidden) * 4
    for _, q_width, mlp, dim in shape.layers:
        heads_kv = B * T * shape.heads * dim * 2 * 4
        per_step += B * Q * (8 * shape.hidden + 3 * mlp + 3 * q_width) * 4 + heads_kv
    per_step += 2 * B * Q * V * 4
    feedback = B * Q * shape.gathered_rows * shape.hidden * 4 if shape.ordered else 0
    phases["drafter"] = {"drafter_activations": k * per_step, "kv_in_fp32": shared_kv * 4 // ab,
                         "loss_transients": 2 * B * Q * V * 4 + feedback}
    name, worst = max(phases.items(), key=lambda kv_: sum(kv_[1].values()))
    items.update(persistent)
    items.update(worst)
    allocated = sum(items.values())
    if device == "cuda":
        items["allocator_slack"] = ALLOCATOR_SLACK * allocated
        items["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return {"items": items, "allocated": allocated, "phase": name, "tokens": B * T, "lora_params": trainable,
            "lora_modules": modules, "media": target["media"], "compute_bytes": ab,
            "drafter": {"source": shape.source, "params": shape.total, "trainable": trainable, "method": d.method}}
