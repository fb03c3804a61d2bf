"""The model as the loop holds it: DDP around `LossForward` around PEFT around transformers.

`LossForward` puts the model and the objective in one module, so DDP (or FSDP) wraps a forward
that computes the whole loss. The objective's chunked path calls the inner transformers model
for hidden states; called from outside a DDP wrapper, that forward would skip DDP's own: no
gradient all-reduce, no search for unused LoRA parameters, and the ranks would drift apart.
"""

from __future__ import annotations

import torch


class LossForward(torch.nn.Module):
    def __init__(self, model, objective):
        super().__init__()
        self.model = model
        self.objective = objective  # a Module: weights it owns train and sync with the model's

    def forward(self, batch: dict):
        return self.objective.loss(self.model, batch)


def to_device(batch: dict, device, dtype: torch.dtype) -> dict:
    """Tensors to `device`; floating ones (pixels, audio frames) also to the compute dtype:
    under bitsandbytes the vision embedder can't cast them itself (its weight is uint8)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = {kk: vv.to(device) for kk, vv in v.items()}
        elif torch.is_tensor(v):
            v = v.to(device)
            out[k] = v.to(dtype) if v.is_floating_point() else v
        else:
            out[k] = v
    return out
