"""Recipe datasets → rendered samples, with exact accounting, mixing, eval split and a cache.

Every record read ends up in exactly one place: a used sample, or a reject with a reason.
`Stats.check()` asserts `records == used + rejected` on every run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_tools.conversation import BadRecord, Conversation
from data_tools.render import IGNORE, Renderer, RenderSettings
from finetune.errors import UserError

CACHE_VERSION = "1"


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

    def add_sample(self, s: dict, modality: str) -> None:
        self.used += 1
        types = np.asarray(s["mm_token_type_ids"])
        self.tokens["text"] += int((types == 0).sum())
        self.tokens["image"] += int((types == 1).sum())
        self.tokens["audio"] += int((types == 3).sum())
        self.tokens["label"] += int(sum(1 for x in s["labels"] if x != IGNORE))
        self.lengths.append(len(s["input_ids"]))
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

    def check(self) -> None:
        # The whole point of the accounting: nothing is lost silently.
        assert self.records == self.used + self.rejected, (
            f"accounting broken: {self.records} records != {self.used} used + {self.rejected} rejected")

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs as keys.
        d = {"records": self.records, "used": self.used, "rejected": self.rejected}
        for k in ("rejected_by_reason", "overflow_actions", "tokens", "by_modality"):
            d[k] = dict(getattr(self, k))
        lengths = self.lengths
        if lengths:
            p = np.percentile(lengths, [0, 50, 90, 99, 100])
            d["length_percentiles"] = dict(zip(["min", "p50", "p90", "p99", "max"], map(int, p)))
        else:
            d["length_percentiles"] = {}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Stats:
        s = cls(records=d["records"], used=d["used"], rejected=d["rejected"])
        for k in ("rejected_by_reason", "overflow_actions", "tokens", "by_modality"):
            getattr(s, k).update(d.get(k, {}))
        return s


# ---------------------------------------------------------------- one record


class _Worker:
    """Parses, loads media and renders one record. Picklable state only, for worker pools."""

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

    def media(self, conv: Conversation) -> tuple[list, list]:
        from data_tools.media import load_audio, load_image

        d = self.data
        images, audios = [], []
        for p in conv.media():
            if p.type == "image":
                images.append(load_image(p, conv.base_dir, max_pixels=d.max_image_pixels,
                                         max_bytes=d.max_media_bytes,
                                         allow_network=d.allow_network_media))
            else:
                audios.append(load_audio(p, conv.base_dir, max_seconds=d.max_audio_seconds,
                                         policy=d.audio_overflow, max_bytes=d.max_media_bytes,
                                         allow_network=d.allow_network_media))
        return images, audios

    def __call__(self, item):
        origin, record, base_dir, fmt, dataset = item
        try:
            conv = self.conversation(origin, record, base_dir, fmt)
            conv.dataset = dataset
            images, audios = self.media(conv)
            sample = self.renderer.render(conv, images, audios)
            sample["modality"] = conv.modality()
            sample["origin"] = origin
            sample["dataset"] = dataset
            return sample
        except BadRecord as e:
            return {"rejected": e.reason, "detail": e.detail, "origin": e.origin or origin,
                    "dataset": dataset, "record": record if isinstance(record, dict) else None}


_WORKER: _Worker | None = None


def _run(item):
    return _WORKER(item)


# ---------------------------------------------------------------- the pass over all data


def _records(specs, max_samples_total: int | None = None):
    from data_tools.sources import iter_records

    for i, spec in enumerate(specs):
        name = f"{i}:{Path(spec.path).name}"
        for origin, record, base_dir in iter_records(spec):
            yield origin, record, base_dir, spec.format, name


def render_all(specs, processor, recipe, *, num_proc: int = 1):
    """Yield one result per record: a sample dict, or {'rejected': reason, ...}."""
    import torch

    global _WORKER
    _WORKER = _Worker(processor, recipe)
    items = _records(specs)
    # The image processor runs many small torch ops per image; with intra-op threads they
    # spend more time synchronising than computing (16 ms vs 0.8 ms per rescale here).
    # Parallelism comes from num_proc processes instead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if num_proc <= 1:
            yield from map(_run, items)
            return
        # fork shares the processor with the workers without pickling it.
        with mp.get_context("fork").Pool(num_proc) as pool:
            yield from pool.imap(_run, items, chunksize=8)
    finally:
        torch.set_num_threads(threads)


def collect(specs, processor, recipe, *, rejects_path: Path | None, progress=True, desc="data"):
    """Render every record of `specs`; return (samples, stats per dataset, total stats)."""
    from tqdm import tqdm

    samples, total, per = [], Stats(), {}
    rejects = open(rejects_path, "a") if rejects_path else None
    try:
        for r in tqdm(render_all(specs, processor, recipe, num_proc=recipe.data.num_proc),
                      desc=desc, unit=" rec", disable=not progress, leave=False):
            st = per.setdefault(r["dataset"], Stats())
            st.records += 1
            if "rejected" in r:
                if recipe.data.on_bad_record == "error":
                    raise UserError(r["origin"], f"bad record ({r['rejected']}): {r['detail']}",
                                    "Fix the record, or set data.on_bad_record: skip to write it to "
                                    "rejects.jsonl and go on")
                st.add_reject(r["rejected"])
                if rejects:
                    rejects.write(json.dumps({k: r[k] for k in ("origin", "dataset", "detail",
                                                                  "record")}
                                             | {"reason": r["rejected"]}, default=str) + "\n")
                continue
            st.add_sample(r, r["modality"])
            samples.append(r)
    finally:
        if rejects:
            rejects.close()
    for st in per.values():
        st.check()
        total.merge(st)
    total.check()
    return samples, per, total


# ---------------------------------------------------------------- mixing and splitting


def mix(samples: list[dict], specs, mix_by: str, seed: int) -> list[dict]:
    """Resample so each dataset's share (of samples, or of label tokens) follows its weight."""
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(s["dataset"], []).append(s)
    weights = {f"{i}:{Path(sp.path).name}": sp.weight for i, sp in enumerate(specs)}
    if len(groups) <= 1:
        return samples
    rng = random.Random(seed)
    wsum = sum(weights[g] for g in groups)
    labels = {g: [sum(1 for x in s["labels"] if x != IGNORE) for s in rows] for g, rows in groups.items()}
    total_n = len(samples)
    total_labels = sum(sum(v) for v in labels.values())
    out = []
    for g, rows in groups.items():
        share = weights[g] / wsum
        if mix_by == "tokens":
            # Balance *label* tokens: a few long audio clips must not swamp many short items.
            n = round(total_labels * share / (sum(labels[g]) / len(rows)))
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


# ---------------------------------------------------------------- cache


def cache_key(recipe, processor_dir: str) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    h.update(json.dumps(asdict(recipe.data), sort_keys=True, default=str).encode())
    for spec in recipe.datasets + recipe.eval_datasets:
        h.update(json.dumps(asdict(spec), sort_keys=True).encode())
        for f in sorted(_files_of(spec.path)):
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                 "chat_template.jinja", "chat_template.json"):
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


def _to_table(samples: list[dict]):
    import datasets

    def blobs(s, key, dtype):
        return [np.ascontiguousarray(a, dtype=dtype).tobytes() for a in s.get(key, [])]

    cols = {c: [s[c] for s in samples] for c in _COLUMNS}
    cols["pixel_values"] = [blobs(s, "pixel_values", np.uint8) for s in samples]
    cols["image_position_ids"] = [blobs(s, "image_position_ids", np.int32) for s in samples]
    cols["input_features"] = [blobs(s, "input_features", np.float32) for s in samples]
    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "mm_token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "modality": datasets.Value("string"), "origin": datasets.Value("string"),
        "dataset": datasets.Value("string"), "overflow": datasets.Value("string"),
        "pixel_values": datasets.Sequence(datasets.Value("binary")),
        "image_position_ids": datasets.Sequence(datasets.Value("binary")),
        "input_features": datasets.Sequence(datasets.Value("binary")),
    })
    return datasets.Dataset.from_dict(cols, features=features)


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
        self.table = table
        self.lengths = [len(x) for x in table["input_ids"]]
        self.modalities = list(table["modality"])

    def __len__(self):
        return len(self.table)

    def __getitem__(self, i):
        return decode(self.table[int(i)])


@dataclass
class Prepared:
    train: object  # SampleList or list of dicts
    eval: object
    stats: dict  # {"total": Stats dict, "datasets": {name: Stats dict}, "eval": Stats dict}
    cache_dir: str | None
    from_cache: bool


def prepare(recipe, processor, processor_dir: str, *, log=print, use_cache: bool = True) -> Prepared:
    """Everything the trainer needs from the data section, cached by content hash."""
    quiet = log is None
    log = log or (lambda *_: None)
    out_dir = Path(recipe.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects_path = out_dir / "rejects.jsonl"
    root = Path(recipe.data.cache_dir or ".cache/finetune-data")
    key = cache_key(recipe, processor_dir)
    cdir = root / key
    if use_cache and not recipe.data.streaming and (cdir / "done").exists():
        import datasets

        t0 = time.time()
        train = SampleList(datasets.load_from_disk(str(cdir / "train")))
        ev = SampleList(datasets.load_from_disk(str(cdir / "eval")))
        stats = json.loads((cdir / "stats.json").read_text())
        if (cdir / "rejects.jsonl").exists():
            rejects_path.write_bytes((cdir / "rejects.jsonl").read_bytes())
        log(f"data: reusing cached tokenized data {cdir} ({len(train)} train, {len(ev)} eval, "
            f"{time.time() - t0:.2f}s)")
        return Prepared(train, ev, stats, str(cdir), True)

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
    if not use_cache or recipe.data.streaming:
        return Prepared(train_s, eval_s, stats, None, False)
    tmp = root / f"{key}.tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _to_table(train_s).save_to_disk(str(tmp / "train"))
    _to_table(eval_s).save_to_disk(str(tmp / "eval"))
    (tmp / "stats.json").write_text(json.dumps(stats))
    shutil.copy(rejects_path, tmp / "rejects.jsonl")
    (tmp / "done").write_text("ok")
    shutil.rmtree(cdir, ignore_errors=True)
    tmp.rename(cdir)
    return prepare(recipe, processor, processor_dir, log=None if quiet else log, use_cache=True)
