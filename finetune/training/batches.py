"""Which samples form micro-batch N of the run on this process: deterministic, so resume is exact.

`BatchPlan` orders a cached (indexable) dataset: epoch e shuffles with seed + e, so position N
is the same batch after a restart. `StreamPlan` cuts a streamed dataset into the same kind of
micro-batches as it is rendered. Global batches hold `batch_size × world` samples and rank r
takes slice r of each.
"""

from __future__ import annotations

import itertools
import random

from data_tools.collate import collate, collate_packed, length_grouped_batches, pack_rows, random_batches
from data_tools.steps import main_row
from finetune.errors import UserError


class BatchPlan:
    """Deterministic order of micro-batches: epoch e uses seed+e, so a position resumes exactly."""

    def __init__(self, data, t, pad_id: int, text_cfg, world: int, rank: int, max_len: int,
                 collate_fn=None, pack_fn=None):
        self.data, self.t, self.pad_id = data, t, pad_id
        self.collate = collate_fn or (lambda samples, pad: collate(samples, pad, trim_tail=True))
        # packed rows are made by the objective too (`Objective.pack`); the recipe check refuses
        # packing for objectives that don't pack
        self.pack = pack_fn or (lambda rows, pad, sliding, types: collate_packed(rows, pad, sliding, types,
                                                                                 trim_tail=True))
        if collate_fn is None:
            self.collate = branch_aware(self.collate, self.pack, text_cfg)
        self.lengths = data.lengths if hasattr(data, "lengths") else [len(s["input_ids"]) for s in data]
        self.world, self.rank, self.max_len = world, rank, max_len
        self.sliding = text_cfg.sliding_window
        self.layer_types = list(text_cfg.layer_types)
        self._epoch, self._batches = -1, []

    def _plan(self, epoch: int) -> list[list[int]]:
        seed = self.t.seed + epoch
        global_bs = self.t.batch_size * self.world
        if self.t.packing:
            # Rows of packed samples, then batches of rows; each rank takes its slice.
            order = list(range(len(self.lengths)))
            random.Random(seed).shuffle(order)
            rows = pack_rows(self.lengths, order, self.max_len)
            random.Random(seed + 1).shuffle(rows)
            return [rows[i:i + global_bs] for i in range(0, len(rows) - global_bs + 1, global_bs)]
        if self.t.group_by_length:
            batches = length_grouped_batches(self.lengths, global_bs, seed)
        else:
            batches = random_batches(len(self.lengths), global_bs, seed)
        return [b for b in batches if len(b) == global_bs] or batches

    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Global batches (indices, or packed rows of indices) of `epoch`."""
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
            if not self._batches:
                raise UserError("train.batch_size", "the dataset is smaller than one global batch",
                                "Lower train.batch_size or add data")
        return self._batches

    def micro_batch(self, position: int) -> dict:
        """The `position`-th micro-batch of the whole run (this rank's share)."""
        epoch, i = divmod(position, self.batches_per_epoch())
        glob = self.epoch_plan(epoch)[i]
        mine = glob[self.rank * self.t.batch_size:(self.rank + 1) * self.t.batch_size]
        if self.t.packing:
            return self.pack([[self.data[j] for j in row] for row in mine], self.pad_id,
                             self.sliding, self.layer_types)
        return self.collate([self.data[j] for j in mine], self.pad_id)


def branch_aware(collate_fn, pack_fn, text_cfg):
    """`collate_fn` for samples that may be branched (data_tools.steps: earlier steps served apart).
    Those need 4-D masks, so a micro-batch holding one goes one sample per row through `pack_fn`;
    with no `pack_fn` (an objective that does not pack) they keep their main row only."""
    sliding, types = text_cfg.sliding_window, list(text_cfg.layer_types)

    def make(samples: list[dict], pad_id: int) -> dict:
        if not any("position_ids" in s for s in samples):
            return collate_fn(samples, pad_id)
        if pack_fn is None:
            return collate_fn([main_row(s) for s in samples], pad_id)
        return pack_fn([[s] for s in samples], pad_id, sliding, types)
    return make


class StreamPlan:
    """The `BatchPlan` interface over a streamed dataset (`data.streaming: true`): micro-batch
    `position` of this rank. Resuming restarts the stream at `position`, so the skipped samples
    are rendered again (cheap next to training on them)."""

    def __init__(self, stream, t, pad_id: int, world: int, rank: int, collate_fn=None):
        self.stream, self.t, self.pad_id, self.world, self.rank = stream, t, pad_id, world, rank
        self.collate = collate_fn
        self._it, self._next = None, -1

    def micro_batch(self, position: int) -> dict:
        if self._it is None or position != self._next:
            self._it = stream_micro_batches(self.stream, self.t.batch_size, self.pad_id, rank=self.rank,
                                            world=self.world, start=position,
                                            group_by_length=self.t.group_by_length, trim_tail=True,
                                            collate_fn=self.collate)
        self._next = position + 1
        return next(self._it)


def stream_micro_batches(stream, batch_size: int, pad_id: int, *, rank: int = 0, world: int = 1,
                         start: int = 0, group_by_length: bool = True, window: int = 32,
                         trim_tail: bool = False, collate_fn=None):
    """Collated micro-batches of `stream` (a `StreamingSamples`) for this rank, epoch after
    epoch, forever.

    With `group_by_length`, each run of `window` global batches is sorted by length before it is
    cut (less padding, order still random), like the cached path. `start` skips that many
    micro-batches. Only rank 0 counts records and writes rejects.
    """
    stream.counts_records = rank == 0
    make = collate_fn or (lambda samples, pad: collate(samples, pad, trim_tail))
    glob = batch_size * world
    position = 0
    for epoch in itertools.count():
        it, made = stream.samples(epoch), 0
        while buf := list(itertools.islice(it, glob * window)):
            lengths = [len(s["input_ids"]) for s in buf]
            seed = stream.seed + epoch * 1_000_003 + position
            order = (length_grouped_batches(lengths, glob, seed, megabatch=window)
                     if group_by_length else random_batches(len(buf), glob, seed))
            for b in (b for b in order if len(b) == glob):  # a short last batch is dropped
                made += 1
                if position >= start:
                    yield make([buf[j] for j in b[rank * batch_size:(rank + 1) * batch_size]], pad_id)
                position += 1
        if not made:
            raise UserError("train.batch_size", "the streamed dataset is smaller than one global "
                            "batch", "Lower train.batch_size or add data")
