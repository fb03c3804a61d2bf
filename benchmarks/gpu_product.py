"""The rest of the product on the GPU run's 12B: a DPO step (a pair = 2 rows of 2,048 tokens), the
drafter-alignment step (a random drafter of the shipped one's shape) and a GRPO step (group 8,
256 new tokens) where that objective exists; each through the trainer's own step, with
`finetune plan`'s figure for the same recipe next to what the card held."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from benchmarks.gpu_build import make_sample, preference_pair
from benchmarks.gpu_steps import run_ours

ROOT = Path(__file__).resolve().parents[1]
DPO_RECIPE = ROOT / "recipes/gemma4-12b/preference-dpo.yaml"
DRAFTER_RECIPE = ROOT / "recipes/gemma4-12b/drafter/align-image-qa.yaml"
ASSISTANT_CONFIG = ROOT / "finetune/configs/gemma-4-12b-assistant.json"
GRPO_RECIPE = ROOT / "recipes/gemma4-12b/grpo.yaml"
GRPO = {"group": 8, "new_tokens": 256}


def _planned(recipe) -> dict:
    from finetune.plan.report import plan

    p = plan(recipe, device="cuda")
    return {"planned_gib": p["peak_gib"], "planned_allocated_gib": p["allocated_gib"],
            "planned_reserved_gib": p["reserved_gib"]}


def dpo_step(model, family, config, common: list[str], seq: int, device: str, dtype, media: dict) -> dict:
    """DPO with the base as reference (adapter off), one pair a step, two steps (the first warms)."""
    from finetune.config.recipe import load_recipe
    from finetune.objectives import build

    recipe = load_recipe(DPO_RECIPE, [*common, f"data.max_seq_len={seq}", "train.reference_adapter=",
                                      "train.batch_size=1", "train.grad_accum=1"])
    objective = build(recipe)
    pad = config.get_text_config().pad_token_id or 0
    batches = [objective.collate([preference_pair(config, seq, seed=s, **media)], pad) for s in range(2)]
    out = run_ours(model, recipe, family, batches, device, dtype, objective=objective)
    return {"seq_len": seq, "rows": 2, **out, **_planned(recipe)}


def write_drafter(config, processor_from: str, out: Path, device: str) -> Path:
    """A random drafter of the shipped 12B drafter's shape (the bundled assistant config), saved as
    `finetune align-drafter` reads one; on the CPU dry run, the tiny base's drafter."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    from finetune.drafter.model import save_drafter

    if device == "cpu":
        from finetune.demo.tiny_drafter import write_tiny_drafter

        return write_tiny_drafter(processor_from, out)
    raw = {k: v for k, v in json.loads(ASSISTANT_CONFIG.read_text()).items() if not k.startswith("_")}
    cfg = Gemma4UnifiedAssistantConfig.from_dict(raw)
    with torch.device(device):
        drafter = Gemma4UnifiedAssistantForCausalLM(cfg).to(torch.bfloat16)
    save_drafter(drafter, out, num_tokens=4, tokenizer_from=processor_from, dtype=torch.bfloat16)
    del drafter
    return out


def drafter_step(model, family, config, common: list[str], processor_from: str, tmp: Path, device: str,
                 dtype, prompt_tokens: int) -> dict:
    """One drafter-alignment step after a warm-up: the target continues 2 served prompts greedily
    (the recipe's 64 tokens), the drafter unrolls its 4 drafts from every continuation token."""
    from finetune.config.recipe import load_recipe
    from finetune.objectives import build

    path = write_drafter(config, processor_from, tmp / "drafter", device)
    recipe = load_recipe(DRAFTER_RECIPE, [*common, f"model.base={processor_from}", f"drafter.path={path}",
                                          f"data.max_seq_len={prompt_tokens + 64}", "train.batch_size=1",
                                          "train.grad_accum=1"])
    objective = build(recipe)
    objective.setup(model, family)  # the trainable drafter (LoRA), its processor-derived stop ids
    objective.to(device)
    pad = config.get_text_config().pad_token_id or 0
    rng = random.Random(0)
    batches = [objective.collate([make_sample(config, rng, text=prompt_tokens - 64, answer=64, image_tokens=0,
                                              audio_s=0)], pad) for _ in range(2)]
    out = run_ours(model, recipe, family, batches, device, dtype, objective=objective)
    del objective
    return {"prompt_tokens": prompt_tokens, "continuation_tokens": recipe.drafter.continuation_tokens, **out,
            **_planned(recipe)}


def grpo_step(model, family, config, common: list[str], processor_from: str, device: str, dtype,
              prompt_tokens: int, new_tokens: int) -> dict:
    """Two GRPO steps (the first warms) of one prompt each: group 8 completions of `new_tokens`
    sampled from the LoRA policy, rewarded, then the clipped policy loss over them. The steps
    before froze the shared model, so its LoRA is made trainable again and only the rollout half
    of the objective's setup runs (the LoRA is already attached)."""
    from finetune.config.recipe import load_recipe
    from finetune.objectives import build

    recipe = load_recipe(GRPO_RECIPE, [*common, f"model.base={processor_from}", "train.reference_adapter=",
                                       f"data.max_seq_len={prompt_tokens}", f"grpo.group_size={GRPO['group']}",
                                       f"grpo.max_new_tokens={new_tokens}", "train.batch_size=1",
                                       "train.grad_accum=1"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    objective = build(recipe)
    objective.prepare_rollouts(model, family)
    pad = config.get_text_config().pad_token_id or 0
    rng = random.Random(0)
    samples = [make_sample(config, rng, text=prompt_tokens - 8, answer=8, image_tokens=0, audio_s=0) for _ in range(2)]
    batches = [objective.collate([dict(s, origin=f"bench-{i}")], pad) for i, s in enumerate(samples)]
    out = run_ours(model, recipe, family, batches, device, dtype, objective=objective)
    return {"group": GRPO["group"], "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, **out,
            **_planned(recipe)}
