"""Which samples train and which evaluate: mixing datasets by weight, and the eval split.

`mix` resamples the rendered samples so each dataset's share (of samples, or of label tokens)
follows its weight; `split_eval` holds out a fraction of samples (cached path), `held_out` a
fraction of records by a hash of their origin (streaming path, no pass over the data needed).
"""

from __future__ import annotations

import hashlib
import random

from data_tools.accounting import dataset_name, n_label_tokens


def mix(samples: list[dict], specs, mix_by: str, seed: int) -> list[dict]:
    """Resample so each dataset's share (of samples, or of label tokens) follows its weight."""
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["dataset"], []).append(s)
    weights = {dataset_name(i, sp): sp.weight for i, sp in enumerate(specs)}
    if len(groups) <= 1:
        return samples
    rng = random.Random(seed)
    wsum = sum(weights[g] for g in groups)
    if wsum <= 0:  # every dataset with a weight was rejected entirely
        return []
    labels = {g: sum(n_label_tokens(s) for s in rows) for g, rows in groups.items()}
    total_n, total_labels = len(samples), sum(labels.values())
    out = []
    for g, rows in groups.items():
        share = weights[g] / wsum
        if mix_by == "tokens":
            # Balance *label* tokens: a few long audio clips must not swamp many short items.
            n = round(total_labels * share / (labels[g] / len(rows)))
        else:
            n = round(total_n * share)
        full, rest = divmod(n, len(rows))
        out += rows * full + rng.sample(rows, rest)
    rng.shuffle(out)
    return out


def split_eval(samples: list[dict], fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): a random `fraction` of the samples held out, at least one."""
    if fraction <= 0:
        return samples, []
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    k = max(1, round(len(samples) * fraction))
    held = set(idx[:k])
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def held_out(origin: str, fraction: float, seed: int) -> bool:
    """A record-level eval split that needs no pass over the data (streaming)."""
    h = hashlib.sha1(f"{seed}:{origin}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction
