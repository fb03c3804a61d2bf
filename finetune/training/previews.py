"""Previews during training: the model's greedy answers to the first held-out samples.

They come from the held-out samples the trainer already holds (rendered, media included):
each is cut where its last answer starts, which is exactly the served prompt, and the label
tokens after the cut are the reference. Nothing is read or rendered again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data_tools.collate import collate
from data_tools.render import IGNORE


def answer_start(labels) -> int:
    """Index where the sample's last labelled answer begins (its served prompt ends there)."""
    labels = list(labels)
    end = max((i for i, x in enumerate(labels) if x != IGNORE), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start


def prompt_batch(sample: dict, pad_id: int) -> tuple[dict, list[int]]:
    """(model inputs of the served prompt, the reference answer's token ids)."""
    cut = answer_start(sample["labels"])
    reference = [int(x) for x in sample["labels"][cut:] if x != IGNORE]
    prompt = {k: sample[k][:cut] for k in ("input_ids", "labels", "mm_token_type_ids")}
    for k in ("pixel_values", "image_position_ids", "input_features"):
        if k in sample:
            prompt[k] = sample[k]  # media sit in the prompt: the answer is text
    batch = collate([prompt], pad_id)
    batch.pop("labels")
    return batch, reference


def preview_rows(model, processor, chat, samples, n: int, max_new_tokens: int) -> list[dict]:
    """{id, modality, reference, output} for the first `n` of `samples`."""
    from finetune.model.generate import greedy

    tok = processor.tokenizer
    rows = []
    for j in range(min(n, len(samples))):
        s = samples[j]
        batch, reference = prompt_batch(s, tok.pad_token_id)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        output = greedy(model, processor, chat, batch, max_new_tokens=max_new_tokens)[0]
        rows.append({"id": s.get("origin", str(j)), "modality": s.get("modality", ""),
                     "reference": tok.decode(reference, skip_special_tokens=True).strip(), "output": output})
    return rows


def write_previews(rows: list[dict], out: Path, step: int, tensorboard=None) -> None:
    """Append to previews.jsonl; with a tensorboard writer, also as text."""
    with open(out / "previews.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"step": step} | r) + "\n")
    if tensorboard is not None:
        text = "\n\n".join(f"**{r['id']}** ({r['modality']}): `{r['output']}` — reference `{r['reference']}`"
                           for r in rows)
        tensorboard.add_text("previews", text, step)
