"""The rendered-data cache: a folder of Arrow tables keyed by a hash of everything that shapes a sample.

`cache_key` hashes the data section (less what cannot change a sample), the datasets' files
(size, mtime), the processor's files, the chat format and this package's code; the media the
records name are checked on reuse against the manifest written with the cache (`changed_media`:
a replaced, added or deleted image or clip makes the data render again). `save` writes
train/eval tables, stats.json and rejects.jsonl, atomically; `load` gives them back as
`SampleList`s that decode rows on access. Media are stored as raw bytes with each row's array
widths, so decoding needs no model constant.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_tools.render import ChatFormat

CACHE_VERSION = "5"
_COLUMNS = ("input_ids", "labels", "mm_token_type_ids", "modality", "origin", "dataset", "overflow")
# Media key → (dtype, column holding each row's array width). Position ids are (x, y) pairs.
_MEDIA = {"pixel_values": (np.uint8, "pixel_width"), "image_position_ids": (np.int32, None),
          "input_features": (np.float32, "feature_width")}
_PAIRS = 2
# Preference samples (data_tools.preference) carry one of these, branched samples
# (data_tools.steps) position ids; other rows store the default.
_OPTIONAL = {"rejected_ids": [], "desirable": -1, "position_ids": [], "columns": ""}


def cache_key(recipe, processor_dir: str, chat: ChatFormat | None = None) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    # Settings that cannot change a sample stay out, so e.g. num_proc 1 and 2 share a cache.
    data = {k: v for k, v in asdict(recipe.data).items() if k not in ("num_proc", "streaming", "cache_dir", "cache")}
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    if chat is not None:
        h.update(json.dumps(asdict(chat), sort_keys=True).encode())
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


def data_fingerprint(specs) -> str:
    """A hash of what the datasets `specs` hold: each spec and the content of its files (not
    their times: a copy or a touch is the same data). An adapter keeps it to tell, on resume or
    reuse, whether the records changed since it was trained (`finetune.model.provenance`)."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(json.dumps(asdict(spec), sort_keys=True, default=str).encode())
        for f in sorted(_files_of(spec.path)):
            h.update(f"{f.name}:{f.stat().st_size}:".encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _files_of(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return [f for f in p.rglob("*") if f.is_file()]
    # glob.glob, not Path.glob: an absolute pattern is as good as a relative one
    return [Path(f) for f in sorted(glob.glob(path, recursive=True))] if any(c in path for c in "*?[") else []


# ---------------------------------------------------------------- rows ↔ Arrow


def _features():
    import datasets

    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "mm_token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "modality": datasets.Value("string"), "origin": datasets.Value("string"),
        "dataset": datasets.Value("string"), "overflow": datasets.Value("string"),
        # Media as raw bytes: uint8 patches, int32 positions, float32 frames; each row's patch
        # and frame widths (values per patch / samples per frame) next to them, 0 without media.
        "pixel_values": datasets.Sequence(datasets.Value("binary")),
        "image_position_ids": datasets.Sequence(datasets.Value("binary")),
        "input_features": datasets.Sequence(datasets.Value("binary")),
        "pixel_width": datasets.Value("int32"), "feature_width": datasets.Value("int32"),
        "rejected_ids": datasets.Sequence(datasets.Value("int32")), "desirable": datasets.Value("int8"),
        "position_ids": datasets.Sequence(datasets.Value("int32")),
        "columns": datasets.Value("string"),  # a `prompt` record's other columns, as JSON
    })


def _width(arrays: list) -> int:
    widths = {np.shape(a)[-1] for a in arrays}
    if len(widths) > 1:  # one column width per row: the processor gives every array the same
        raise ValueError(f"the media arrays of one sample differ in width: {sorted(widths)}")
    return widths.pop() if widths else 0


def to_table(samples: list[dict]):
    """Sample dicts → a `datasets.Dataset` with the cache's columns."""
    import datasets

    cols = {c: [s[c] for s in samples] for c in _COLUMNS}
    cols |= {c: [s.get(c, default) for s in samples] for c, default in _OPTIONAL.items()}
    for key, (dtype, width) in _MEDIA.items():
        cols[key] = [[np.ascontiguousarray(a, dtype=dtype).tobytes() for a in s.get(key, [])]
                     for s in samples]
        if width:
            cols[width] = [_width(s.get(key, [])) for s in samples]
    return datasets.Dataset.from_dict(cols, features=_features())


def decode(row: dict) -> dict:
    """A cached row → the sample dict collate takes (media back as arrays)."""
    s = {k: row[k] for k in _COLUMNS}
    s |= {k: row[k] for k, default in _OPTIONAL.items() if row.get(k, default) != default}
    for key, (dtype, width) in _MEDIA.items():
        n = row[width] if width else _PAIRS
        s[key] = [np.frombuffer(b, dtype).reshape(-1, n) for b in row[key]]
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
def quiet_datasets():
    """Our own progress bar covers rendering; datasets' save/load bars would only add noise."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


# ---------------------------------------------------------------- the folder


def is_complete(folder: Path) -> bool:
    """A cache folder that a finished `save` wrote."""
    return (folder / "done").exists()


def save(folder: Path, train: list[dict], eval_: list[dict], stats: dict, rejects_path: Path,
         media: dict[str, list] | None = None) -> None:
    """Write the tables, stats, a copy of rejects.jsonl and the media manifest ({path: [size,
    mtime_ns] or [] for a missing file}) to `folder`, replacing it atomically: a killed run
    never leaves a half cache that looks done."""
    # One temporary folder per process: two runs preparing the same data at once each write
    # their own, and the second to finish finds the first's complete cache in place.
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with quiet_datasets():
        for name, rows in (("train", train), ("eval", eval_)):
            if rows:
                to_table(rows).save_to_disk(str(tmp / name))
    (tmp / "stats.json").write_text(json.dumps(stats))
    (tmp / "media.json").write_text(json.dumps(media or {}))
    shutil.copy(rejects_path, tmp / "rejects.jsonl")
    (tmp / "done").write_text("ok")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process's cache landed in between: the same data, keep it
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_complete(folder):
            raise


def changed_media(folder: Path) -> list[str]:
    """Media files the cached samples were made from (or looked for: a missing file rejected a
    record) whose size or mtime is not what it was: replaced, added or deleted since."""
    from data_tools.media import file_state

    manifest = folder / "media.json"
    if not manifest.exists():
        return [str(manifest)]
    return [p for p, state in json.loads(manifest.read_text()).items() if file_state(p) != state]


def load(folder: Path, rejects_path: Path) -> tuple[SampleList | list, SampleList | list, dict]:
    """(train, eval, stats) from a complete cache folder; its rejects copied to `rejects_path`."""
    import datasets

    with quiet_datasets():
        # An empty split is not saved: datasets cannot load a table with no shards.
        train, ev = (SampleList(datasets.load_from_disk(str(folder / n))) if (folder / n).exists() else []
                     for n in ("train", "eval"))
    stats = json.loads((folder / "stats.json").read_text())
    if rejects_path != folder / "rejects.jsonl":
        rejects_path.write_bytes((folder / "rejects.jsonl").read_bytes())
    return train, ev, stats
