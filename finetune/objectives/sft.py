"""Supervised fine-tuning: cross-entropy on the label tokens, the rest of the sequence context.

The summed loss is normalised by the label tokens of the whole accumulation window (the
loop's job), never per micro-batch: image and audio positions carry no loss, and counting them
would skew every step. With `train.chunked_ce` the 262k-vocabulary logits exist one chunk of
label positions at a time (`finetune.objectives.losses`).
"""

from __future__ import annotations

import torch

from data_tools.render import IGNORE
from finetune.model.load import unwrap
from finetune.model.memory_tricks import offload_activations, offload_mode
from finetune.objectives.base import Objective, register
from finetune.objectives.losses import chunked_ce_sum, full_ce_sum


def loss_labels(batch: dict) -> torch.Tensor:
    """Labels that carry loss. In a packed row the first token of each sample would be
    predicted from the previous sample's last token: those positions (position id 0) never
    count, exactly as position 0 of an unpacked row never does."""
    labels = batch["labels"]
    if "position_ids" in batch:
        labels = labels.masked_fill(batch["position_ids"].to(labels.device) == 0, IGNORE)
    return labels


def n_labels(batch: dict) -> int:
    return int((loss_labels(batch)[:, 1:] != IGNORE).sum())


def loss_sum(model, batch: dict, *, chunked: bool, chunk_size: int | None = None,
             offload: bool = False) -> torch.Tensor:
    """Summed CE over label tokens of one micro-batch (see finetune.objectives.losses)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = loss_labels(batch)
    if chunked:
        cg = unwrap(model)
        # Only the decoder's saved tensors are offloaded; the CE chunks recompute their logits.
        with offload_activations(offload):
            hidden = cg.model(**inputs, use_cache=False).last_hidden_state
        cap = cg.config.get_text_config().final_logit_softcapping
        return chunked_ce_sum(hidden, labels, cg.lm_head.weight, cap, chunk_size)
    with offload_activations(offload):
        logits = model(**inputs, use_cache=False).logits
    return full_ce_sum(logits, labels)


@register("sft")
class SFT(Objective):
    """Next-token cross-entropy on what the model writes when served."""

    def __init__(self, recipe):
        super().__init__(recipe)
        t = recipe.train
        self.chunked, self.chunk_size = t.chunked_ce, t.ce_chunk_size
        self.offload = offload_mode(t)

    def weight(self, batch: dict) -> int:
        return n_labels(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return loss_sum(model, batch, chunked=self.chunked, chunk_size=self.chunk_size,
                        offload=self.offload), {}
