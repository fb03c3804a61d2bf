"""Activation offload (`train.offload_activations`): saved tensors wait in host memory.

Under non-reentrant checkpointing the only tensors a decoder layer saves outside its own
recompute are its inputs, so this moves the checkpointed layer inputs (tokens × hidden × 48
layers on the 12B) off the GPU. The loss is unchanged (tests/test_train.py checks it).
"""

from __future__ import annotations

import contextlib

import torch


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for backward go to CPU memory (pinned on CUDA) and come back on unpack.

    Parameters (frozen or LoRA) are never copied, nor tensors under `min_bytes`.
    `saved_bytes` counts what went through (tests check the mechanism ran).
    """

    def __init__(self, min_bytes: int = 1024):
        self.saved_bytes = 0
        pin = torch.cuda.is_available()

        def pack(t: torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if isinstance(t, torch.nn.Parameter) or nbytes < min_bytes:
                return t
            self.saved_bytes += nbytes
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin and t.is_cuda)
            host.copy_(t, non_blocking=t.is_cuda)
            return (t.device, host)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)


def offload_activations(enabled: bool):
    """Context: checkpointed layer inputs live in (pinned) CPU memory until backward needs them."""
    return ActivationOffload() if enabled else contextlib.nullcontext()
