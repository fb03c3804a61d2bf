"""The GRPO demo's fixtures: its recipe, its data's reply form, and the brief SFT it starts from.

GRPO needs a policy that is sometimes right: on a random tiny base every sampled answer scores
0 and every advantage is 0. A short SFT on three tasks (image colour, audio pitch, and a text
task, `city_task`) leaves held-out exact match well below 1 on each, with room for the rewards
to act.

The text task is not the main demo's capitals. Its 8 held-out prompts are the 8 training facts,
and after the brief SFT the tiny base gave every country the same spread over the capitals
(p(right capital) 0.04-0.07): groups seldom held the right capital, RL learnt one country in
300 steps (+0.12, one item of 8). Naming the city hidden in a sentence is read from the prompt,
as a picture's colour is: it starts partly learnt, every group holds right and wrong answers,
and 24 new sentences are held out.
"""

from __future__ import annotations

from pathlib import Path

from finetune.demo.data import CAPITALS, make_demo_data
from finetune.demo.data import DATA_VERSION as DEMO_DATA_VERSION

GRPO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "grpo-demo.yaml"
SFT_STEPS = 40  # 16 samples a step at lr 2e-3: ~0.25-0.7 held-out exact match per modality
SFT_SETTINGS = {"objective": "sft", "reference_adapter": None, "max_steps": SFT_STEPS, "lr": 0.002,
                "warmup": 10, "scheduler": "cosine"}
# The SFT's mix (pictures 1, tones 1, text 4) differs from GRPO's (3, 1, 3): the SFT leaves each
# task partly learnt, and in GRPO the pictures are the slowest to gain.
SFT_WEIGHTS = {"train_image.jsonl": 1.0, "train_text.jsonl": 4.0}
# The answer first, then a tail the drafter can guess: the choice RL reinforces is still the
# first token the model writes (as with one-word replies, where every modality gained), and a
# reply of more than one word and the end of turn leaves the aligned drafter tokens to draft.
# ("It is {}." put the choice last: audio stayed at 0.50 and the speed-up was 1.72x.)
REPLY = "{} is the answer."
SYSTEM = "Answer in one short sentence."
DATA_VERSION = f"{DEMO_DATA_VERSION}-reply-first-city"  # older GRPO demo data is written again
ROLLOUT_PROMPTS = 12  # held-out prompts the rollout speed is measured on (spread over modalities)


def sft_recipe(recipe):
    """The GRPO demo recipe as the SFT run it starts from, into `<output_dir>/sft`."""
    from finetune.config.recipe import recipe_from_dict

    raw = recipe.to_dict()
    raw["train"].update(SFT_SETTINGS, output_dir=str(Path(recipe.train.output_dir) / "sft"))
    for ds in raw["datasets"]:
        ds["weight"] = SFT_WEIGHTS.get(Path(ds["path"]).name, ds["weight"])
    return recipe_from_dict(raw, recipe.source)


FILLERS = ("quick fox jumps over lazy model reads listens audio answers questions sees domain small "
           "short picture sunny rainy cloudy snowy").split()
CITY_Q = "Which city is named here: {}"


def city_task(rng, n_train: int = 192, n_held: int = 24, n_words: int = 5):
    """(train, held-out) (question, answer) pairs: a city hidden among filler words, to be named.
    The held-out sentences are new ones (each city equally often), so what is scored is reading
    the sentence, as the pictures and tones are new ones."""
    cities = list(CAPITALS.values())

    def item(i):
        city, words = cities[i % len(cities)], rng.sample(FILLERS, n_words - 1)
        words.insert(rng.randrange(n_words), city)
        return CITY_Q.format(" ".join(words)), city

    train = [item(i) for i in range(n_train)]
    seen, held = {q for q, _ in train}, []
    while len(held) < n_held:
        q, a = item(len(held))
        if q not in seen:
            held.append((q, a))
    return train, held


def make_grpo_data(out, seed: int = 0) -> Path:
    """The bundled demo's data, every answer written as `REPLY`."""
    return make_demo_data(out, seed, reply=REPLY, system=SYSTEM, text_task=city_task)
