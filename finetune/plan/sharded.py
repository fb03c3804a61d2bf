"""Per-GPU memory on several GPUs: DDP keeps the whole model on each, FSDP2 shards it.

Pure arithmetic over one GPU's estimate (`finetune.plan.estimate`); each process still runs
`train.batch_size` samples, so activations, the loss and the batch stay per GPU as they are.

- **DDP**: every GPU holds the whole model, and DDP's reducer keeps its own flat buckets of the
  trainable gradients (a second copy of the LoRA gradients).
- **FSDP2** (`finetune.training.sharding`: each decoder layer a unit, the rest the root):
  parameters, LoRA gradients and optimizer state are split N ways. bitsandbytes' quantization
  metadata (absmax, code tables) is not a parameter: it stays whole on every GPU. While a step
  runs, the root unit (the embedding tied to the head, the norms, the media embedders) is
  gathered whole from its forward to its backward, and two decoder layers are gathered at a time
  (the one running and the next, prefetched), their LoRA weights and, in backward, LoRA
  gradients with them.
"""

from __future__ import annotations

from finetune.plan.estimate import ALLOCATOR_SLACK, estimate, quant_tensor_bytes

STRATEGIES = ("ddp", "fsdp")
GATHERED_LAYERS = 2  # the layer running and the next one, prefetched
SEQ_UNIT = 256       # max_seq_len is searched in steps of this
SEQ_LIMIT = 512      # ... up to 512 × 256 = 131,072 tokens


def per_gpu(recipe, sk, est: dict, gpus: int, strategy: str) -> dict:
    """`est` (one GPU's estimate) as each of `gpus` GPUs sees it under `strategy`."""
    if gpus == 1:
        return est
    items = dict(est["items"])
    items.pop("allocator_slack", None)
    context = items.pop("cuda_context", None)
    if strategy == "ddp":
        items["ddp_grad_buckets"] = items["lora_grads"]
    else:
        _shard(items, recipe, sk, est, gpus)
    allocated = sum(items.values())
    if context is not None:  # a CUDA plan: the same slack and context as one GPU's
        items["allocator_slack"] = ALLOCATOR_SLACK * allocated
        items["cuda_context"] = context
    return {**est, "items": items, "allocated": allocated, "gpus": gpus, "strategy": strategy}


def _shard(items: dict, recipe, sk, est: dict, n: int) -> None:
    q, ab = recipe.model, est["compute_bytes"]
    own, meta = {}, 0  # weight bytes by tensor name (what is sharded); metadata (kept whole)
    for name, numel, out in sk.quant_tensors:
        own[name], m = quant_tensor_bytes(numel, out, q.quantization, q.double_quant, ab)
        meta += m
    layers = [sum(b for name, b in own.items() if name.startswith(L.prefix + ".")) for L in sk.layers]
    root = sum(own.values()) - sum(layers) + items["unquantized_weights"]
    lora_layer = items["lora_weights"] / max(1, len(sk.layers))  # LoRA spread over the layers
    items["linear_weights"] = sum(own.values()) / n + meta
    items["unquantized_weights"] /= n
    for k in ("lora_weights", "lora_grads", "optimizer_states", "optimizer_step_temporaries"):
        if k in items:
            items[k] /= n
    items["fsdp_gathered_root"] = root  # gathered into new memory beside this GPU's shard
    # each gathered layer: its weights and LoRA weights, and in backward its LoRA gradients
    items["fsdp_gathered_layers"] = GATHERED_LAYERS * (max(layers, default=0) + 2 * lora_layer)


def sharded(step, gpus: int, strategy: str):
    """The estimator `step` (recipe, skeleton, device → estimate) per GPU of `gpus`."""
    if gpus == 1:
        return step
    return lambda r, sk, device: per_gpu(r, sk, step(r, sk, device), gpus, strategy)


def longest_seq_len(recipe, sk, device: str, budget_gib: float, step) -> int | None:
    """The longest `data.max_seq_len` (a multiple of 256, up to 131,072) whose step fits."""
    import dataclasses

    from finetune.plan.estimate import GIB

    def fits(units: int) -> bool:
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_seq_len=units * SEQ_UNIT))
        return sum(step(r, sk, device)["items"].values()) / GIB <= budget_gib

    lo, hi, best = 1, SEQ_LIMIT, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(mid):
            best, lo = mid * SEQ_UNIT, mid + 1
        else:
            hi = mid - 1
    return best


def step_estimator(recipe, config):
    """The step to plan: an objective that trains weights of its own (the drafter) says how."""
    from finetune.objectives import get

    return get(recipe.train.objective).plan_step(recipe, config) or estimate
