"""Branched rows: a conversation's main row plus a branch per earlier served step, in one row.

The row's position ids alone define which tokens each token sees.

The row is the main sequence (position ids 0..n-1) followed by the branches, deepest branch
point first; a branch's position ids continue from its branch point. Read in that order the row
is a tree in depth-first order, and token q sees token k exactly when k is q's ancestor or q
itself: k ≤ q and no token between them (k, q] has a position ≤ k's (such a token starts a
branch that leaves k's path). A plain sample (positions 0..n-1) gives the causal mask; a packed
row (positions restarting at 0) gives the block-diagonal one. Only branched samples carry
`position_ids`.
"""

from __future__ import annotations

import torch

from data_tools.chat_text import IGNORE, Branch


def attach(sample: dict, branches: list[Branch], where: list[int]) -> dict:
    """Append `branches` (ids in unexpanded coordinates) to `sample`'s main row; `where[u]` is the
    expanded index of unexpanded token u (media expansion moves positions)."""
    if not branches:
        return sample
    n = len(sample["input_ids"])
    pos = list(range(n))
    for b in branches:
        at = where[b.at]
        sample["input_ids"] = sample["input_ids"] + list(b.ids)
        sample["labels"] = sample["labels"] + list(b.labels)
        sample["mm_token_type_ids"] = list(sample["mm_token_type_ids"]) + [0] * len(b.ids)
        pos += range(at, at + len(b.ids))
    sample["position_ids"] = pos
    return sample


def main_row(sample: dict) -> dict:
    """`sample` without its branches: the conversation as its last step is served."""
    if "position_ids" not in sample:
        return sample
    n = main_length(sample)
    out = {k: v for k, v in sample.items() if k != "position_ids"}
    for key in ("input_ids", "labels", "mm_token_type_ids"):
        out[key] = list(sample[key][:n])
    return out


def positions(sample: dict) -> list[int]:
    return list(sample.get("position_ids") or range(len(sample["input_ids"])))


def main_length(sample: dict) -> int:
    """Tokens of the main row (the conversation as its last step is served)."""
    pos = positions(sample)
    return next((t for t, p in enumerate(pos) if p != t), len(pos))


def subtree_ends(pos: list[int]) -> list[int]:
    """For each token k, the first later index whose position is ≤ pos[k]: k is seen up to there."""
    end, stack = [len(pos)] * len(pos), []
    for t, p in enumerate(pos):
        while stack and pos[stack[-1]] >= p:
            end[stack.pop()] = t
        stack.append(t)
    return end


def tree_mask(pos: torch.Tensor) -> torch.Tensor:
    """(b, n) position ids → (b, n, n) boolean, True where query q may attend key k (module doc)."""
    n = pos.shape[1]
    ends = torch.tensor([subtree_ends(row) for row in pos.tolist()], dtype=torch.long).view(-1, 1, n)
    q = torch.arange(n).view(1, n, 1)
    k = torch.arange(n).view(1, 1, n)
    return (k <= q) & (q < ends)


def step_spans(sample: dict) -> list[tuple[list[int], range]]:
    """Each labelled step of a sample as (row indices of its served prompt, row indices of what it
    writes), in the order the conversation reaches them (shorter prompts first)."""
    labels, pos = sample["labels"], positions(sample)
    ends = subtree_ends(pos)
    out = []
    t = 0
    while t < len(labels):
        if labels[t] == IGNORE:
            t += 1
            continue
        start = t
        while t < len(labels) and labels[t] != IGNORE and (t == start or pos[t] == pos[t - 1] + 1):
            t += 1
        out.append(([k for k in range(start) if start < ends[k]], range(start, t)))  # what `start` sees
    return sorted(out, key=lambda s: len(s[0]))


def step_ids(sample: dict) -> list[tuple[list[int], list[int]]]:
    """`step_spans` as token ids: (served prompt ids, labelled ids) per step."""
    ids = sample["input_ids"]
    return [([ids[k] for k in prompt], [ids[k] for k in done]) for prompt, done in step_spans(sample)]
