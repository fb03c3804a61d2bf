"""FSDP2 for the loop: the base, the LoRA weights and the optimizer state split across processes.

Asked for through accelerate: `accelerate launch --config_file configs/accelerate/fsdp2.yaml`
sets `ACCELERATE_USE_FSDP` and the `FSDP_*` settings, which accelerate's plugin reads. The
sharding itself (torch's `fully_shard`: each decoder layer a unit, the rest with the root) is done
here, the same way on GPUs and on CPU processes (gloo), where accelerate itself only runs DDP: so
the CPU tests exercise the code the GPUs run. The loop's model is then never passed to
`accelerator.prepare` (accelerate would re-map an optimizer built on already sharded weights).

What needs every rank (collectives) lives here too: the full adapter and optimizer state for a
checkpoint (gathered, then written by the main process in the single-process layout), and
loading them back (each rank keeps its shard).
"""

from __future__ import annotations

import os

import torch

from finetune.errors import UserError

SHARDED_OPTIMIZER = "fqn"  # trainer_state.json's "optimizer_format" for a state keyed by name


def fsdp_plugin():
    """accelerate's FSDP settings when the launch asked for FSDP (else None); FSDP1 is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise UserError("accelerate config", f"fsdp_version {version}: finetune shards with FSDP2 only",
                        "Launch with configs/accelerate/fsdp2.yaml (fsdp_version: 2)")
    return FullyShardedDataParallelPlugin(fsdp_version=2)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model, plugin, layer_classes: list[str]) -> None:
    """`fully_shard` in place: every module of a class in `layer_classes` (the plugin's
    `transformer_cls_names_to_wrap` when set) one unit, then the root with the rest.

    The root keeps its parameters (embeddings tied to the head, norms, the media embedders)
    gathered from its forward to its backward: the chunked loss reads the head's weight
    outside the decoder's forward."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    names = set(plugin.transformer_cls_names_to_wrap or layer_classes)
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward}
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # fsdp_offload_params: true (not tested here)
        kwargs["offload_policy"] = plugin.cpu_offload
    units = [m for m in model.modules() if type(m).__name__ in names]
    if not units:
        raise UserError("accelerate config", f"no module of the classes {sorted(names)} to shard",
                        "Leave fsdp_transformer_layer_cls_to_wrap unset: finetune shards the decoder layers")
    model.usage = Usage(model, units)  # its hooks go first, before FSDP's own
    for m in units:
        fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)


class Usage:
    """Which trainable modules of the root unit (the vision and audio embedders' LoRA: not every
    micro-batch has an image or a clip) ran, so every rank gives FSDP a gradient for each.

    FSDP2 reduce-scatters the gradients a rank has: if one rank's batch had an image and the
    other's not, their collectives would differ in size (gloo aborts). A module that did not run
    in a micro-batch is added to its loss times 0 (its gradient 0, the loss unchanged); at the end
    of the step a module no rank ran gets its gradient dropped (None), so AdamW skips it exactly
    as it does on one process (and DDP) for weights without a gradient."""

    def __init__(self, root, units):
        inside = {id(p) for u in units for p in u.parameters()}
        self.modules = [m for m in root.modules() if any(
            p.requires_grad and id(p) not in inside for p in m.parameters(recurse=False))]
        self.ran = [False] * len(self.modules)     # this micro-batch
        self.step_ran = [False] * len(self.modules)  # any micro-batch of this step
        for i, m in enumerate(self.modules):
            m.register_forward_pre_hook(lambda *_, i=i: self._mark(i))
        root.register_forward_pre_hook(lambda *_: self._reset())
        root.register_forward_hook(lambda _m, _a, out: self._touch(out))

    def _mark(self, i: int) -> None:
        if torch.is_grad_enabled():  # an eval pass (or DPO's reference pass) makes no gradient
            self.ran[i] = self.step_ran[i] = True

    def _reset(self) -> None:
        self.ran = [False] * len(self.modules)

    def _touch(self, out):
        loss, metrics = out
        idle = [p for m, ran in zip(self.modules, self.ran) if not ran
                for p in m.parameters(recurse=False) if p.requires_grad]
        if idle and loss.requires_grad:
            loss = loss + sum(p.sum() for p in idle) * 0.0
        return loss, metrics

    def drop_unused(self, device) -> None:
        """After the step's backward: gradients of modules no rank ran → None. Collective."""
        import torch.distributed as dist

        ran = torch.tensor([float(x) for x in self.step_ran], device=device)
        if dist.is_initialized():
            dist.all_reduce(ran)
        # a weight tied into a module that ran keeps its gradient (a drafter's embedding is its head)
        used = {id(p) for m, n in zip(self.modules, ran.tolist()) if n for p in m.parameters(recurse=False)}
        for m, n in zip(self.modules, ran.tolist()):
            if n == 0:
                for p in m.parameters(recurse=False):
                    if id(p) not in used:
                        p.grad = None
        self.step_ran = [False] * len(self.modules)


def describe(model) -> str:
    """What this process holds of the sharded weights, for the log (4-bit weights counted apart)."""
    total = local = four_bit = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if hasattr(p, "to_local"):
                size = p.numel() * p.element_size()
                total += size
                local += p.to_local().numel() * p.element_size()
                four_bit += size if type(m).__name__ == "Linear4bit" and p is m.weight else 0
    mib = 2**20
    return (f"fsdp: {total / mib:,.1f} MiB of weights sharded ({four_bit / mib:,.1f} MiB of them 4-bit), "
            f"{local / mib:,.1f} MiB on this process")


def set_gradient_sync(model, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (FSDP's no_sync)."""
    model.set_requires_gradient_sync(sync)


def clip_grad_norm(model, max_norm: float) -> None:
    """The norm over every shard (torch reduces the DTensor norms across ranks)."""
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def full_adapter_state(model, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every LoRA (and trainable) weight gathered whole, keyed as in the PEFT model under the
    loop's `LossForward` (`prefix` removed). Collective: every rank calls it; all get the result."""
    out = {}
    for name, p in model.named_parameters():
        if not (p.requires_grad or "lora_" in name) or not name.startswith(prefix):
            continue
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name[len(prefix):]] = full.detach().cpu().contiguous()
    return out


def full_objective_state(model) -> dict[str, torch.Tensor]:
    """The weights the objective owns (LossForward.objective), gathered whole. Collective."""
    out = {}
    for name, p in model.objective.state_dict().items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().cpu().contiguous()
    return out


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer state gathered whole and keyed by parameter name. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """A full, name-keyed optimizer state back into this rank's shards. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_for_save(model, optimizer) -> dict:
    """What a checkpoint (or, without `optimizer`, an adapter) needs, gathered whole. Collective."""
    full = {"adapter": full_adapter_state(model), "objective": full_objective_state(model)}
    if optimizer is not None:
        full["optimizer"] = full_optimizer_state(model, optimizer)
    return full


def load_adapter_state(model, weights: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """PEFT-layout adapter weights (no adapter name in the keys) into the shards. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = {}
    for name, _ in model.named_parameters():
        key = name.removeprefix("model.").replace(f".{adapter}.", ".")
        if "lora_" in name and f".{adapter}." in name and key in weights:
            state[name] = weights[key]
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))

