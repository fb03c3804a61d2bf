"""Rollout speed with and without the drafter: tokens per target forward on held-out prompts.

The same prompts are rolled out twice from the recipe's policy (`train.reference_adapter`, or
the base), as GRPO samples them: batched without a drafter, one completion at a time with
`drafter.path` as transformers' assistant. Target forwards are counted per row
(finetune.grpo.rollout.ForwardCounter), so a batched forward over 8 rows counts 8: both ways
are measured per sequence, what a row costs the target. Both sample under the same seeds.

Two settings: `served`, the rollouts as GRPO makes them (stopping at the end of turn, at most
`grpo.max_new_tokens`), and `fixed`, `drafter.continuation_tokens` tokens past any stop (as
serving benchmarks measure, `vllm bench --ignore-eos`): a two-token answer costs two target
forwards with or without a drafter (the prompt's, then one to verify), so short answers can't
show a drafter's gain.
"""

from __future__ import annotations

import dataclasses


def rollout_speed(recipe, samples: list[dict], *, seed: int = 0) -> dict:
    """{setting: {"plain": figures, "drafter": figures, "speedup"}} for `samples` (rendered
    held-out samples; their prompts are used), settings `served` and `fixed` (module docstring)."""
    from finetune.grpo.objective import GRPO
    from finetune.grpo.rollout import roll_out
    from finetune.model.load import base_family, load_recipe_base

    objective = GRPO(recipe)
    family = base_family(recipe.model.base, recipe.model.trust_remote_code)
    model = objective.setup(load_recipe_base(recipe.model), family)
    device = next(model.parameters()).device
    prompts = objective.collate(samples, objective.sampling.pad_id)["prompts"]
    prompts = [{k: v.to(device) for k, v in p.items()} for p in prompts]
    seeds = [seed + k for k in range(len(prompts))]
    fixed = dataclasses.replace(objective.sampling, stop_ids=[], max_new_tokens=recipe.drafter.continuation_tokens)
    out = {"prompts": len(prompts)}
    for setting, sampling in (("served", objective.sampling), ("fixed", fixed)):
        row = {}
        for name, drafter in (("plain", None), ("drafter", objective.drafter)):
            _, fig = roll_out(model, prompts, sampling, drafter, seeds)
            row[name] = {**fig, "seconds": round(fig["seconds"], 2),
                         "tokens_per_forward": round(fig["tokens"] / max(fig["forwards"], 1), 4)}
        row["speedup"] = round(row["drafter"]["tokens_per_forward"] / max(row["plain"]["tokens_per_forward"], 1e-9), 3)
        out[setting] = row
    return out
