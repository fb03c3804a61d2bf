"""Peak GPU memory of one GRPO step (`train.objective: grpo`); pure arithmetic.

One step has three phases, one at a time, over the same weights (the base as
`finetune.plan.estimate` counts it, the LoRA and the optimizer's states):

1. *rollouts* (no grad, eval mode; before the step, so no LoRA grads exist): one prompt's group
   at a time, G = `grpo.group_size` rows of up to P = `data.max_seq_len` prompt tokens plus
   N = `grpo.max_new_tokens` new ones. The KV cache (sliding layers keep their window, full
   layers every token, k and v per layer), the prefill's masks and one layer's transients over
   G·P tokens, and the sampling step's fp32 logits over the vocabulary (soft-cap, temperature,
   top-p's sorted copy);
2. *reference / old policy* (no grad; only with `grpo.beta` > 0 or `grpo.iterations` > 1): a
   forward over the training rows that keeps nothing per layer: the hidden-state pair, one
   MLP's intermediates, the masks and one logits chunk;
3. *the policy step*: B·G rows (B = `train.batch_size` prompts) of P + N tokens, each with its
   prompt's media, through `finetune.plan.estimate` as a LoRA step with chunked log-probs.

The peak is the largest phase on top of what persists. Not measured on a GPU yet.
"""

from __future__ import annotations

import dataclasses

from finetune.objectives.losses import ce_chunk_rows
from finetune.plan.estimate import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GIB, estimate, mask_bytes
from finetune.plan.skeleton import Skeleton

WEIGHTS = ("linear_weights", "unquantized_weights", "lora_weights", "optimizer_states", "cublas_workspace",
           "dequant_buffer")
OUTSIDE = ("allocator_slack", "cuda_context")
SAMPLING_COPIES = 3  # fp32 logits of the last position: soft-capped, tempered, top-p's sorted copy


def estimate_grpo(recipe, sk: Skeleton, device: str, config) -> dict:
    """Bytes per item of one GRPO step (see the module docstring); the keys of
    `finetune.plan.estimate.estimate`, plus `grpo` (the shapes planned)."""
    g, t, d = recipe.grpo, recipe.train, recipe.data
    P, N, G, B = d.max_seq_len, g.max_new_tokens, g.group_size, t.batch_size
    S, rows = P + N, B * G
    step_recipe = dataclasses.replace(recipe, data=dataclasses.replace(d, max_seq_len=S),
                                      train=dataclasses.replace(t, objective="sft", batch_size=rows, chunked_ce=True))
    step = estimate(step_recipe, sk, device)
    ab = step["compute_bytes"]
    items = {k: v for k, v in step["items"].items() if k not in OUTSIDE}
    weights = {k: v for k, v in items.items() if k in WEIGHTS}

    text = config.get_text_config()
    window = getattr(text, "sliding_window", None) or S
    kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * len(sk.layers))
    cache = sum(G * (min(S, window) if kind == "sliding_attention" else S) * 2 * L.kv_heads * L.head_dim * ab
                for kind, L in zip(kinds, sk.layers))
    inter = max((L.inter for L in sk.layers), default=4 * sk.hidden)
    q_out = max((L.q_out for L in sk.layers), default=sk.hidden)
    rollout = {"rollout_kv_cache": cache,
               "rollout_prefill_masks": mask_bytes(sk, t.attention, G, P),
               "rollout_prefill_layer": G * P * (3 * inter + 3 * q_out + 4 * sk.hidden) * ab,
               "rollout_sampling_logits": SAMPLING_COPIES * G * sk.vocab * 4}
    phases = {"rollouts": weights | rollout, "policy step": items}
    if g.beta or g.iterations > 1:
        tokens = rows * S
        phases["reference forward"] = weights | {
            "reference_forward": tokens * (2 * ab * sk.hidden + 3 * ab * inter) + 8 * sk.vocab * ce_chunk_rows(sk.vocab),
            "attention_masks": mask_bytes(sk, t.attention, rows, S)}
    name, chosen = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    allocated = sum(chosen.values())
    out = dict(chosen)
    if device == "cuda":
        out["allocator_slack"] = ALLOCATOR_SLACK * allocated
        out["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return {**step, "items": out, "allocated": allocated, "phase": name,
            "grpo": {"rows": rows, "seq_len": S, "group_size": G, "new_tokens": N, "rollout_kv_cache_bytes": cache,
                     "phases_gib": {k: round(sum(v.values()) / GIB, 3) for k, v in phases.items()}}}
