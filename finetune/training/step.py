"""One optimizer step: token-weighted accumulation over the window, across processes.

The loss of a step is the objective's summed loss over all `grad_accum` micro-batches of all
processes divided by their total weight (label tokens for SFT), so a batch of 4 and 4 batches
of 1 give the same gradients. Metrics are normalised the same way.
"""

from __future__ import annotations

import contextlib

import torch

from finetune.training.sharding import clip_grad_norm, is_sharded, set_gradient_sync
from finetune.training.wrappers import LossForward


def optimizer_step(model, optimizer, scheduler, micro: list[dict], acc, objective,
                   max_grad_norm: float) -> tuple[float, int, dict[str, float]]:
    """(mean loss, total weight, mean metrics) of one step over the micro-batches `micro`."""
    local = torch.tensor(float(sum(objective.weight(b) for b in micro)), device=acc.device)
    total = float(acc.reduce(local, reduction="sum")) if acc.num_processes > 1 else float(local)
    total = max(total, 1.0)
    loss_total = 0.0
    sums: dict[str, float] = {}
    sharded = is_sharded(model)
    for i, batch in enumerate(micro):
        sync = i == len(micro) - 1
        if sharded:
            set_gradient_sync(model, sync)
        ctx = contextlib.nullcontext() if sync or sharded else acc.no_sync(model)
        with ctx:
            ls, metrics = forward_loss(model, objective, batch)
            # DDP (and FSDP) average gradients over processes; scale back so the step is a true mean.
            acc.backward(ls * acc.num_processes / total)
        loss_total += float(ls.detach())
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if sharded:
        model.usage.drop_unused(acc.device)
    if max_grad_norm > 0 and sharded:
        clip_grad_norm(model, max_grad_norm)
    elif max_grad_norm > 0:
        acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if acc.num_processes > 1:
        vec = torch.tensor([loss_total, *sums.values()], device=acc.device)
        loss_total, *rest = acc.reduce(vec, reduction="sum").tolist()
        sums = dict(zip(sums, rest))
    return loss_total / total, int(total), {k: v / total for k, v in sums.items()}


def forward_loss(model, objective, batch: dict):
    """Through the (DDP-wrapped) LossForward when training; a bare PEFT model works too."""
    inner = model.module if hasattr(model, "module") else model
    if isinstance(inner, LossForward):
        return model(batch)
    return objective.loss(model, batch)
