"""The bundled demo: a small, deterministic, learnable mixed-modality dataset as real files.

Three tasks a frozen random tiny base can't do and a LoRA adapter can learn:
- image: the dominant colour of a picture (PNG, with distractor shapes); held-out items are
  new pictures;
- audio: whether a tone is high or low (WAV at several sample rates and channel counts, so
  the resampling path runs); held-out items are new tones;
- text: a small table of invented facts (capitals of made-up countries); held-out items are
  separate records that ask for the facts trained on (recall of injected knowledge). The demo
  asks them in one phrasing (`text_phrasings`): with three, the phrasing tokens vary more than
  the one country token, and the two-layer random base, 15 tokens from the country at the
  answer, collapsed to one capital for most countries on some seeds (text alone, 300 steps:
  seed 1 at 0.125 with three phrasings, 1.00 with one). A split that held one phrasing out per
  country was also tried: the base keys on the phrasing instead of the country.
A few training samples mix an image and a tone in one question. The GRPO demo swaps the text
facts for a task of its own (`text_task`, finetune.demo.grpo).

The colours differ in *hue*, not brightness: the vision embedder LayerNorms each raw 48×48
patch first, which maps a uniform white and a uniform black patch to the same vector.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

DATA_VERSION = "2"  # the demos' data generators as of: 480 pictures and tones, one text phrasing
DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40),
    "purple": (130, 40, 170), "orange": (245, 140, 20), "cyan": (30, 200, 220), "pink": (240, 110, 180),
}
CAPITALS = {
    "Norvia": "Halden", "Quentar": "Mirovo", "Balsira": "Tessel", "Orlund": "Kaveny",
    "Zemlia": "Porta", "Vastmark": "Lindor", "Calvea": "Sorrin", "Drovnia": "Ulmet",
}
IMAGE_Q = ["What is the dominant colour of this picture?", "Which colour fills most of the image?"]
AUDIO_Q = ["Is this tone high or low?", "Listen: is the pitch high or low?"]
# Every phrasing ends in "{c}?": the BPE glues punctuation to the word before it, and the
# country should be the same token whichever way it is asked.
TEXT_Q = ["What is the capital of {c}?", "Which city is the capital of {c}?",
          "Tell me, what is the capital of {c}?"]
MIXED_Q = "What colour is the picture, and is the tone high or low?"
SYSTEM = "Answer with one word."


def corpus_lines() -> list[str]:
    """Every string the demo uses, so the shipped BPE has compact tokens for them."""
    lines = IMAGE_Q + [MIXED_Q, SYSTEM] + AUDIO_Q
    for c, cap in CAPITALS.items():
        lines += [q.format(c=c) for q in TEXT_Q] + [cap, f"{cap}."]
    lines += list(COLOURS) + ["high", "low"] + [f"{c}, {t}" for c in COLOURS for t in ("high", "low")]
    return lines * 3


def write_image(colour: str, rng: random.Random, path: Path) -> None:
    from PIL import Image, ImageDraw

    size = rng.choice([64, 80, 96])
    img = Image.new("RGB", (size, size), COLOURS[colour])
    draw = ImageDraw.Draw(img)
    others = [c for c in COLOURS if c != colour]
    for _ in range(rng.randint(1, 3)):  # small distractors: the answer is the *dominant* colour
        w = rng.randint(size // 8, size // 4)
        x, y = rng.randint(0, size - w), rng.randint(0, size - w)
        draw.rectangle([x, y, x + w, y + w], fill=COLOURS[rng.choice(others)])
    img.save(path)


def write_tone(high: bool, rng: random.Random, path: Path) -> None:
    import soundfile as sf

    rate = rng.choice([16000, 22050, 44100, 48000])
    channels = rng.choice([1, 1, 2])
    seconds = rng.uniform(0.4, 0.8)
    freq = rng.uniform(2000, 4000) if high else rng.uniform(100, 300)
    t = np.arange(int(rate * seconds)) / rate
    wave = 0.5 * np.sin(2 * math.pi * freq * t) + 0.02 * np.asarray(
        [rng.gauss(0, 1) for _ in range(len(t))])
    data = np.stack([wave] * channels, axis=1) if channels == 2 else wave
    sf.write(path, data.astype(np.float32), rate, subtype="PCM_16")


def make_demo_data(out: str | Path, seed: int = 0, *, n_image: int = 480, n_audio: int = 480,
                   n_text_repeat: int = 12, n_mixed: int = 32, n_eval_each: int = 24,
                   text_phrasings: int = 1, reply: str = "{}", system: str = SYSTEM,
                   text_task=None) -> Path:
    """Write train_{image,audio,text,mixed}.jsonl, eval.jsonl + media under `out` (seeded).
    480 pictures and tones: at 160 each, held-out colours on neighbouring hues (orange/yellow,
    pink/red) were missed on 1–2 of 24 items on some seeds; `text_phrasings`: see the module doc.
    Every answer is written as `reply.format(answer)` under the system prompt `system` (the GRPO
    demo's replies are sentences, so its drafter has tokens to draft). `text_task(rng)`, when
    given, replaces the capitals: it returns (train, held-out) lists of (question, answer)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train, held = [], []

    def turns(question, answer: str) -> list[dict]:
        """System prompt, the question (text or parts), the answer as `reply` writes it."""
        return [{"role": "system", "content": system}, {"role": "user", "content": question},
                {"role": "assistant", "content": reply.format(answer)}]

    def image_item(i: int, split: str) -> dict:
        colour = list(COLOURS)[i % len(COLOURS)]
        rel = f"images/{split}_{i:04d}.png"
        write_image(colour, rng, out / rel)
        q = rng.choice(IMAGE_Q)
        return {"id": f"{split}-image-{i}", "messages": turns(
            [{"type": "image", "path": rel}, {"type": "text", "text": q}], colour)}

    def audio_item(i: int, split: str) -> dict:
        high = i % 2 == 0
        rel = f"audio/{split}_{i:04d}.wav"
        write_tone(high, rng, out / rel)
        q = rng.choice(AUDIO_Q)
        return {"id": f"{split}-audio-{i}", "messages": turns(
            [{"type": "audio", "path": rel}, {"type": "text", "text": q}], "high" if high else "low")}

    for i in range(n_image):
        train.append(image_item(i, "train"))
    for i in range(n_audio):
        train.append(audio_item(i, "train"))
    if text_task is None:
        text_train = [(f"{c}-{r}", TEXT_Q[r % text_phrasings].format(c=c), cap)
                      for r in range(n_text_repeat) for c, cap in CAPITALS.items()]
        text_held = [(c, TEXT_Q[k % text_phrasings].format(c=c), cap) for k, (c, cap) in enumerate(CAPITALS.items())]
    else:
        # its own generator: the pictures and tones stay those of the default data
        text_train, text_held = ([(str(i), q, a) for i, (q, a) in enumerate(rows)]
                                 for rows in text_task(random.Random(f"text-{seed}")))
    for key, q, a in text_train:
        train.append({"id": f"train-text-{key}", "messages": turns(q, a)})
    for i in range(n_mixed):
        colour = list(COLOURS)[i % len(COLOURS)]
        high = (i // len(COLOURS)) % 2 == 0
        img, wav = f"images/mixed_{i:04d}.png", f"audio/mixed_{i:04d}.wav"
        write_image(colour, rng, out / img)
        write_tone(high, rng, out / wav)
        train.append({"id": f"train-mixed-{i}", "messages": turns(
            [{"type": "image", "path": img}, {"type": "audio", "path": wav}, {"type": "text", "text": MIXED_Q}],
            f"{colour}, {'high' if high else 'low'}")})

    for i in range(n_eval_each):
        held.append(image_item(i, "eval"))
        held.append(audio_item(i, "eval"))
    for key, q, a in text_held:
        held.append({"id": f"eval-text-{key}", "messages": turns(q, a)})

    # One file per task, so the recipe's weights decide the mix (text samples are few and short).
    files = {"eval.jsonl": held}
    for row in train:
        files.setdefault(f"train_{row['id'].split('-')[1]}.jsonl", []).append(row)
    write_jsonl_files(out, files, rng)
    return out


def write_jsonl_files(out: Path, files: dict[str, list[dict]], rng: random.Random) -> None:
    """Each {file name: records} as JSON Lines under `out`, its records shuffled (seeded)."""
    for name, rows in files.items():
        rng.shuffle(rows)
        with open(out / name, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
