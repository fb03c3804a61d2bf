"""Rollout speed with and without the drafter: tokens per target forward on held-out prompts.

The same prompts are rolled out twice from the recipe's policy (`train.reference_adapter`, or
the base), as GRPO samples them: batched without a drafter, one completion at a time with
`drafter.path` as transformers' assistant. Target forwards are counted per row
(finetune.grpo.rollout.ForwardCounter), so a batched forward over 8 rows counts 8: both ways
are measured per sequence, what a row costs the target. Both sample under the same seeds.
"""

from __future__ import annotations


def rollout_speed(recipe, samples: list[dict], *, seed: int = 0) -> dict:
    """{"plain": figures, "drafter": figures, "speedup": drafter / plain tokens per forward} for
    `samples` (rendered held-out samples; their prompts are used)."""
    from finetune.grpo.objective import GRPO
    from finetune.grpo.rollout import roll_out
    from finetune.model.load import base_family, load_recipe_base

    objective = GRPO(recipe)
    family = base_family(recipe.model.base, recipe.model.trust_remote_code)
    model = objective.setup(load_recipe_base(recipe.model), family)
    core = next(model.parameters())
    prompts = objective.collate(samples, objective.sampling.pad_id)["prompts"]
    prompts = [{k: v.to(core.device) for k, v in p.items()} for p in prompts]
    out = {}
    seeds = [seed + k for k in range(len(prompts))]
    for name, drafter in (("plain", None), ("drafter", objective.drafter)):
        _, fig = roll_out(model, prompts, objective.sampling, drafter, seeds)
        out[name] = {**fig, "seconds": round(fig["seconds"], 2),
                     "tokens_per_forward": round(fig["tokens"] / max(fig["forwards"], 1), 4)}
    out["speedup"] = round(out["drafter"]["tokens_per_forward"] / max(out["plain"]["tokens_per_forward"], 1e-9), 3)
    out["prompts"] = len(prompts)
    return out
