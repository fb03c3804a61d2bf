"""The GRPO demo's fixtures: its recipe, and the brief SFT that gives GRPO its starting adapter.

GRPO needs a policy that is sometimes right: on a random tiny base every sampled answer scores
0 and every advantage is 0. A short SFT on the same three tasks (image colour, audio pitch, text
facts) leaves held-out exact match well below 1 on each, with room for the rewards to act.
"""

from __future__ import annotations

from pathlib import Path

GRPO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo-demo.yaml"
SFT_STEPS = 40  # 16 samples a step at lr 2e-3: ~0.25-0.6 held-out exact match per modality
SFT_SETTINGS = {"objective": "sft", "reference_adapter": None, "max_steps": SFT_STEPS, "lr": 0.002,
                "warmup": 10, "scheduler": "cosine"}
# The SFT's mix: text twice the weight of a picture or a tone file, where GRPO gives it four times
# (its 8 facts are few prompts; a text-heavier SFT left the pictures too weak to learn from)
SFT_WEIGHTS = {"train_text.jsonl": 2.0}
ROLLOUT_PROMPTS = 12  # held-out prompts the rollout speed is measured on (spread over modalities)


def sft_recipe(recipe):
    """The GRPO demo recipe as the SFT run it starts from, into `<output_dir>/sft`."""
    from finetune.config.recipe import recipe_from_dict

    raw = recipe.to_dict()
    raw["train"].update(SFT_SETTINGS, output_dir=str(Path(recipe.train.output_dir) / "sft"))
    for ds in raw["datasets"]:
        ds["weight"] = SFT_WEIGHTS.get(Path(ds["path"]).name, ds["weight"])
    return recipe_from_dict(raw, recipe.source)
