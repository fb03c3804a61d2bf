"""What a dataset looks like, from a sample of its records, before anything is rendered.

`looks_like(record)` names the format a record's keys say it is in; `sample_records(spec, n)`
parses the first `n` records with the declared format and reports how they fared, so a wrong
`format:` (a LLaVA file declared as `messages`, say) is named before a model is loaded rather
than showing up as "0 used" after minutes of work. Given the recipe's data section, it also
decodes the media those records name (missing or undecodable files are named before training),
and `Sample.as_stats` lets the run's own yield rule (`accounting.check_yield`) judge the sample.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from data_tools.conversation import BadRecord


def looks_like(record) -> str | None:
    """The dataset format a record's keys suggest, or None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys or {"completion", "label"} <= keys:
        return "preference"
    if keys & {"instruction", "prompt", "question"} and keys & {"response", "output", "completion", "answer"}:
        return "instruction"
    if "text" in keys:
        return "text"
    return None


@dataclass
class Sample:
    """How the first records of one dataset parse in its declared format."""

    read: int = 0
    bad: list[BadRecord] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)  # what the bad ones look like

    def as_stats(self) -> dict:
        """The sample's counts in the shape of a dataset's stats (what `yield_problems` reads)."""
        return {"records": self.read, "used": self.read - len(self.bad), "rejected": len(self.bad),
                "rejected_by_reason": dict(Counter(b.reason for b in self.bad))}

    def wrong_format(self, declared: str) -> str | None:
        """The format most records look like, when most of them fail as `declared`."""
        wrong = [b for b in self.bad if b.reason in ("wrong_shape", "unparseable", "no_user_turn", "no_answer")]
        if not self.read or len(wrong) * 2 <= self.read:
            return None
        guess, _ = self.shapes.most_common(1)[0] if self.shapes else (None, 0)
        return guess if guess != declared else None


def sample_records(spec, n: int = 20, data=None) -> Sample:
    """Parse the first `n` records of `spec` (a `DatasetSpec`); with `data` (the recipe's data
    section: its media caps) also decode the media each names."""
    from data_tools.formats import parse_record
    from data_tools.media import load_media
    from data_tools.sources import iter_records

    out = Sample()
    for origin, record, base_dir in iter_records(spec):
        if out.read >= n:
            break
        out.read += 1
        try:
            if isinstance(record, BadRecord):
                raise record
            conv = parse_record(record, spec.format, origin, base_dir)
            if data is not None:
                load_media(conv, data)
        except BadRecord as e:
            out.bad.append(e)
            guess = looks_like(record if isinstance(record, dict) else None)
            if guess:
                out.shapes[guess] += 1
        except KeyError:  # a format this module has no parser for (an objective's own)
            return Sample()
    return out
