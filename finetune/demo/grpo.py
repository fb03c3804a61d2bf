"""The GRPO demo's fixtures: its recipe, and the brief SFT that gives GRPO its starting adapter.

GRPO needs a policy that is sometimes right: on a random tiny base every sampled answer scores
0 and every advantage is 0. A short SFT on the same three tasks (image colour, audio pitch, text
facts) leaves held-out exact match well below 1 on each, with room for the rewards to act.
"""

from __future__ import annotations

from pathlib import Path

GRPO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo-demo.yaml"
SFT_STEPS = 60  # 16 samples a step at lr 2e-3: ~0.55-0.75 held-out exact match per modality
SFT_SETTINGS = {"objective": "sft", "reference_adapter": None, "max_steps": SFT_STEPS, "lr": 0.002,
                "warmup": 10, "scheduler": "cosine"}
ROLLOUT_PROMPTS = 12  # held-out prompts the rollout speed is measured on (spread over modalities)


def sft_recipe(recipe):
    """The GRPO demo recipe as the SFT run it starts from, into `<output_dir>/sft`."""
    from finetune.config.recipe import recipe_from_dict

    raw = recipe.to_dict()
    raw["train"].update(SFT_SETTINGS, output_dir=str(Path(recipe.train.output_dir) / "sft"))
    return recipe_from_dict(raw, recipe.source)
