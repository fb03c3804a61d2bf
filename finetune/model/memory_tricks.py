"""Memory tricks, each a named function behind a recipe flag, each leaving the loss unchanged
(tests/test_train.py holds loss and gradients against the plain path).

- `offload_activations` (`train.offload_activations`): tensors saved for backward wait in
  pinned host memory. Under non-reentrant checkpointing the only tensors a decoder layer saves
  outside its own recompute are its inputs (tokens × hidden × 48 layers on the 12B: 1.4 GiB
  at 4k tokens), so those leave the GPU.
- `tile_mlp` (`train.mlp_tile_tokens`): each decoder layer's MLP runs over the sequence in
  tiles, each under its own recompute. The MLP is position-wise, so the result is the same;
  the backward of a layer then holds one tile's MLP intermediates (gate/up/activation outputs
  at 15360 wide, LoRA inputs) instead of the whole sequence's, for one extra MLP forward.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch.utils.checkpoint import checkpoint


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


class TiledMLP(torch.nn.Module):
    """`mlp(x)` over sequence tiles of `tokens`, each checkpointed when gradients are on.

    The wrapped module's children are registered on the wrapper under their own names, so every
    parameter keeps its name (`...mlp.gate_proj.lora_A...`): adapters save, load and export as
    without tiling. The wrapped module itself is held outside the module tree; apply this after
    LoRA is attached (PEFT replaces children by name)."""

    def __init__(self, mlp: torch.nn.Module, tokens: int):
        super().__init__()
        object.__setattr__(self, "inner", mlp)
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= self.tokens or not torch.is_grad_enabled():
            return self.inner(x)
        tiles = x.split(self.tokens, dim=-2)
        return torch.cat([checkpoint(self.inner, t, use_reentrant=False) for t in tiles], dim=-2)


def tile_mlp(model: torch.nn.Module, tokens: int, pattern: str) -> int:
    """Wrap every module whose full name matches `pattern` in a `TiledMLP`; how many were."""
    matched = [name for name, m in model.named_modules()
               if re.fullmatch(pattern, name) and not isinstance(m, TiledMLP)]
    for name in matched:
        model.set_submodule(name, TiledMLP(model.get_submodule(name), tokens))
    return len(matched)


def untile_mlp(model: torch.nn.Module) -> int:
    """Undo `tile_mlp`: every `TiledMLP` back to the module it wraps; how many were."""
    tiled = [name for name, m in model.named_modules() if isinstance(m, TiledMLP)]
    for name in tiled:
        model.set_submodule(name, model.get_submodule(name).inner)
    return len(tiled)
