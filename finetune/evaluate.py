"""Base vs adapter, item by item, on held-out samples.

Scores: exact match (case/punctuation-insensitive), token F1, and character/word error rate
for transcription-like answers. The same greedy generation as serving (finetune.generation).
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data_tools.conversation import BadRecord, Conversation


def _norm(s: str) -> str:
    return re.sub(r"[^\w\s,]", "", s.lower()).strip()


def exact_match(pred: str, ref: str) -> float:
    return float(_norm(pred) == _norm(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = _norm(pred).split(), _norm(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def _edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(pred: str, ref: str) -> float:
    r = _norm(ref)
    return _edit_distance(list(_norm(pred)), list(r)) / max(1, len(r))


def wer(pred: str, ref: str) -> float:
    r = _norm(ref).split()
    return _edit_distance(_norm(pred).split(), r) / max(1, len(r))


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "cer": cer, "wer": wer}
LOWER_IS_BETTER = {"cer", "wer"}


def accuracy_by_modality(items, outputs: list[str]) -> dict:
    """{modality: {"accuracy", "n"}} by exact match: the demo's eval.json shape."""
    acc: dict[str, list[float]] = defaultdict(list)
    for it, out in zip(items, outputs):
        acc[it.conv.modality()].append(exact_match(out, it.reference))
    return {m: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for m, v in sorted(acc.items())}


# ---------------------------------------------------------------- held-out items and batched generation


@dataclass
class EvalItem:
    id: str
    dataset: str
    metric: str
    conv: Conversation  # the prompt turns and the reference answer (last message)
    images: list
    audios: list

    @property
    def reference(self) -> str:
        return self.conv.messages[-1].text().strip()


# ---------------------------------------------------------------- items


def _load_media(conv: Conversation, data) -> tuple[list, list]:
    from data_tools.media import load_media

    return load_media(conv, data)


def _held_out_origins(recipe, processor) -> set[str]:
    """The records the trainer held out (data.eval_fraction): the data pipeline decides, and its
    cache makes asking it again cheap."""
    from data_tools.pipeline import prepare
    from finetune.model import base_family

    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = prepare(recipe, processor, recipe.model.base, rejects_path=out / "rejects.jsonl",
                 chat=base_family(recipe.model.base, recipe.model.trust_remote_code).chat, log=None).eval
    return set(ev.table["origin"]) if hasattr(ev, "table") else {s["origin"] for s in ev}


def eval_items(recipe, processor, limit: int | None = None, log=print) -> tuple[list[EvalItem], int]:
    """(items, skipped): held-out chat records ending in an answer, with decoded media."""
    from data_tools.formats import parse_record
    from data_tools.sources import iter_records

    specs, held = recipe.eval_datasets, None
    if not specs:
        specs = recipe.datasets
        if recipe.data.eval_fraction > 0:
            held = _held_out_origins(recipe, processor)
        else:
            log("note: no eval_datasets and data.eval_fraction is 0: evaluating on the training data")
    items, skipped = [], 0
    for i, spec in enumerate(specs):
        name = f"{i}:{Path(spec.path).name}"  # the data pipeline's dataset name
        for origin, record, base_dir in iter_records(spec):
            if limit is not None and len(items) >= limit:
                return items, skipped
            if held is not None and origin not in held:
                continue
            try:
                if isinstance(record, BadRecord):
                    raise record
                conv = parse_record(record, spec.format, origin, base_dir)
                last = conv.messages[-1]
                if conv.kind != "chat" or last.role != "assistant" or not last.text().strip():
                    raise BadRecord("no_answer", "nothing to compare against", origin)
                images, audios = _load_media(conv, recipe.data)
            except BadRecord:
                skipped += 1  # training already reported it (rejects.jsonl)
                continue
            rid = record.get("id") if isinstance(record.get("id"), (str, int)) else None
            items.append(EvalItem(str(rid) if rid is not None else origin, name,
                                  spec.metric or recipe.eval.metric, conv, images, audios))
    return items, skipped


# ---------------------------------------------------------------- batched greedy generation


@torch.no_grad()
def generate_batch(model, processor, convs: list[Conversation], images: list[list], audios: list[list], *,
                   max_new_tokens: int, image_tokens: int) -> list[str]:
    """Greedy answers for several prompts at once, left-padded so every prompt ends where
    generation starts. Same stopping and suppression as `finetune.generation.generate`."""
    from finetune.generation import _renderer, greedy

    r = _renderer(processor)
    kwargs = {}
    if any(images):
        kwargs.update(images=images, images_kwargs={"max_soft_tokens": image_tokens})
    flat_audio = [a for clips in audios for a in clips]
    if flat_audio:
        kwargs["audio"] = flat_audio
    inputs = processor(text=[r.prompt_text(c) for c in convs], add_special_tokens=False, return_tensors="pt",
                       padding=True, padding_side="left", **kwargs)
    return greedy(model, processor, inputs, max_new_tokens=max_new_tokens)


def generate_items(model, processor, items: list[EvalItem], *, max_new_tokens: int, image_tokens: int,
                   batch_size: int) -> list[str]:
    from tqdm import tqdm

    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[(len(it.images), len(it.audios))].append(i)
    outputs = [""] * len(items)
    with tqdm(total=len(items), desc="generate", unit=" item", leave=False, file=sys.stderr) as bar:
        for idx in groups.values():
            for k in range(0, len(idx), batch_size):
                chunk = [items[i] for i in idx[k:k + batch_size]]
                answers = generate_batch(model, processor, [it.conv for it in chunk],
                                         [it.images for it in chunk], [it.audios for it in chunk],
                                         max_new_tokens=max_new_tokens, image_tokens=image_tokens)
                for i, a in zip(idx[k:k + batch_size], answers):
                    outputs[i] = a
                bar.update(len(chunk))
    return outputs
