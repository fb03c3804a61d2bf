"""One measured training step of ours on the GPU run's model: the trainer's own step
(`finetune.training.step.optimizer_step`) with a recipe's memory settings, peak memory and
tokens/s; and the step's top CUDA kernels."""

from __future__ import annotations

import gc
import time

import torch

GIB = 2**30


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fresh(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(device: str) -> dict:
    if device != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            # the reserved pool + CUDA context + anything else on the card
            "device_used_gib": round((total - free) / GIB, 3)}


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    from finetune.training.wrappers import to_device as move

    return move(batch, device, dtype)


def run_ours(model, recipe, family, batches: list[dict], device: str, dtype, objective=None) -> dict:
    """Optimizer steps of one micro-batch each through the trainer's own step; the first is a
    warm-up (kernels, allocator) and is not timed."""
    from accelerate import Accelerator

    from finetune.model.attention import set_attention
    from finetune.model.memory_tricks import tile_mlp, untile_mlp
    from finetune.model.tiled_attention import tile_attention, untile_attention
    from finetune.objectives import build
    from finetune.training.optim import make_optimizer, make_scheduler
    from finetune.training.step import optimizer_step

    t = recipe.train
    untile_mlp(model)
    if t.mlp_tile_tokens:
        tile_mlp(model, t.mlp_tile_tokens, family.mlp_blocks)
    set_attention(model, t.attention, t.attention_block_rows)
    untile_attention(model)
    if t.tile_attention:
        tile_attention(model, t.attention_block_rows, family.attention_blocks)
    acc = Accelerator(cpu=device == "cpu")
    objective = objective or build(recipe)
    optimizer = make_optimizer([*model.parameters(), *objective.parameters()], t, device)
    scheduler = make_scheduler(optimizer, t)
    _fresh(device)
    losses, times, tokens = [], [], 0
    for i, batch in enumerate(batches):
        b = to_device(batch, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        loss, _, _ = optimizer_step(model, optimizer, scheduler, [b], acc, objective, t.max_grad_norm)
        _sync(device)
        losses.append(round(loss, 4))
        if i:
            times.append(time.perf_counter() - t0)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch and \
                not isinstance(batch["attention_mask"], dict) else int((batch["input_ids"] >= 0).sum())
    out = {"losses": losses, **_memory(device),
           "tokens_per_s": round(tokens / sum(times), 1) if times else None,
           "step_seconds": round(sum(times) / len(times), 3) if times else None}
    del optimizer, scheduler, objective
    for p in model.parameters():
        p.grad = None
    untile_mlp(model)
    set_attention(model, "sdpa")
    _fresh(device)
    return out


def profile_step(model, recipe, family, batch: dict, device: str, dtype, top: int = 25) -> list[dict]:
    """The top CUDA kernels (by total time) of one step of ours."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return []
    run_ours(model, recipe, family, [batch], device, dtype)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_ours(model, recipe, family, [batch], device, dtype)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    total = sum(e.device_time_total for e in prof.key_averages())
    return [{"kernel": e.key[:90], "ms": round(e.device_time_total / 1e3, 1),
             "share": round(e.device_time_total / max(total, 1), 3), "calls": e.count} for e in rows]
