"""The objective interface and its registry: how a micro-batch becomes a summed loss.

The training loop (`finetune.training`) is shared by every objective: micro-batches,
token-weighted accumulation, checkpoints and exact resume, DDP, metrics, progress bar, eval
loss and previews. An objective says only what differs:

- `weight(batch)`: what the step's loss is averaged over, known before any forward pass (label
  tokens for SFT, pairs for preference losses). The loop sums it over the accumulation window
  and every process, so 4 micro-batches of 1 and 1 of 4 give the same gradients;
- `loss(model, batch) -> (summed loss, {metric: summed value})`: sums over the micro-batch; the
  loop divides loss and metrics by the window's total weight;
- `metrics`: the names `loss` returns besides the loss, logged to metrics.jsonl and the bar;
- `formats`: the dataset formats it trains on (None: any);
- hooks with defaults for the usual LoRA training, overridden where an objective differs:
  `setup(model, family)` turns the loaded base into what trains (default: attach the recipe's
  LoRA), `collate(samples, pad_id)` makes a micro-batch of rendered samples (default: padded,
  tails trimmed), `save(model, out)` writes the result (default: the PEFT adapter), and
  `previews` says whether greedy previews of held-out answers mean anything for it;
- `saves_as`: the folder under `train.output_dir` that `save` writes ("adapter"; "" = the run
  folder itself), and `trains_model`: whether the model holds trained weights (checkpoints then
  carry its adapter) or only the objective does (a drafter aligned to a frozen target).

Objectives are `torch.nn.Module`s, so weights one owns (a drafter, say) train, synchronise
under DDP and checkpoint with the model's. `@register("name")` makes one available to
`train.objective: name`.
"""

from __future__ import annotations

import torch

_REGISTRY: dict[str, type[Objective]] = {}


class Objective(torch.nn.Module):
    metrics: tuple[str, ...] = ()
    formats: tuple[str, ...] | None = None
    previews: bool = True
    saves_as: str = "adapter"
    trains_model: bool = True

    def __init__(self, recipe):
        super().__init__()
        self.recipe = recipe

    def setup(self, model, family):
        """The loaded, frozen base → the model the loop trains (default: with the recipe's LoRA)."""
        from finetune.model import attach_lora

        return attach_lora(model, self.recipe.lora, family)

    def collate(self, samples: list[dict], pad_id: int) -> dict:
        """Rendered samples → one micro-batch (default: padded to the longest, tails trimmed)."""
        from data_tools.collate import collate

        return collate(samples, pad_id, trim_tail=True)

    def save(self, model, out, state_dict: dict | None = None) -> None:
        """Write what was trained to `out` (default: the PEFT adapter folder); `state_dict`: the
        adapter's weights gathered whole when the model is sharded (FSDP)."""
        model.save_pretrained(out, state_dict=state_dict)

    def weight(self, batch: dict) -> int:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def transformers_model(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def register(name: str):
    """Class decorator: `train.objective: name` builds this objective."""
    def add(cls: type[Objective]) -> type[Objective]:
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return add


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> type[Objective] | None:
    return _REGISTRY.get(name)


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(recipe) -> Objective:
    """The recipe's objective (the recipe validator has checked the name)."""
    return _REGISTRY[recipe.train.objective](recipe)
