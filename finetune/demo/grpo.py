"""The GRPO demo's fixtures: its recipe, its data's reply form, and the brief SFT it starts from.

GRPO needs a policy that is sometimes right: on a random tiny base every sampled answer scores
0 and every advantage is 0. A short SFT on the same three tasks (image colour, audio pitch, text
facts) leaves held-out exact match well below 1 on each, with room for the rewards to act.
"""

from __future__ import annotations

from pathlib import Path

from finetune.demo.data import DATA_VERSION as DEMO_DATA_VERSION
from finetune.demo.data import make_demo_data

GRPO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo-demo.yaml"
SFT_STEPS = 40  # 16 samples a step at lr 2e-3: ~0.1-0.55 held-out exact match per modality
SFT_SETTINGS = {"objective": "sft", "reference_adapter": None, "max_steps": SFT_STEPS, "lr": 0.002,
                "warmup": 10, "scheduler": "cosine"}
# The SFT's mix is the recipe's (text 4: its 8 facts are few prompts) but for the pictures, which
# GRPO gives twice the tones' weight: held-out image exact match gained 0.08-0.17 at weight 1
SFT_WEIGHTS = {"train_image.jsonl": 1.0}
# The answer first, then a tail the drafter can guess: the choice RL reinforces is still the
# first token the model writes (as with one-word replies, where every modality gained), and a
# reply of more than one word and the end of turn leaves the aligned drafter tokens to draft.
# ("It is {}." put the choice last: audio stayed at 0.50 and the speed-up was 1.72x.)
REPLY = "{} is the answer."
SYSTEM = "Answer in one short sentence."
DATA_VERSION = f"{DEMO_DATA_VERSION}-reply-first"  # older GRPO demo data (one-word) is written again
ROLLOUT_PROMPTS = 12  # held-out prompts the rollout speed is measured on (spread over modalities)


def sft_recipe(recipe):
    """The GRPO demo recipe as the SFT run it starts from, into `<output_dir>/sft`."""
    from finetune.config.recipe import recipe_from_dict

    raw = recipe.to_dict()
    raw["train"].update(SFT_SETTINGS, output_dir=str(Path(recipe.train.output_dir) / "sft"))
    for ds in raw["datasets"]:
        ds["weight"] = SFT_WEIGHTS.get(Path(ds["path"]).name, ds["weight"])
    return recipe_from_dict(raw, recipe.source)


def make_grpo_data(out, seed: int = 0) -> Path:
    """The bundled demo's data, every answer written as `REPLY`."""
    return make_demo_data(out, seed, reply=REPLY, system=SYSTEM)
