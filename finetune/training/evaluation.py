"""What the loop runs between steps on held-out data: the eval loss (by modality) and previews."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.model.load import held_out_mode, unwrap
from finetune.training.batches import branch_aware
from finetune.training.sharding import is_sharded
from finetune.training.step import forward_loss
from finetune.training.wrappers import to_device


def eval_loss(model, objective, data, pad_id, dtype, device) -> dict:
    """Mean loss (per the objective's weight) on the eval set, overall and by sample modality.

    One sample per forward: the per-modality sums need per-sample losses, and the eval set
    is small. Runs on every rank (no gradients, so no DDP involvement; a sharded model through its
    root module, which gathers the weights)."""
    peft_model = unwrap(model, peft=True)
    make = branch_aware(objective.collate, objective.pack if objective.packs else None,
                        unwrap(model).config.get_text_config())
    run = model if is_sharded(model) else peft_model
    sums: dict[str, list[float]] = {}
    with held_out_mode(peft_model), torch.no_grad():
        for j in range(len(data)):
            s = data[j]
            b = to_device(make([s], pad_id), device, dtype)
            ls, _ = forward_loss(run, objective, b)
            acc = sums.setdefault(s["modality"], [0.0, 0])
            acc[0] += float(ls)
            acc[1] += objective.weight(b)
    out = {f"eval_loss_{m}": v[0] / max(1, v[1]) for m, v in sums.items()}
    out["eval_loss"] = sum(v[0] for v in sums.values()) / max(1, sum(v[1] for v in sums.values()))
    return out


def preview(model, processor, chat, recipe, held_out, out: Path, step: int, log, acc) -> None:
    """Answers to the first held-out samples: console, previews.jsonl, tensorboard text."""
    from finetune.training.previews import preview_rows, write_previews

    rows = preview_rows(unwrap(model, peft=True), processor, chat, held_out, recipe.train.preview_items,
                        recipe.eval.max_new_tokens)
    writer = acc.get_tracker("tensorboard", unwrap=True) if "tensorboard" in recipe.train.report_to else None
    write_previews(rows, out, step, writer)
    for r in rows:
        log(f"preview step {step} [{r['id']}]: {r['output']!r} (reference {r['reference']!r})")
