"""Memory tricks, each a named function behind a recipe flag, each leaving the loss unchanged
(tests/training/test_train.py holds loss and gradients against the plain path).

- `offload_activations` (`train.offload_activations`): tensors saved for backward wait in
  pinned host memory. Under non-reentrant checkpointing the only tensors a decoder layer saves
  outside its own recompute are its inputs (tokens × hidden × 48 layers on the 12B: 1.4 GiB
  at 4k tokens), so those leave the GPU. `train.offload_prefetch` overlaps the copies with
  compute (a side stream) and brings each input back one layer ahead.
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


class _Offloaded:
    """One saved tensor in host memory: where it goes back to, and its copy back if prefetched."""

    __slots__ = ("device", "host", "index", "stored", "fetched", "ready")

    def __init__(self, device, host, index: int, stored):
        self.device, self.host, self.index, self.stored = device, host, index, stored
        self.fetched = self.ready = None


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Tensors saved for backward go to CPU memory (pinned on CUDA) and come back on unpack.

    Parameters (frozen or LoRA) are never copied, nor tensors under `min_bytes`.
    `saved_bytes` counts what went through, `prefetched` the copies back started ahead (tests
    check the mechanism ran). With `prefetch` (`train.offload_prefetch`) the copies run on a side
    CUDA stream, so they overlap the layers' compute instead of queueing behind it, and unpacking
    one tensor starts copying back the one saved before it (backward goes in reverse): one more
    layer input sits on the GPU, ready when the previous layer's recompute needs it.
    """

    def __init__(self, min_bytes: int = 1024, prefetch: bool = False):
        self.saved_bytes = self.prefetched = 0
        pin = torch.cuda.is_available()
        side = torch.cuda.Stream() if prefetch and pin else None
        items: list[_Offloaded] = []

        def pack(t: torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if isinstance(t, torch.nn.Parameter) or nbytes < min_bytes:
                return t
            self.saved_bytes += nbytes
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin and t.is_cuda)
            item = _Offloaded(t.device, host, len(items), None)
            if side is not None and t.is_cuda:
                side.wait_stream(torch.cuda.current_stream())  # t is complete
                with torch.cuda.stream(side):
                    host.copy_(t, non_blocking=True)
                    item.stored = torch.cuda.Event()
                    item.stored.record(side)
                t.record_stream(side)  # the allocator keeps t until the copy is done
            else:
                host.copy_(t, non_blocking=t.is_cuda)
            if prefetch:
                items.append(item)
            return item

        def fetch(item: _Offloaded) -> None:
            """Start the copy back (on the side stream when there is one)."""
            if item.fetched is not None:
                return
            if side is not None and item.device.type == "cuda":
                with torch.cuda.stream(side):  # after the copy out: same stream
                    item.fetched = item.host.to(item.device, non_blocking=True)
                    item.ready = torch.cuda.Event()
                    item.ready.record(side)
            else:
                item.fetched = item.host.to(item.device, non_blocking=item.host.is_pinned())

        def unpack(item):
            if isinstance(item, torch.Tensor):
                return item
            if item.fetched is None and item.stored is not None:  # not prefetched: wait for the copy out
                torch.cuda.current_stream().wait_event(item.stored)
            fetch(item)
            t, item.fetched = item.fetched, None
            if item.ready is not None:
                torch.cuda.current_stream().wait_event(item.ready)
                t.record_stream(torch.cuda.current_stream())
            if prefetch and item.index > 0:
                before = items[item.index - 1]
                if before.fetched is None and before.host is not None:
                    fetch(before)
                    self.prefetched += 1
            item.host = None  # unpacked once (no retain_graph here): the host copy can go
            return t

        super().__init__(pack, unpack)


def offload_mode(train) -> bool | str:
    """What `offload_activations` gets for a recipe's `train:` section: off on a CPU-only run
    (host memory is the GPU's overflow; there it would only copy), else on, with prefetch if asked."""
    if not (train.offload_activations and torch.cuda.is_available()):
        return False
    return "prefetch" if train.offload_prefetch else True


def offload_activations(enabled: bool | str):
    """Context: checkpointed layer inputs live in (pinned) CPU memory until backward needs them;
    `enabled == "prefetch"`: copied on a side stream, the next one back ahead of time."""
    if not enabled:
        return contextlib.nullcontext()
    return ActivationOffload(prefetch=True) if enabled == "prefetch" else ActivationOffload()


class TokenTiles(torch.nn.Module):
    """A module run in sequence tiles of `tokens`: the wrapped module's children are registered
    on the wrapper under their own names, so every parameter keeps its name (adapters save, load
    and export as without tiling). The wrapped module itself is held outside the module tree as
    `inner`; apply this after LoRA is attached (PEFT replaces children by name)."""

    def __init__(self, module: torch.nn.Module, tokens: int):
        super().__init__()
        object.__setattr__(self, "inner", module)
        for name, child in module.named_children():
            self.add_module(name, child)
        self.tokens = tokens


class TiledMLP(TokenTiles):
    """`mlp(x)` over sequence tiles of `tokens`, each checkpointed when gradients are on
    (parameters keep their names: `...mlp.gate_proj.lora_A...`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= self.tokens or not torch.is_grad_enabled():
            return self.inner(x)
        tiles = x.split(self.tokens, dim=-2)
        return torch.cat([checkpoint(self.inner, t, use_reentrant=False) for t in tiles], dim=-2)


def matching(model: torch.nn.Module, pattern: str, kind: type) -> list[str]:
    """Full names of the modules matching `pattern` that are not wrapped in `kind` already."""
    return [name for name, m in model.named_modules() if re.fullmatch(pattern, name) and not isinstance(m, kind)]


def wrap_named(model: torch.nn.Module, names: list[str], make) -> int:
    """Each module named in `names` replaced by `make(module)`; how many were."""
    for name in names:
        model.set_submodule(name, make(model.get_submodule(name)))
    return len(names)


def unwrap_wrappers(model: torch.nn.Module, kind: type) -> int:
    """Every `kind` wrapper (its module held as `inner`) back to the module it wraps; how many were."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, kind)]
    return wrap_named(model, wrapped, lambda m: m.inner)


def tile_mlp(model: torch.nn.Module, tokens: int, pattern: str) -> int:
    """Wrap every module whose full name matches `pattern` in a `TiledMLP`; how many were."""
    return wrap_named(model, matching(model, pattern, TiledMLP), lambda m: TiledMLP(m, tokens))


def untile_mlp(model: torch.nn.Module) -> int:
    """Undo `tile_mlp`: every `TiledMLP` back to the module it wraps; how many were."""
    return unwrap_wrappers(model, TiledMLP)
