"""The preference demo's data: the bundled demo's three tasks as preference pairs, in TRL's layouts.

Each prompt has a right answer (chosen) and a wrong one (rejected):
- image: the dominant colour of a picture, against another colour (conversational prompt, the
  picture from the `images` column);
- audio: whether a tone is high or low, against the other (plain-text prompt, `audios` column);
- text: the capital of an invented country, against another country's capital (implicit prompt:
  two whole conversations that differ in the last answer).
Held-out pairs are new pictures and tones, and records asking for the facts trained on (each in
all three phrasings, against a freshly drawn wrong capital). A random
tiny base prefers either side about half the time; after DPO the adapter should prefer the right
one and answer it greedily (`finetune.workflows.demo.run_preference_demo`).
"""

from __future__ import annotations

import random
from pathlib import Path

from finetune.demo.data import (
    AUDIO_Q,
    CAPITALS,
    COLOURS,
    IMAGE_Q,
    SYSTEM,
    TEXT_Q,
    write_image,
    write_jsonl_files,
    write_tone,
)

PREFERENCE_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "preference-demo.yaml"


def _image_pair(i: int, split: str, out: Path, rng: random.Random) -> dict:
    colour = list(COLOURS)[i % len(COLOURS)]
    rel = f"images/{split}_{i:04d}.png"
    write_image(colour, rng, out / rel)
    wrong = rng.choice([c for c in COLOURS if c != colour])
    return {"id": f"{split}-image-{i}",
            "prompt": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(IMAGE_Q)}]}],
            "chosen": [{"role": "assistant", "content": colour}],
            "rejected": [{"role": "assistant", "content": wrong}], "images": [rel]}


def _audio_pair(i: int, split: str, out: Path, rng: random.Random) -> dict:
    high = i % 2 == 0
    rel = f"audio/{split}_{i:04d}.wav"
    write_tone(high, rng, out / rel)
    right, wrong = ("high", "low") if high else ("low", "high")
    return {"id": f"{split}-audio-{i}", "prompt": rng.choice(AUDIO_Q), "chosen": right, "rejected": wrong,
            "audios": [rel]}


def _text_pair(country: str, question: str, split: str, tag: str, rng: random.Random) -> dict:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question.format(c=country)}]
    wrong = rng.choice([cap for c, cap in CAPITALS.items() if c != country])
    return {"id": f"{split}-text-{country}-{tag}",
            "chosen": prompt + [{"role": "assistant", "content": CAPITALS[country]}],
            "rejected": prompt + [{"role": "assistant", "content": wrong}]}


def make_preference_data(out: str | Path, seed: int = 0, *, n_image: int = 160, n_audio: int = 160,
                         n_text_repeat: int = 12, n_eval_each: int = 24) -> Path:
    """Write train_{image,audio,text}.jsonl, eval.jsonl + media under `out` (seeded)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files: dict[str, list[dict]] = {"train_image.jsonl": [], "train_audio.jsonl": [], "train_text.jsonl": [],
                                    "eval.jsonl": []}
    files["train_image.jsonl"] = [_image_pair(i, "train", out, rng) for i in range(n_image)]
    files["train_audio.jsonl"] = [_audio_pair(i, "train", out, rng) for i in range(n_audio)]
    files["train_text.jsonl"] = [_text_pair(c, TEXT_Q[r % len(TEXT_Q)], "train", str(r), rng)
                                 for r in range(n_text_repeat) for c in CAPITALS]
    held = [p for i in range(n_eval_each) for p in (_image_pair(i, "eval", out, rng), _audio_pair(i, "eval", out, rng))]
    held += [_text_pair(c, q, "eval", str(k), rng) for k, q in enumerate(TEXT_Q) for c in CAPITALS]
    files["eval.jsonl"] = held
    write_jsonl_files(out, files, rng)
    return out
