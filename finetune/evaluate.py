"""Base vs adapter, item by item, on held-out samples.

Scores: exact match (case/punctuation-insensitive), token F1, and character/word error rate
for transcription-like answers. The same greedy generation as serving (finetune.generation).
"""

from __future__ import annotations

import re
from collections import defaultdict

from finetune.generation import generate


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


def run_items(model, processor, items, *, max_new_tokens: int, image_tokens: int) -> list[str]:
    return [generate(model, processor, conv, images, audios, max_new_tokens=max_new_tokens,
                     image_tokens=image_tokens) for conv, images, audios in items]


def accuracy_by_modality(items, outputs: list[str]) -> dict:
    """{modality: {"accuracy", "n"}} by exact match: the demo's eval.json shape."""
    acc: dict[str, list[float]] = defaultdict(list)
    for (conv, _, _), out in zip(items, outputs):
        acc[conv.modality()].append(exact_match(out, conv.messages[-1].text()))
    return {m: {"accuracy": round(sum(v) / len(v), 4), "n": len(v)} for m, v in sorted(acc.items())}
