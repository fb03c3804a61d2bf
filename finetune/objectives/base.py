"""The objective contract and its registry: how a micro-batch becomes a summed loss.

The training loop (`finetune.training`) is shared by every objective: micro-batches,
token-weighted accumulation, checkpoints and exact resume, DDP, metrics, progress bar, eval
loss and previews. An objective says only what differs, through the attributes and methods of
`Objective` below; each has a default that is right for plain LoRA training (SFT).

Objectives are `torch.nn.Module`s, so weights one owns (a drafter, say) train, synchronise
under DDP and checkpoint with the model's. `@register("name")` makes one available to
`train.objective: name`; objectives of feature packages outside this one (the drafter, GRPO)
are listed in `FEATURES` and imported the first time their name is asked for.
"""

from __future__ import annotations

import torch

from finetune.errors import UserError
from finetune.registry import Registry

FEATURES = {"drafter": "finetune.drafter.objective", "grpo": "finetune.grpo.objective"}
_REGISTRY = Registry("objective", FEATURES)


class Objective(torch.nn.Module):
    """The contract between the loop and an objective. Override what differs."""

    name: str = ""
    """The `train.objective` value (set by `@register`)."""
    metrics: tuple[str, ...] = ()
    """Names `loss` returns besides the loss, logged to metrics.jsonl and the bar (summed values)."""
    formats: tuple[str, ...] | None = None
    """Dataset formats it trains on (None: any but preference); the recipe check refuses others."""
    packs: bool = True
    """Whether `train.packing` may put several samples in one row (then `pack` makes the rows);
    False: the recipe check refuses `train.packing: true` before anything loads."""
    uses_reference: bool = False
    """Whether `loss` runs a no-grad reference pass (the adapter switched off, or
    `train.reference_adapter`); `finetune plan` counts it and the recipe allows the key."""
    rows_per_sample: int = 1
    """Sequences one sample becomes in a micro-batch (2 for a chosen/rejected pair): what
    `finetune plan` multiplies activations by."""
    previews: bool = True
    """Whether greedy previews of held-out answers (`train.preview_every`) mean anything for it."""
    shards: bool = True
    """Whether it runs under FSDP2 (`configs/accelerate/fsdp2.yaml`); False: refused before training."""
    trains_model: bool = True
    """Whether the model holds the trained weights (checkpoints then carry its adapter), or only the
    objective's own parameters train (a drafter aligned to a frozen target)."""
    saves_as: str = "adapter"
    """The folder under `train.output_dir` that `save` writes ("" = the run folder itself)."""
    steps_per_batch: int = 1
    """Optimizer steps each window of micro-batches is presented for (GRPO's `iterations`: several
    updates on one batch of rollouts); the data position advances after the last of them."""

    def __init__(self, recipe):
        super().__init__()
        self.recipe = recipe
        # Under FSDP2 the sharded root (`LossForward`), set by the loop: a pass outside `loss` that
        # runs the model (GRPO's rollouts) gathers the root's weights around it.
        self.__dict__["root"] = None

    @classmethod
    def check(cls, recipe) -> list[UserError]:
        """Problems of `recipe` for this objective, found before anything loads (default: none)."""
        return []

    @classmethod
    def plan_step(cls, recipe, config):
        """`finetune plan`'s estimator for one step of this objective where it differs from the
        LoRA step's (a function `(recipe, skeleton, device) -> estimate`; `config` is the base's
        config), or None."""
        return None

    def setup(self, model, family):
        """The loaded, frozen base → the model the loop trains, returned.

        It may only add to the model it is given (LoRA layers, a loaded adapter) and returns it;
        weights the objective trains itself become its own parameters. Default: the recipe's LoRA."""
        from finetune.model.lora import attach_lora

        return attach_lora(model, self.recipe.lora, family)

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        """Rendered samples → one micro-batch (default: padded to the longest, tails trimmed)."""
        from data_tools.collate import collate

        return collate(samples, pad_id, trim_tail=True)

    def pack(self, rows: list[list[dict]], pad_id: int, sliding_window: int, layer_types: list[str]) -> dict:
        """Rows of samples → one packed micro-batch (`train.packing`, only if `packs`): each row
        one sequence under a block-diagonal 4-D mask, position ids restarting per sample (under
        `train.attention: blocked` the masks stay lazy: built a query block at a time)."""
        from data_tools.collate import collate_packed

        lazy = self.recipe.train.attention == "blocked"
        return collate_packed(rows, pad_id, sliding_window, layer_types, trim_tail=True, lazy_masks=lazy)

    def save(self, model, out, state_dict: dict | None = None, objective_state: dict | None = None) -> None:
        """Write what was trained to `out` (default: the PEFT adapter folder). When the model is
        sharded (FSDP) the weights come gathered whole: `state_dict` the adapter's,
        `objective_state` the objective's own (its `state_dict()` keys)."""
        model.save_pretrained(out, state_dict=state_dict)

    def weight(self, batch: dict) -> int:
        """What the step's loss is averaged over, known before any forward pass (label tokens for
        SFT, pairs for preference losses). The loop sums it over the accumulation window and every
        process, so 4 micro-batches of 1 and 1 of 4 give the same gradients."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(summed loss, {metric: summed value}) of the micro-batch; the loop divides both by the
        window's total weight."""
        raise NotImplementedError


register = _REGISTRY.register
unregister = _REGISTRY.unregister
names = _REGISTRY.names


def get(name: str) -> type[Objective] | None:
    return _REGISTRY.get(name)


def build(recipe) -> Objective:
    """The recipe's objective (the recipe validator has checked the name)."""
    return get(recipe.train.objective)(recipe)
