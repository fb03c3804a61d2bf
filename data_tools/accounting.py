"""Exact accounting of a data pass: every record read is a used sample or a reject with a reason.

`Stats` holds the counts (records, used, rejected by reason, tokens by kind, lengths) and
`Stats.check()` asserts `records == used + rejected`. `Ledger` keeps one `Stats` per dataset,
writes each reject to rejects.jsonl, and raises at the first bad record under
`on_bad_record: error`. `dataset_name` is how a dataset is named in all of these.
`check_yield` is the one rule every data pass ends with (train, `data stats`, `validate`): no
dataset may lose all its records, more than `data.max_rejected_fraction` of them, or any to a
cut-off media file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.render import IGNORE
from finetune.errors import UserError

HIST_BINS = 20
# Rejects that fail a run whatever their share: the file is damaged, not the record unsuitable.
FATAL_REASONS = ("truncated_media",)
# Reasons that mean the records are not in the declared layout (`format:`).
FORMAT_REASONS = ("wrong_shape", "unparseable", "no_user_turn", "no_answer")


def dataset_name(i: int, spec) -> str:
    """How a dataset is named in stats, samples and rejects: its index and file name."""
    return f"{i}:{Path(spec.path).name}"


def n_label_tokens(sample: dict) -> int:
    return sum(1 for x in sample["labels"] if x != IGNORE)


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
        for action in s.get("media_actions", ()):  # set while decoding; not kept in the cache
            self.overflow_actions[action] += 1

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


LONG_TEXT = 1000  # characters: longer strings in a rejected record are inline media (base64, data: URLs)


def slim(value):
    """A rejected record as rejects.jsonl keeps it: media bytes and inline media text replaced by
    their size (the record's origin points at the original), everything else as read."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str) and len(value) > LONG_TEXT:
        return f"{value[:40]}… <{len(value)} characters>"
    if isinstance(value, dict):
        return {k: slim(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [slim(v) for v in value]
    return value


class Ledger:
    """Counts every result per dataset and writes rejects; raises at the first bad record
    when `on_bad_record: error`."""

    def __init__(self, on_bad_record: str, rejects_path: Path | None):
        self.on_bad_record = on_bad_record
        self.rejects_path = rejects_path
        self.per: dict[str, Stats] = {}
        self.media: dict[str, list] = {}  # every media file read or looked for: {path: [size, mtime_ns] or []}

    def add(self, r: dict) -> bool:
        """Count `r` (a sample dict or a reject dict); True when it is a sample."""
        self.media.update(r.pop("media_files", None) or {})
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
                line = {k: r[k] for k in ("origin", "dataset", "detail")} | {"record": slim(r["record"])}
                f.write(json.dumps(line | {"reason": r["rejected"]}, default=str) + "\n")
        return False

    def total(self) -> Stats:
        """All datasets together, each checked (records == used + rejected) on the way."""
        total = Stats()
        for st in self.per.values():
            st.check()
            total.merge(st)
        total.check()
        return total


def yield_problems(datasets: dict[str, dict], max_rejected_fraction: float) -> list[tuple[str, str, str]]:
    """What is wrong with each dataset's yield ({name: Stats dict}): (name, kind, line) per dataset,
    kind being "empty", "fraction" or "truncated"."""
    out = []
    for name, d in datasets.items():
        reasons = {k: v for k, v in d["rejected_by_reason"].items() if v}
        fatal = {k: reasons[k] for k in FATAL_REASONS if k in reasons}
        if d["used"] == 0:
            out.append((name, "empty", f"{name} yielded no usable sample: all {d['records']} records "
                        f"rejected {reasons or ''}"))
        elif d["rejected"] > max_rejected_fraction * d["records"]:
            out.append((name, "fraction", f"{name} lost {d['rejected']} of {d['records']} records, over "
                        f"data.max_rejected_fraction={max_rejected_fraction} {reasons}"))
        elif fatal:
            out.append((name, "truncated", f"{name}: {sum(fatal.values())} record(s) name a media "
                        f"file that is cut off {fatal}"))
    return out


def check_yield(stats: dict, max_rejected_fraction: float, rejects: str = "rejects.jsonl") -> None:
    """Raise one UserError naming every dataset (train and eval) that breaks the rule (see the
    module docstring); `stats` is `prepare`'s {"datasets": {...}, "eval_datasets": {...}}."""
    groups = {**(stats.get("datasets") or {}),
              **{f"eval {k}": v for k, v in (stats.get("eval_datasets") or {}).items()}}
    problems = yield_problems(groups, max_rejected_fraction)
    if not problems:
        return
    reasons = {k for name, _, _ in problems for k, v in groups[name]["rejected_by_reason"].items() if v}
    fix = f"See {rejects} for each rejected record and why (`finetune data stats` counts them)"
    if reasons & set(FORMAT_REASONS):
        fix += "; check the dataset's format: (`finetune validate` names the format its records look like)"
    kinds = {kind for _, kind, _ in problems}
    if reasons & set(FATAL_REASONS):
        fix += "; replace the cut-off media files"
    if "fraction" in kinds:
        fix += "; or raise data.max_rejected_fraction if losing these records is intended"
    raise UserError("datasets", "; ".join(line for _, _, line in problems), fix)
