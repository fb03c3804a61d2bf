"""Recipe datasets → rendered samples, with exact accounting, mixing, eval split and a cache.

Every record read ends up in exactly one place: a used sample, or a reject with a reason.
`Stats.check()` asserts `records == used + rejected` on every run.

Two ways to get training samples out of `prepare()`:
- cached (default): one pass renders everything (`data.num_proc` processes), mixes by weight,
  and stores the result as Arrow (via `datasets`) keyed by a hash of the data section, the
  processor files and this package's code; the next run loads it in well under a second.
- streaming (`data.streaming: true`): `StreamingSamples` renders record by record while the
  trainer consumes them; nothing is written but rejects.jsonl, and the accounting is complete
  when the first epoch ends.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import multiprocessing as mp
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_tools.conversation import BadRecord, Conversation
from data_tools.render import IGNORE, Renderer, RenderSettings
from finetune.errors import UserError

CACHE_VERSION = "2"
CHUNK = 16  # records per render call: samples with the same media share one processor call
HIST_BINS = 20


@dataclass
class Stats:
    records: int = 0
    used: int = 0
    rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    overflow_actions: Counter = field(default_factory=Counter)
    tokens: Counter = field(default_factory=lambda: Counter(text=0, image=0, audio=0, label=0))
    lengths: list = field(default_factory=list)
    by_modality: Counter = field(default_factory=Counter)
    lengths_by_modality: dict = field(default_factory=dict)

    def add_sample(self, s: dict, modality: str) -> None:
        self.used += 1
        types = np.asarray(s["mm_token_type_ids"])
        self.tokens["text"] += int((types == 0).sum())
        self.tokens["image"] += int((types == 1).sum())
        self.tokens["audio"] += int((types == 3).sum())
        self.tokens["label"] += n_label_tokens(s)
        self.lengths.append(len(s["input_ids"]))
        self.lengths_by_modality.setdefault(modality, []).append(len(s["input_ids"]))
        self.by_modality[modality] += 1
        if s.get("overflow", "none") != "none":
            self.overflow_actions[s["overflow"]] += 1

    def add_reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by_reason[reason] += 1

    def merge(self, other: Stats) -> None:
        for name in ("records", "used", "rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("rejected_by_reason", "overflow_actions", "tokens", "by_modality"):
            getattr(self, name).update(getattr(other, name))
        self.lengths += other.lengths
        for m, v in other.lengths_by_modality.items():
            self.lengths_by_modality.setdefault(m, []).extend(v)

    def check(self) -> None:
        # The whole point of the accounting: nothing is lost silently.
        assert self.records == self.used + self.rejected, (
            f"accounting broken: {self.records} records != {self.used} used + {self.rejected} rejected")

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs as keys.
        d = {"records": self.records, "used": self.used, "rejected": self.rejected}
        for k in ("rejected_by_reason", "overflow_actions", "tokens", "by_modality"):
            d[k] = dict(getattr(self, k))
        d["length_percentiles"] = {}
        d["length_histogram"] = {}
        if self.lengths:
            p = np.percentile(self.lengths, [0, 50, 90, 99, 100])
            d["length_percentiles"] = dict(zip(["min", "p50", "p90", "p99", "max"], map(int, p)))
            # Shared bin edges, so modalities compare at a glance (the preview draws these).
            lo, hi = min(self.lengths), max(self.lengths)
            edges = np.linspace(lo, max(hi, lo + HIST_BINS), HIST_BINS + 1)
            d["length_histogram"] = {
                "edges": [round(float(e), 1) for e in edges],
                "counts": {m: np.histogram(v, edges)[0].tolist()
                           for m, v in sorted(self.lengths_by_modality.items())}}
        return d


def n_label_tokens(sample: dict) -> int:
    return sum(1 for x in sample["labels"] if x != IGNORE)


# ---------------------------------------------------------------- records → results


class _Worker:
    """Parses, loads media and renders records; worker processes get it by fork, unpickled."""

    def __init__(self, processor, recipe):
        self.data = recipe.data
        self.renderer = Renderer(processor, RenderSettings(
            max_seq_len=recipe.data.max_seq_len, train_on=recipe.data.train_on,
            image_tokens=recipe.data.image_tokens, overflow=recipe.data.overflow))

    def conversation(self, origin: str, record, base_dir: str, fmt: str) -> Conversation:
        from data_tools.formats import parse_record

        if isinstance(record, BadRecord):
            raise record
        return parse_record(record, fmt, origin, base_dir)

    def load(self, item) -> tuple[Conversation, list, list]:
        from data_tools.media import load_media

        origin, record, base_dir, fmt, dataset = item
        conv = self.conversation(origin, record, base_dir, fmt)
        conv.dataset = dataset
        return (conv, *load_media(conv, self.data))

    def __call__(self, items: list) -> list[dict]:
        """One result per item, in order: a sample dict, or {'rejected': reason, ...}."""
        out: list = [None] * len(items)
        todo = []
        for k, item in enumerate(items):
            try:
                todo.append((k, self.load(item)))
            except BadRecord as e:
                out[k] = _reject(e, item)
        rendered = self.renderer.render_many([loaded for _, loaded in todo])
        for (k, (conv, _, _)), r in zip(todo, rendered):
            if isinstance(r, BadRecord):
                out[k] = _reject(r, items[k])
            else:
                r.update(modality=conv.modality(), origin=items[k][0], dataset=items[k][4])
                out[k] = r
        return out


def _reject(e: BadRecord, item) -> dict:
    origin, record, _, _, dataset = item
    # The record as read (or the text of an unparseable line), so rejects.jsonl can be fixed.
    raw = record if isinstance(record, dict) else e.raw
    return {"rejected": e.reason, "detail": e.detail, "origin": e.origin or origin,
            "dataset": dataset, "record": raw}


_WORKER: _Worker | None = None


def _run(items):
    return _WORKER(items)


def _init_pool_worker():
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _one_thread():
    """The image processor runs many small torch ops per image; with intra-op threads they
    spend more time synchronising than computing (16 ms vs 0.8 ms per rescale here).
    Parallelism comes from num_proc processes instead."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def dataset_name(i: int, spec) -> str:
    """How a dataset is named in stats, samples and rejects: its index and file name."""
    return f"{i}:{Path(spec.path).name}"


def _records(specs, keep: Callable[[str], bool] | None = None, names: list[str] | None = None):
    from data_tools.sources import iter_records

    for i, spec in enumerate(specs):
        name = names[i] if names else dataset_name(i, spec)
        for origin, record, base_dir in iter_records(spec):
            if keep is None or keep(origin):
                yield origin, record, base_dir, spec.format, name


def _chunks(items, n: int = CHUNK):
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def render_all(specs, processor, recipe, *, num_proc: int = 1, keep=None) -> Iterator[dict]:
    """Yield one result per record, in order: a sample dict, or {'rejected': reason, ...}.

    `keep(origin)` selects records before anything is parsed or rendered.
    """
    global _WORKER
    _WORKER = _Worker(processor, recipe)
    chunks = _chunks(_records(specs, keep))
    if num_proc <= 1:
        for chunk in chunks:
            with _one_thread():  # only around rendering: a consumer between yields keeps its threads
                results = _WORKER(chunk)
            yield from results
        return
    # fork shares the processor with the workers without pickling it; they start with one
    # thread each (set before the fork, restored right after). gc.freeze: the workers' garbage
    # collector would otherwise write to every inherited object and copy their pages.
    gc.freeze()
    with _one_thread():
        pool = mp.get_context("fork").Pool(num_proc, initializer=_init_pool_worker)
    gc.unfreeze()
    with pool:
        for results in pool.imap(_run, chunks):
            yield from results


class _Ledger:
    """Counts every result per dataset and writes rejects; raises at the first bad record
    when `on_bad_record: error`."""

    def __init__(self, on_bad_record: str, rejects_path: Path | None):
        self.on_bad_record = on_bad_record
        self.rejects_path = rejects_path
        self.per: dict[str, Stats] = {}

    def add(self, r: dict) -> bool:
        """Count `r`; True when it is a sample."""
        st = self.per.setdefault(r["dataset"], Stats())
        st.records += 1
        if "rejected" not in r:
            st.add_sample(r, r["modality"])
            return True
        if self.on_bad_record == "error":
            raise UserError(r["origin"], f"bad record ({r['rejected']}): {r['detail']}",
                            "Fix the record, or set data.on_bad_record: skip to write it to "
                            "rejects.jsonl and go on")
        st.add_reject(r["rejected"])
        if self.rejects_path:  # rare: open per line, so a long streaming run never holds it
            with open(self.rejects_path, "a") as f:
                f.write(json.dumps({k: r[k] for k in ("origin", "dataset", "detail", "record")}
                                   | {"reason": r["rejected"]}, default=str) + "\n")
        return False

    def total(self) -> Stats:
        total = Stats()
        for st in self.per.values():
            st.check()
            total.merge(st)
        total.check()
        return total


def collect(specs, processor, recipe, *, rejects_path: Path | None, progress=True, desc="data",
            keep=None, num_proc: int | None = None):
    """Render every record of `specs`; return (samples, stats per dataset, total stats)."""
    from tqdm import tqdm

    ledger = _Ledger(recipe.data.on_bad_record, rejects_path)
    num_proc = recipe.data.num_proc if num_proc is None else num_proc
    results = render_all(specs, processor, recipe, num_proc=num_proc, keep=keep)
    samples = [r for r in tqdm(results, desc=desc, unit=" rec", disable=not progress, leave=False)
               if ledger.add(r)]
    return samples, ledger.per, ledger.total()


# ---------------------------------------------------------------- mixing and splitting


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


# ---------------------------------------------------------------- cache


def cache_key(recipe, processor_dir: str) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    # Settings that cannot change a sample stay out, so e.g. num_proc 1 and 2 share a cache.
    data = {k: v for k, v in asdict(recipe.data).items() if k not in ("num_proc", "streaming", "cache_dir")}
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    for spec in recipe.datasets + recipe.eval_datasets:
        h.update(json.dumps(asdict(spec), sort_keys=True).encode())
        for f in sorted(_files_of(spec.path)):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                 "chat_template.json"):
        p = Path(processor_dir) / name
        if p.exists():
            h.update(p.read_bytes())
    for src in sorted(Path(__file__).parent.glob("*.py")):  # code version
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def _files_of(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return [f for f in p.rglob("*") if f.is_file()]
    return [Path(f) for f in sorted(map(str, Path().glob(path)))] if any(c in path for c in "*?[") else []


_COLUMNS = ("input_ids", "labels", "mm_token_type_ids", "modality", "origin", "dataset", "overflow")


def _features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "mm_token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "modality": datasets.Value("string"), "origin": datasets.Value("string"),
        "dataset": datasets.Value("string"), "overflow": datasets.Value("string"),
        # Media as raw bytes: uint8 patches (6912 per row), int32 positions, float32 frames.
        "pixel_values": datasets.Sequence(datasets.Value("binary")),
        "image_position_ids": datasets.Sequence(datasets.Value("binary")),
        "input_features": datasets.Sequence(datasets.Value("binary")),
    })


def _to_table(samples: list[dict]):
    import datasets

    def blobs(s, key, dtype):
        return [np.ascontiguousarray(a, dtype=dtype).tobytes() for a in s.get(key, [])]

    cols = {c: [s[c] for s in samples] for c in _COLUMNS}
    cols["pixel_values"] = [blobs(s, "pixel_values", np.uint8) for s in samples]
    cols["image_position_ids"] = [blobs(s, "image_position_ids", np.int32) for s in samples]
    cols["input_features"] = [blobs(s, "input_features", np.float32) for s in samples]
    return datasets.Dataset.from_dict(cols, features=_features())


def decode(row: dict) -> dict:
    """A cached row → the sample dict collate takes (media back as arrays)."""
    s = {k: row[k] for k in _COLUMNS}
    s["pixel_values"] = [np.frombuffer(b, np.uint8).reshape(-1, 6912) for b in row["pixel_values"]]
    s["image_position_ids"] = [np.frombuffer(b, np.int32).reshape(-1, 2)
                               for b in row["image_position_ids"]]
    s["input_features"] = [np.frombuffer(b, np.float32).reshape(-1, 640) for b in row["input_features"]]
    return s


class SampleList:
    """A list-like view over a cached Arrow table that decodes rows on access."""

    def __init__(self, table):
        import pyarrow.compute as pc

        self.table = table
        # From Arrow directly: turning every row's ids into Python lists takes seconds at 100k rows.
        self.lengths = pc.list_value_length(table.data.column("input_ids")).to_numpy().tolist()
        self.modalities = table.data.column("modality").to_pylist()

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return decode(self.table[int(i)])


@contextlib.contextmanager
def _quiet_datasets():
    """Our own progress bar covers rendering; datasets' save/load bars would only add noise."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- streaming


class StreamingSamples:
    """Training samples rendered lazily while they are consumed (`data.streaming: true`).

    Iterating gives one epoch of sample dicts, the same dicts the cached path holds. An epoch
    reads every dataset with a positive weight once in full; datasets are interleaved so each
    one's share (of samples, or of label tokens with `mix_by: tokens`) follows its weight, and a
    dataset that runs out early starts over until the last one is done (the streaming form of
    upsampling). Within a dataset, order is shuffled in windows of `shuffle_window` samples
    (seed + epoch). Only that window is ever held in memory.

    Accounting: epoch 0 counts every record once (`stats`, rejects.jsonl); when it ends
    `complete` is True, `stats` satisfies records == used + rejected and the `Prepared.stats`
    dict it was given is filled in place (`stats_dict()` gives the counts so far before that).
    An epoch 0 started again (an abandoned iterator) counts afresh. Records held out for eval
    (`holdout`) are skipped before anything is parsed. Rendering happens in the consuming
    process (`num_proc` applies to the cached path only).
    """

    def __init__(self, specs, processor, recipe, rejects_path: Path | None, *, holdout: float = 0.0,
                 shuffle_window: int = 256, stats_out: dict | None = None, log=None):
        self.specs = [(dataset_name(i, s), s) for i, s in enumerate(specs) if s.weight > 0]
        self.recipe = recipe
        self.worker = _Worker(processor, recipe)
        self.rejects_path = rejects_path
        self.ledger = _Ledger(recipe.data.on_bad_record, rejects_path)
        self.holdout, self.seed = holdout, recipe.data.seed
        self.shuffle_window = shuffle_window
        self.stats_out = stats_out if stats_out is not None else {}
        self.log = log or (lambda *_: None)
        self.complete = False
        self._count = True  # whether this process writes rejects (rank 0 only)

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

    def _one_pass(self, name: str, spec, tag: str, ledger: _Ledger | None) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}:{tag}:{name}")
        chunks = _chunks(_records([spec], self._keep, [name]))
        window: list[dict] = []
        for chunk in chunks:
            with _one_thread():
                results = self.worker(chunk)
            for r in results:
                if ledger:
                    if not ledger.add(r):
                        continue
                elif "rejected" in r:
                    continue
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
        if epoch == 0 and not self.complete and self._count:
            if self.ledger.per and self.rejects_path:
                self.rejects_path.write_text("")  # a fresh count: drop the abandoned one's rejects
            ledger = self.ledger = _Ledger(self.recipe.data.on_bad_record, self.rejects_path)
        specs = dict(self.specs)
        streams = {name: self._one_pass(name, spec, f"{epoch}", ledger) for name, spec in self.specs}
        taken = dict.fromkeys(streams, 0.0)
        got, passes = dict.fromkeys(streams, 0), dict.fromkeys(streams, 0)
        by_tokens = self.recipe.data.mix_by == "tokens"
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

    def _finish(self, ledger: _Ledger) -> None:
        total = ledger.total()  # checks records == used + rejected per dataset
        self.complete = True
        self.stats_out.update(total=total.to_dict(), complete=True,
                              datasets={k: v.to_dict() for k, v in ledger.per.items()})
        self.log(f"data (streaming): first pass done: {total.records} records → {total.used} used, "
                 f"{total.rejected} rejected {dict(total.rejected_by_reason) or ''}")

    def micro_batches(self, batch_size: int, pad_id: int, *, rank: int = 0, world: int = 1,
                      start: int = 0, group_by_length: bool = True, window: int = 32,
                      trim_tail: bool = False) -> Iterator[dict]:
        """Collated micro-batches for this rank, epoch after epoch, forever.

        Global batches hold batch_size × world samples and rank r takes slice r. With
        `group_by_length`, each run of `window` global batches is sorted by length before it is
        cut (less padding, order still random), like the cached path. `start` skips that many
        micro-batches (resume from a saved position: the skipped samples are rendered again).
        `trim_tail`: as in `collate`.
        Only rank 0 counts records and writes rejects.
        """
        from data_tools.collate import collate, length_grouped_batches, random_batches

        self._count = rank == 0
        glob = batch_size * world
        position = 0
        for epoch in itertools.count():
            it, made = self.samples(epoch), 0
            while buf := list(itertools.islice(it, glob * window)):
                lengths = [len(s["input_ids"]) for s in buf]
                seed = self.seed + epoch * 1_000_003 + position
                order = (length_grouped_batches(lengths, glob, seed, megabatch=window)
                         if group_by_length else random_batches(len(buf), glob, seed))
                for b in (b for b in order if len(b) == glob):  # a short last batch is dropped
                    made += 1
                    if position >= start:
                        yield collate([buf[j] for j in b[rank * batch_size:(rank + 1) * batch_size]],
                                      pad_id, trim_tail)
                    position += 1
            if not made:
                raise UserError("train.batch_size", "the streamed dataset is smaller than one global "
                                "batch", "Lower train.batch_size or add data")


class _LazyList:
    """A list made on first use: the streaming eval set costs nothing unless evaluated."""

    def __init__(self, make: Callable[[], list]):
        self._make, self._items = make, None

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


# ---------------------------------------------------------------- the entry point


@dataclass
class Prepared:
    train: object  # SampleList, list of dicts, or StreamingSamples
    eval: object  # SampleList, list, or (streaming) a list built on first use
    stats: dict  # {"total": Stats dict, "datasets": {name: Stats dict}, "eval": Stats dict | None}
    cache_dir: str | None
    from_cache: bool
    streaming: bool = False


def prepare(recipe, processor, processor_dir: str, *, log=print, use_cache: bool = True,
            streaming: bool | None = None) -> Prepared:
    """Everything the trainer needs from the data section, cached by content hash.

    `streaming` overrides `data.streaming` (e.g. `data stats` wants the full pass).
    """
    quiet = log is None
    log = log or (lambda *_: None)
    streaming = recipe.data.streaming if streaming is None else streaming
    out_dir = Path(recipe.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects_path = out_dir / "rejects.jsonl"
    if streaming:
        return _prepare_streaming(recipe, processor, rejects_path, log)
    root = Path(recipe.data.cache_dir or ".cache/finetune-data")
    key = cache_key(recipe, processor_dir)
    cdir = root / key
    if use_cache and (cdir / "done").exists():
        t0 = time.time()
        prep = _load_cache(cdir, rejects_path, from_cache=True)
        log(f"data: reusing cached tokenized data {cdir} ({len(prep.train)} train, {len(prep.eval)} "
            f"eval, {time.time() - t0:.2f}s)")
        return prep

    rejects_path.write_text("")
    t0 = time.time()
    samples, per, total = collect(recipe.datasets, processor, recipe, rejects_path=rejects_path,
                                  progress=not quiet, desc="train data")
    if recipe.eval_datasets:
        train_s = samples
        eval_s, _, eval_total = collect(recipe.eval_datasets, processor, recipe,
                                        rejects_path=rejects_path, progress=not quiet,
                                        desc="eval data")
    else:
        train_s, eval_s = split_eval(samples, recipe.data.eval_fraction, recipe.data.seed)
        eval_total = None
    train_s = mix(train_s, recipe.datasets, recipe.data.mix_by, recipe.data.seed)
    stats = {"total": total.to_dict(), "datasets": {k: v.to_dict() for k, v in per.items()},
             "eval": eval_total.to_dict() if eval_total else None}
    log(f"data: {total.records} records → {total.used} used, {total.rejected} rejected "
        f"{dict(total.rejected_by_reason) or ''} in {time.time() - t0:.1f}s; "
        f"{len(train_s)} train samples after mixing, {len(eval_s)} eval")
    if not use_cache:
        return Prepared(train_s, eval_s, stats, None, False)
    import shutil

    tmp = root / f"{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with _quiet_datasets():
        for name, rows in (("train", train_s), ("eval", eval_s)):
            if rows:
                _to_table(rows).save_to_disk(str(tmp / name))
    (tmp / "stats.json").write_text(json.dumps(stats))
    shutil.copy(rejects_path, tmp / "rejects.jsonl")
    (tmp / "done").write_text("ok")
    shutil.rmtree(cdir, ignore_errors=True)
    tmp.rename(cdir)  # atomic: a killed run never leaves a half cache that looks done
    log(f"data: cached in {cdir}")
    # Served from the cache even now, so this run and the next see the same row-decoding views.
    return _load_cache(cdir, rejects_path, from_cache=False)


def _load_cache(cdir: Path, rejects_path: Path, *, from_cache: bool) -> Prepared:
    import datasets

    with _quiet_datasets():
        # An empty split is not saved: datasets cannot load a table with no shards.
        train, ev = (SampleList(datasets.load_from_disk(str(cdir / n))) if (cdir / n).exists() else []
                     for n in ("train", "eval"))
    stats = json.loads((cdir / "stats.json").read_text())
    if rejects_path != cdir / "rejects.jsonl":
        rejects_path.write_bytes((cdir / "rejects.jsonl").read_bytes())
    return Prepared(train, ev, stats, str(cdir), from_cache)


def _prepare_streaming(recipe, processor, rejects_path: Path, log) -> Prepared:
    rejects_path.write_text("")
    d = recipe.data
    stats: dict = {"total": None, "datasets": {}, "eval": None, "streaming": True}
    holdout = 0.0 if recipe.eval_datasets else d.eval_fraction
    train = StreamingSamples(recipe.datasets, processor, recipe, rejects_path, holdout=holdout,
                             stats_out=stats, log=log)

    def make_eval() -> list:
        # In the training process, mid-run: no worker pool (no fork after CUDA is up), and
        # only the rank that counts writes rejects.
        kw = {"rejects_path": rejects_path if train._count else None, "progress": False, "num_proc": 1}
        if recipe.eval_datasets:
            samples, _, total = collect(recipe.eval_datasets, processor, recipe, **kw)
        elif holdout:
            # The records the train stream skips: one read of the sources, only these rendered.
            samples, _, total = collect(recipe.datasets, processor, recipe,
                                        keep=lambda o: held_out(o, holdout, d.seed), **kw)
        else:
            return []
        stats["eval"] = total.to_dict()
        return samples

    log("data: streaming: samples are rendered as training consumes them (no cache); the "
        "accounting is complete after the first epoch")
    return Prepared(train, _LazyList(make_eval), stats, None, False, streaming=True)
