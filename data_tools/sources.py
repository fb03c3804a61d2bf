"""Read dataset records from disk or the hub: one dict per record, with where it came from.

`iter_records` yields `(origin, record, base_dir)`:
- `origin` names the file and the record: `data/train.jsonl:17` (1-based line) for JSON Lines,
  `data/train.csv:row 3` (1-based: the third record) for everything else, so the numbers mean
  the same in every format;
- `record` is a dict with `columns` renaming applied, or a `BadRecord` for a record that cannot
  be read (an unparseable JSONL line, a non-object row). Those are yielded rather than raised so
  one bad line never aborts a run: the caller counts or rejects them like any other bad record;
- `base_dir` is the absolute folder of the file, against which relative media paths resolve.

Problems with the source as a whole (missing path, empty or binary file, a folder without data
files, a hub dataset that cannot be reached) raise `UserError`.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterator

from data_tools.conversation import BadRecord
from data_tools.locations import is_hub_id
from finetune.errors import UserError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Columns that hold lists/objects; a CSV can only carry them as JSON text.
_STRUCTURED = ("messages", "conversations", "images", "audios")
_SNIFF_BYTES = 8192
_BATCH = 256

# A CSV cell holding a base64 image easily exceeds the csv module's 128 KiB field default.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

Record = tuple[str, dict | BadRecord, str]


def iter_records(spec, *, base_dir: str | None = None) -> Iterator[Record]:
    """Every record of `spec` (a `DatasetSpec`), renamed and capped at `spec.max_samples`.

    A relative `spec.path` resolves against `base_dir` (the recipe's folder) when given.
    """
    kind, target = _resolve(spec, base_dir)
    if kind == "files":
        structured = {spec.columns.get(name, name) for name in _STRUCTURED}
        records = (r for path in target for r in _read_file(path, structured))
    else:
        records = _read_hf(spec, kind, target, base_dir)
    media_root = getattr(spec, "media_root", None)
    for n, (origin, record, folder) in enumerate(records, 1):
        if isinstance(record, dict):
            record = _rename(record, spec.columns)
        # LLaVA-style data keeps its images elsewhere: relative media paths resolve there.
        yield origin, record, os.path.abspath(media_root) if media_root else folder
        if spec.max_samples is not None and n >= spec.max_samples:
            return


def check_source(spec, *, base_dir: str | None = None) -> None:
    """Cheap check that `spec` can be read (exists, not empty, not binary); raises `UserError`."""
    kind, target = _resolve(spec, base_dir)
    if kind == "files":
        for path in target:
            _sniff(path)
            if path.endswith(".parquet") and _parquet(path).metadata.num_rows == 0:
                raise UserError(path, "the Parquet file holds no rows", "remove it or fill it")
    elif kind == "disk":
        _load_disk(spec, target)
    else:
        import datasets

        try:
            datasets.load_dataset_builder(target)
        except (OSError, ValueError) as e:
            raise _hub_error(spec.path, e) from None


# -- finding the files ---------------------------------------------------------------------

def _resolve(spec, base_dir: str | None) -> tuple[str, list[str] | str]:
    """("files", [paths]) | ("disk", folder saved by `save_to_disk`) | ("hub", dataset id)."""
    given = os.path.expanduser(spec.path)
    path = os.path.normpath(os.path.join(base_dir, given) if base_dir else given)
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return "disk", path
        files = _data_files(glob.glob(os.path.join(path, "**", "*"), recursive=True))
        if not files:
            raise UserError(path, "the folder holds no .jsonl, .json, .parquet or .csv files",
                            "point `path` at a data file, or put data files in the folder")
        return "files", files
    if os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise UserError(path, f"unsupported file type {os.path.splitext(path)[1] or '(none)'}",
                            "use .jsonl, .json, .parquet or .csv")
        return "files", [path]
    if any(c in given for c in "*?["):
        files = _data_files(glob.glob(path, recursive=True))
        if not files:
            raise UserError(path, "no .jsonl, .json, .parquet or .csv file matches this pattern",
                            "check the pattern")
        return "files", files
    # `owner/name` that is not on disk is a hub id, unless it plainly meant a local file or folder.
    first = os.path.join(base_dir or "", spec.path.split("/")[0])
    if is_hub_id(spec.path, base_dir) and not spec.path.endswith(DATA_SUFFIXES) and not os.path.isdir(first):
        return "hub", spec.path
    raise UserError(path, "no such file or folder",
                    "check the path (relative paths are relative to the recipe's folder)")


def _data_files(paths: list[str]) -> list[str]:
    return sorted(p for p in paths if p.endswith(DATA_SUFFIXES) and os.path.isfile(p))


def _is_saved_dataset(folder: str) -> bool:
    names = set(os.listdir(folder))
    return "dataset_dict.json" in names or {"state.json", "dataset_info.json"} <= names


# -- files -----------------------------------------------------------------------------------

def _sniff(path: str) -> None:
    """Refuse empty and binary files before reading them record by record."""
    if os.path.getsize(path) == 0:
        raise UserError(path, "the file is empty", "remove it or fill it")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if path.endswith(".parquet"):
        if not head.startswith(b"PAR1"):
            raise UserError(path, "not a Parquet file", "check the file, or rename it to its real type")
        return
    if b"\0" in head:
        raise UserError(path, "the file is binary, not UTF-8 text", "save it as UTF-8 JSON/CSV text")
    if not head.strip() and len(head) < _SNIFF_BYTES:
        raise UserError(path, "the file holds only whitespace", "remove it or fill it")


def _read_file(path: str, structured: set[str]) -> Iterator[Record]:
    _sniff(path)
    folder = os.path.dirname(os.path.abspath(path))
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
              ".csv": lambda p: _read_csv(p, structured)}[os.path.splitext(path)[1]]
    empty = True
    for origin, record in reader(path):
        empty = False
        yield origin, record, folder
    if empty:
        raise UserError(path, "the file holds no records", "remove it or fill it")


def _as_record(value, origin: str) -> dict | BadRecord:
    if isinstance(value, dict):
        return value
    return BadRecord("wrong_shape", f"a JSON {type(value).__name__}, not an object", origin, raw=value)


def _read_jsonl(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad record, not a crash
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            origin = f"{path}:{line_no}"
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                yield origin, BadRecord("unparseable", f"not valid JSON: {e}", origin, raw=text)
                continue
            yield origin, _as_record(value, origin)


def _read_json(path: str) -> Iterator[tuple[str, dict | BadRecord]]:
    with open(path, "rb") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        # JSON Lines saved as .json is common: read it as such when the first line is an object.
        first = next((line for line in text.splitlines() if line.strip()), b"")
        try:
            looks_jsonl = isinstance(json.loads(first), dict)
        except (ValueError, RecursionError):
            looks_jsonl = False
        if looks_jsonl:
            yield from _read_jsonl(path)
            return
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else path
        raise UserError(where, f"not valid JSON ({getattr(e, 'msg', e)})",
                        "fix the file, or save one object per line as .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(path, "a JSON file must hold an array of records or {\"data\": [...]}",
                        "wrap the records in a list, or save one object per line as .jsonl")
    for i, value in enumerate(data):
        origin = f"{path}:row {i + 1}"
        yield origin, _as_record(value, origin)


def _parquet(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(path, f"cannot read the Parquet file ({e})", "check the file") from None


def _read_parquet(path: str) -> Iterator[tuple[str, dict]]:
    i = 0
    for batch in _parquet(path).iter_batches(batch_size=_BATCH):
        for row in batch.to_pylist():
            yield f"{path}:row {i + 1}", row
            i += 1


def _read_csv(path: str, structured: set[str]) -> Iterator[tuple[str, dict | BadRecord]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: drop Excel's BOM
        reader = csv.DictReader(f)
        try:
            for i, row in enumerate(reader):
                origin = f"{path}:row {i + 1}"
                if None in row:  # DictReader files extra fields under the key None
                    yield origin, BadRecord("unparseable", "more fields than the header has", origin,
                                            raw=row[None])
                    continue
                yield origin, {k: _csv_cell(v, k in structured) for k, v in row.items()}
        except UnicodeDecodeError:
            raise UserError(path, "the file is not UTF-8 text", "re-save it as UTF-8") from None
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}", f"malformed CSV ({e})", "fix the row") from None


def _csv_cell(value: str | None, structured: bool):
    """CSV has no null and no lists: an empty cell is missing, a list/object column is JSON text."""
    if value is None or value == "":
        return None
    if structured and value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value  # left as text: the format parser reports the wrong shape
    return value


# -- Hugging Face datasets ---------------------------------------------------------------------

def _load_disk(spec, folder: str):
    import datasets

    try:
        ds = datasets.load_from_disk(folder)
    except (OSError, ValueError) as e:
        raise UserError(folder, f"cannot load the saved dataset ({e})", "save it again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        split = spec.split or ("train" if "train" in ds else names[0] if len(names) == 1 else None)
        if split not in ds:
            raise UserError(folder, f"split {spec.split!r} not found; it has {', '.join(names)}",
                            "set `split` to one of them")
        return ds[split], split
    return ds, spec.split or "train"


def _hub_error(name: str, e: Exception) -> UserError:
    return UserError(name, f"cannot load this dataset from the Hugging Face hub ({e})",
                     "check the id and your connection, or download it and give a local path")


def _read_hf(spec, kind: str, target: str, base_dir: str | None) -> Iterator[Record]:
    if kind == "disk":
        ds, split = _load_disk(spec, target)
        name, folder = target, os.path.abspath(target)
    else:
        import datasets

        split = spec.split or "train"
        try:
            ds = datasets.load_dataset(target, split=split)
        except (OSError, ValueError) as e:  # offline, unknown id, gated, missing split
            raise _hub_error(target, e) from None
        name, folder = target, os.path.abspath(base_dir or ".")
    if len(ds) == 0:
        raise UserError(f"{name}[{split}]", "the dataset holds no rows", "pick another split")
    # Arrow rows, not decoded ones: Image/Audio columns stay {"bytes", "path"} (no PIL or
    # torchcodec decoding here; data_tools.media decodes with the recipe's caps).
    i = 0
    for table in ds.with_format("arrow").iter(batch_size=_BATCH):
        for row in table.to_pylist():
            yield f"{name}[{split}]:row {i + 1}", row, folder
            i += 1


def _rename(record: dict, columns: dict[str, str]) -> dict:
    """Apply `columns` ({our_name: their_name}) all at once, so swaps and chains work."""
    if not columns:
        return record
    theirs = set(columns.values())
    out = {k: v for k, v in record.items() if k not in theirs}
    out.update({ours: record[their] for ours, their in columns.items() if their in record})
    return out
