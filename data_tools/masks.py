"""Attention masks kept as what they are made of, built one block at a time.

A packed row's 4-D boolean mask is (tokens × tokens): at 32k tokens 1 GiB per layer type,
alive through the whole step, for a pattern that a few integers per token describe. A
`LazyMask` holds those per-token inputs and builds only the block asked for,
`mask[:, :, q0:q1, k0:k1]`, with the shape, dtype and slicing of the dense tensor.
`finetune.model.attention`'s `blocked` attention asks for one query block at a time, inside
that block's recompute, so the whole mask never exists; everything else calls `dense()`.

`PackedMask` is the packed rows' mask (`data_tools.collate.packed_mask` is its `dense()`), so
the two can't drift apart.
"""

from __future__ import annotations

import torch

from data_tools.steps import subtree_ends


class LazyMask:
    """The (batch, 1, q, k) boolean mask, True = may attend, built by block on demand.

    Subclasses implement `block(rows, q, k)` for a slice of rows, queries and keys."""

    dtype = torch.bool
    shape: tuple[int, int, int, int]

    def block(self, rows: slice, q: slice, k: slice) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> LazyMask:
        raise NotImplementedError

    def __getitem__(self, index) -> torch.Tensor:
        """`mask[:, :, a:b, lo:hi]` (also `mask[..., a:b, :]`): that block, dense."""
        index = index if isinstance(index, tuple) else (index,)
        if index and index[0] is Ellipsis:
            index = (slice(None),) * (5 - len(index)) + index[1:]
        index = index + (slice(None),) * (4 - len(index))
        if len(index) != 4 or not all(isinstance(s, slice) for s in index) or index[1] != slice(None):
            raise TypeError(f"a lazy mask takes slices of rows, queries and keys, not {index!r}")
        return self.block(index[0], index[2], index[3])

    def dense(self) -> torch.Tensor:
        return self.block(slice(None), slice(None), slice(None))


class PackedMask(LazyMask):
    """Rows of packed samples: attention never crosses samples (`segments`, -1 = padding); inside
    one it is causal along the sample's tree (`positions`: branched samples, `data_tools.steps`),
    limited to `sliding_window` positions on sliding layers, and bidirectional inside each
    image (token types 1 and 2). Padding attends to itself only, so no row is all masked."""

    def __init__(self, segments: torch.Tensor, types: torch.Tensor, sliding_window: int | None,
                 positions: torch.Tensor | None = None, *, _parts: tuple | None = None):
        if _parts is not None:  # `to`: the parts, already derived
            self.seg, self.pos, self.ends, self.image, self.window = _parts
        else:
            b, n = segments.shape
            self.seg, self.window = segments, sliding_window
            self.pos = torch.arange(n).expand(b, n) if positions is None else positions
            # key k is seen by the queries before its subtree ends (the whole sample when unbranched)
            self.ends = torch.tensor([subtree_ends(row) for row in self.pos.tolist()], dtype=torch.long).view(b, n)
            vision = (types == 1) | (types == 2)
            starts = vision & ~torch.nn.functional.pad(vision, (1, 0))[:, :-1]
            self.image = torch.where(vision, torch.cumsum(starts.long(), dim=1), torch.zeros_like(types))  # 0: none
        b, n = self.seg.shape
        self.shape = (b, 1, n, n)

    @property
    def device(self) -> torch.device:
        return self.seg.device

    def to(self, device) -> PackedMask:
        parts = tuple(t.to(device) for t in (self.seg, self.pos, self.ends, self.image)) + (self.window,)
        return PackedMask(None, None, None, _parts=parts)

    def block(self, rows: slice, q: slice, k: slice) -> torch.Tensor:
        n = self.shape[-1]
        at = torch.arange(n, device=self.device)
        qi, ki = at[q], at[k]
        seg, pos, ends, image = (t[rows] for t in (self.seg, self.pos, self.ends, self.image))
        sq, sk = seg[:, q, None], seg[:, None, k]
        same = (sq == sk) & (sq >= 0)
        causal = (ki[None, None, :] <= qi[None, :, None]) & (qi[None, :, None] < ends[:, None, k])
        if self.window is not None:
            causal = causal & (pos[:, q, None] - pos[:, None, k] < self.window)
        iq, ik = image[:, q, None], image[:, None, k]
        same_image = (iq == ik) & (iq > 0)
        mask = same & (causal | same_image)
        mask = mask | ((qi[:, None] == ki[None, :])[None] & (sq < 0))
        return mask[:, None]
