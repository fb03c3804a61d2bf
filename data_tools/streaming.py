"""Streaming data (`data.streaming: true`): samples rendered record by record as training consumes them.

`StreamingSamples.samples(epoch)` gives one epoch of the same sample dicts the cached path
holds, datasets interleaved by weight; nothing is written but rejects.jsonl, and the accounting
is complete when the first epoch ends. `LazyList` is the streaming eval set, built on first use.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools.accounting import Ledger, Stats, dataset_name, n_label_tokens
from data_tools.mixing import held_out
from data_tools.render import ChatFormat
from data_tools.render_pool import RecordWorker, chunks, one_thread, records


class StreamingSamples:
    """Training samples rendered lazily while they are consumed (`data.streaming: true`).

    Iterating gives one epoch of sample dicts, the same dicts the cached path holds. An epoch
    reads every dataset with a positive weight once in full; datasets are interleaved so each
    one's share (of samples, or of label tokens with `mix_by: tokens`) follows its weight, and a
    dataset that runs out early starts over until the last one is done (the streaming form of
    upsampling). Within a dataset, order is shuffled in windows of `shuffle_window` samples
    (seed + epoch). Only that window is ever held in memory.

    Accounting: epoch 0 counts every record once (`stats`, rejects.jsonl) in the process where
    `counts_records` is True (set it False on every rank but one); when it ends `complete` is
    True, `stats` satisfies records == used + rejected and the `Prepared.stats` dict it was
    given is filled in place (`stats_dict()` gives the counts so far before that). An epoch 0
    started again (an abandoned iterator) counts afresh. Records held out for eval (`holdout`)
    are skipped before anything is parsed. Rendering happens in the consuming process
    (`num_proc` applies to the cached path only).
    """

    def __init__(self, specs, processor, data, chat: ChatFormat, rejects_path: Path | None, *,
                 holdout: float = 0.0, shuffle_window: int = 256, stats_out: dict | None = None,
                 log=None):
        self.specs = [(dataset_name(i, s), s) for i, s in enumerate(specs) if s.weight > 0]
        self.data = data
        self.worker = RecordWorker(processor, data, chat)
        self.rejects_path = rejects_path
        self.ledger = Ledger(data.on_bad_record, rejects_path)
        self.holdout, self.seed = holdout, data.seed
        self.shuffle_window = shuffle_window
        self.stats_out = stats_out if stats_out is not None else {}
        self.log = log or (lambda *_: None)
        self.complete = False
        self.counts_records = True  # whether this process counts records and writes rejects

    @property
    def stats(self) -> Stats:
        total = Stats()
        for st in self.ledger.per.values():
            total.merge(st)
        return total

    def stats_dict(self) -> dict:
        """The `Prepared.stats` dict; before epoch 0 has ended, the counts so far."""
        if not self.complete:
            self.stats_out.update(total=self.stats.to_dict(), complete=False,
                                  datasets={k: v.to_dict() for k, v in self.ledger.per.items()})
        return self.stats_out

    def __iter__(self) -> Iterator[dict]:
        return self.samples(0)

    def _keep(self, origin: str) -> bool:
        return not self.holdout or not held_out(origin, self.holdout, self.seed)

    def _one_pass(self, name: str, spec, tag: str, ledger: Ledger | None) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}:{tag}:{name}")
        window: list[dict] = []
        for chunk in chunks(records([spec], self._keep, [name])):
            with one_thread():
                results = self.worker(chunk)
            for r in results:
                if ledger:
                    if not ledger.add(r):
                        continue
                elif "rejected" in r:
                    continue
                r.pop("media_files", None)
                window.append(r)
            if len(window) >= self.shuffle_window:
                rng.shuffle(window)
                yield from window
                window = []
        rng.shuffle(window)
        yield from window

    def samples(self, epoch: int) -> Iterator[dict]:
        """One epoch, interleaved by weight (see the class doc)."""
        ledger = None
        if epoch == 0 and not self.complete and self.counts_records:
            if self.ledger.per and self.rejects_path:
                self.rejects_path.write_text("")  # a fresh count: drop the abandoned one's rejects
            ledger = self.ledger = Ledger(self.data.on_bad_record, self.rejects_path)
        specs = dict(self.specs)
        streams = {name: self._one_pass(name, spec, f"{epoch}", ledger) for name, spec in self.specs}
        taken = dict.fromkeys(streams, 0.0)
        got, passes = dict.fromkeys(streams, 0), dict.fromkeys(streams, 0)
        by_tokens = self.data.mix_by == "tokens"
        live = set(streams)  # datasets still in their first pass of this epoch
        while live:
            # Deficit round robin: the dataset furthest below its share goes next.
            name = min(streams, key=lambda g: (taken[g] / specs[g].weight, g))
            s = next(streams[name], None)
            if s is None:
                live.discard(name)
                if not got[name]:  # a whole pass without one usable sample: leave it out
                    del streams[name]
                    continue
                passes[name] += 1
                got[name] = 0
                streams[name] = self._one_pass(name, specs[name], f"{epoch}.{passes[name]}", None)
                continue
            got[name] += 1
            taken[name] += n_label_tokens(s) if by_tokens else 1
            yield s
        if ledger:
            self._finish(ledger)

    def _finish(self, ledger: Ledger) -> None:
        total = ledger.total()  # checks records == used + rejected per dataset
        self.complete = True
        self.stats_out.update(total=total.to_dict(), complete=True,
                              datasets={k: v.to_dict() for k, v in ledger.per.items()})
        self.log(f"data (streaming): first pass done: {total.records} records → {total.used} used, "
                 f"{total.rejected} rejected {dict(total.rejected_by_reason) or ''}")


class LazyList:
    """A list made on first use: the streaming eval set costs nothing unless evaluated."""

    def __init__(self, make: Callable[[], list]):
        self._make, self._items = make, None

    def materialize(self) -> list:
        """The list, made now if it wasn't yet."""
        return self._get()

    def _get(self) -> list:
        if self._items is None:
            self._items = self._make()
        return self._items

    def __len__(self):
        return len(self._get())

    def __getitem__(self, i):
        return self._get()[i]

    def __iter__(self):
        return iter(self._get())
