"""The optimizer (`train.optimizer`) and the learning-rate schedule (`train.scheduler`)."""

from __future__ import annotations

import math

import torch


def make_optimizer(params, t, device: str):
    params = [p for p in params if p.requires_grad]
    name = t.optimizer
    if name == "adamw":
        # One fused kernel per step instead of a dozen foreach passes (CPU and CUDA alike); the
        # update is the same AdamW.
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                 fused=device in ("cpu", "cuda"))
    import bitsandbytes as bnb

    if name.startswith("paged") and device != "cuda":
        name = name.removeprefix("paged_")  # paging needs CUDA unified memory
    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit, "adamw": torch.optim.AdamW}[name]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, t):
    """Warmup (steps, or a fraction of max_steps), then cosine, linear or constant."""
    warmup = int(t.warmup * t.max_steps) if t.warmup < 1 else int(t.warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if t.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, t.max_steps - warmup)
        if t.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
