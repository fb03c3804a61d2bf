"""Samples → model inputs: padding, length-grouped batches, and multimodal packing.

Media tensors are concatenated in row-major order (row 0's images first, then row 1's…),
which is the order the model scatters them into placeholder positions. Their widths (values
per image patch, samples per audio frame) are the arrays' own: nothing here is model-specific.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from data_tools.masks import PackedMask
from data_tools.render import IGNORE, RESCALE
from data_tools.steps import positions


def _media(samples: list[dict]) -> dict:
    out = {}
    pvs = [pv for s in samples for pv in s.get("pixel_values", [])]
    if pvs:
        n = max(len(p) for p in pvs)
        patch = np.shape(pvs[0])[-1]  # raw values per model patch (Gemma 4: 48 × 48 × 3)
        pixel = torch.zeros(len(pvs), n, patch, dtype=torch.float32)
        pos = torch.full((len(pvs), n, 2), -1, dtype=torch.long)
        poss = [p for s in samples for p in s.get("image_position_ids", [])]
        for i, (p, q) in enumerate(zip(pvs, poss)):
            # uint8 k → k * (1/255) reproduces the image processor's values bit for bit.
            # torch.tensor copies: cached rows are read-only views of Arrow buffers.
            pixel[i, : len(p)] = torch.tensor(np.asarray(p, dtype=np.uint8)).float() * RESCALE
            pos[i, : len(q)] = torch.tensor(np.asarray(q, dtype=np.int64))
        out["pixel_values"] = pixel
        out["image_position_ids"] = pos
    feats = [f for s in samples for f in s.get("input_features", [])]
    if feats:
        n = max(len(f) for f in feats)
        frame = np.shape(feats[0])[-1]  # waveform samples per audio token (Gemma 4: 640 at 16 kHz)
        x = torch.zeros(len(feats), n, frame, dtype=torch.float32)
        mask = torch.zeros(len(feats), n, dtype=torch.bool)
        for i, f in enumerate(feats):
            x[i, : len(f)] = torch.tensor(np.asarray(f, dtype=np.float32))
            mask[i, : len(f)] = True
        out["input_features"] = x
        out["input_features_mask"] = mask
    return out


def useful_length(sample: dict) -> int:
    """Tokens of `sample` that can change its loss: up to its last label or media token.

    Attention is causal outside media blocks, so tokens after the last label (the newline
    after `<turn|>`, a trailing unanswered turn) feed no loss term; training on them is pure
    cost. The cut never enters an image or audio span: a media block after the last label is
    kept whole, because its placeholders must match the pixel values / audio frames."""
    labels = np.asarray(sample["labels"])
    types = np.asarray(sample["mm_token_type_ids"])
    keep = np.flatnonzero((labels != IGNORE) | (types != 0))
    return int(keep[-1]) + 1 if len(keep) else len(labels)


def collate(samples: list[dict], pad_id: int, trim_tail: bool = False, *, sliding_window: int | None = None,
            layer_types: list[str] | None = None) -> dict:
    """Pad to the longest row; a 2-D attention mask lets the model build its own masks.

    `trim_tail`: drop each sample's tokens after `useful_length` (the loss is unchanged).
    Branched samples (`data_tools.steps`) need 4-D masks, hence the model's `layer_types` and
    `sliding_window`: they go one per row through `collate_packed`."""
    if any("position_ids" in s for s in samples):
        if layer_types is None:
            raise ValueError("branched samples need the model's layer_types and sliding_window to collate")
        return collate_packed([[s] for s in samples], pad_id, sliding_window, layer_types, trim_tail)
    keep = [useful_length(s) if trim_tail else len(s["input_ids"]) for s in samples]
    n = max(keep)
    b = len(samples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    types = torch.zeros((b, n), dtype=torch.long)
    attn = torch.zeros((b, n), dtype=torch.long)
    for i, (s, k) in enumerate(zip(samples, keep)):
        ids[i, :k] = torch.as_tensor(s["input_ids"][:k])
        labels[i, :k] = torch.as_tensor(s["labels"][:k])
        types[i, :k] = torch.as_tensor(s["mm_token_type_ids"][:k])
        attn[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, "attention_mask": attn,
            **_media(samples)}


# ---------------------------------------------------------------- batching order


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           megabatch: int = 32) -> list[list[int]]:
    """Shuffle, then sort within mega-batches of `megabatch` batches: padding drops, order stays random."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    span = batch_size * megabatch
    batches = []
    for start in range(0, len(idx), span):
        chunk = sorted(idx[start:start + span], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return [idx[j:j + batch_size] for j in range(0, n, batch_size)]


def pack_rows(lengths: list[int], order: list[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing within the given order's windows: rows of sample indices ≤ max_len."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


# ---------------------------------------------------------------- packing


def packed_mask(segments: torch.Tensor, types: torch.Tensor, sliding_window: int | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """4-D boolean mask (b, 1, q, k), True = attend, for rows holding several samples.

    Attention never crosses samples; inside a sample it is causal (along its tree when the
    sample is branched: `data_tools.steps`), limited to the sliding window of positions on
    sliding layers, and bidirectional inside each image block (what `mm_token_type_ids` switches
    on in the unpacked path). The dense form of `data_tools.masks.PackedMask`.
    """
    return PackedMask(segments, types, sliding_window, positions).dense()


def collate_packed(rows: list[list[dict]], pad_id: int, sliding_window: int | None,
                   layer_types: list[str], trim_tail: bool = False, lazy_masks: bool = False) -> dict:
    """Several samples per row, position ids restarting per sample, masks as a dict (with
    `lazy_masks`, `PackedMask`s built block by block: for the `blocked` attention only)."""
    size = useful_length if trim_tail else (lambda s: len(s["input_ids"]))
    keep = [[size(s) for s in row] for row in rows]
    n = max(sum(row) for row in keep)
    b = len(rows)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    labels = torch.full((b, n), IGNORE, dtype=torch.long)
    types = torch.zeros((b, n), dtype=torch.long)
    pos = torch.zeros((b, n), dtype=torch.long)
    seg = torch.full((b, n), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for j, (s, k) in enumerate(zip(row, keep[r])):
            ids[r, at:at + k] = torch.as_tensor(s["input_ids"][:k])
            labels[r, at:at + k] = torch.as_tensor(s["labels"][:k])
            types[r, at:at + k] = torch.as_tensor(s["mm_token_type_ids"][:k])
            pos[r, at:at + k] = torch.as_tensor(positions(s)[:k])
            seg[r, at:at + k] = j
            at += k
    masks = {}
    for kind, window in (("full_attention", None), ("sliding_attention", sliding_window)):
        if kind in layer_types:
            mask = PackedMask(seg, types, window, pos)
            masks[kind] = mask if lazy_masks else mask.dense()
    flat = [s for row in rows for s in row]
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, "position_ids": pos,
            "attention_mask": masks, **_media(flat)}
