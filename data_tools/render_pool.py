"""Records → results: parse, load media and render each record, in this process or a fork pool.

A result is a sample dict (the renderer's output plus modality, origin and dataset) or a reject
dict (`{"rejected": reason, "detail", "origin", "dataset", "record"}`), one per record, in
order. `RecordWorker` does one chunk of records; `render_all` runs it over every record of the
recipe's datasets (`num_proc` forked processes), and `collect` counts the results in a
`Ledger` and keeps the samples.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from data_tools.accounting import Ledger, Stats, dataset_name
from data_tools.conversation import BadRecord, Conversation
from data_tools.formats import prompt_columns
from data_tools.render import ChatFormat, Renderer, RenderSettings

CHUNK = 16  # records per render call: samples with the same media share one processor call

# One record on its way: (origin, record or BadRecord, base_dir, format, dataset name).
Item = tuple[str, dict | BadRecord, str, str, str]


class RecordWorker:
    """Parses, loads media and renders records under the recipe's data section (`data`);
    worker processes get it by fork, unpickled."""

    def __init__(self, processor, data, chat: ChatFormat):
        self.data = data
        self.renderer = Renderer(processor, RenderSettings(
            max_seq_len=data.max_seq_len, train_on=data.train_on, image_tokens=data.image_tokens,
            overflow=data.overflow, thinking=data.thinking), chat)

    def conversation(self, origin: str, record, base_dir: str, fmt: str) -> Conversation:
        from data_tools.formats import parse_record

        if isinstance(record, BadRecord):
            raise record
        if fmt == "preference":  # the prompt + chosen answer; pairs render in data_tools.preference
            from data_tools.preference import parse_preference

            return parse_preference(record, origin, base_dir).chosen
        return parse_record(record, fmt, origin, base_dir)

    def parse(self, item: Item) -> Conversation:
        """The conversation of one item, tagged with its dataset; raises BadRecord."""
        origin, record, base_dir, fmt, dataset = item
        conv = self.conversation(origin, record, base_dir, fmt)
        conv.dataset = dataset
        return conv

    def with_media(self, conv: Conversation) -> tuple[Conversation, list, list]:
        """(conversation, images, audios) with its media decoded; raises BadRecord."""
        from data_tools.media import load_media

        return (conv, *load_media(conv, self.data))

    def load(self, item: Item) -> tuple[Conversation, list, list]:
        """(conversation, images, audios) of one item; raises BadRecord."""
        return self.with_media(self.parse(item))

    def __call__(self, items: list[Item]) -> list[dict]:
        """One result per item, in order: a sample dict, or {'rejected': reason, ...}. Each also
        carries `media_files` ({path: [size, mtime_ns] or [] if missing}) for the cache key."""
        if any(item[3] == "preference" for item in items):
            from data_tools.preference import PreferenceWorker

            self.preference = getattr(self, "preference", None) or PreferenceWorker(self)
            return self.preference(items)
        out: list = [None] * len(items)
        todo = []
        files: list[dict] = [{} for _ in items]
        for k, item in enumerate(items):
            try:
                conv = self.parse(item)  # once: the manifest needs the media a failing record names too
                files[k] = media_files(conv)
                todo.append((k, self.with_media(conv)))
            except BadRecord as e:
                out[k] = _reject(e, item)
        rendered = self.renderer.render_many([loaded for _, loaded in todo])
        for (k, (conv, _, _)), r in zip(todo, rendered):
            if isinstance(r, BadRecord):
                out[k] = _reject(r, items[k])
            else:
                r.update(modality=conv.modality(), origin=items[k][0], dataset=items[k][4],
                         media_actions=list(conv.media_actions))
                if items[k][3] == "prompt":  # its other columns go to the reward functions
                    r["columns"] = prompt_columns(conv.raw)
                out[k] = r
        for r, f in zip(out, files):
            r["media_files"] = f
        return out


def media_files(conv: Conversation) -> dict[str, list]:
    """{path: [size, mtime_ns] or []} of every media file `conv` names on disk."""
    from data_tools.media import file_state, local_path

    paths = (local_path(p, conv.base_dir) for p in conv.media())
    return {path: file_state(path) for path in paths if path}


def _reject(e: BadRecord, item: Item) -> dict:
    origin, record, _, _, dataset = item
    # The record as read (or the text of an unparseable line), so rejects.jsonl can be fixed.
    raw = record if isinstance(record, dict) else e.raw
    return {"rejected": e.reason, "detail": e.detail, "origin": e.origin or origin,
            "dataset": dataset, "record": raw}


@contextlib.contextmanager
def one_thread():
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


def records(specs, keep: Callable[[str], bool] | None = None,
            names: list[str] | None = None) -> Iterator[Item]:
    """Every record of `specs` as an item, datasets one after another; `keep(origin)` filters
    before anything is parsed, `names` overrides `dataset_name`."""
    from data_tools.sources import iter_records

    for i, spec in enumerate(specs):
        name = names[i] if names else dataset_name(i, spec)
        for origin, record, base_dir in iter_records(spec):
            if keep is None or keep(origin):
                yield origin, record, base_dir, spec.format, name


def chunks(items: Iterable, n: int = CHUNK) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# The pool's worker: set before the fork, so the forked processes inherit it.
_WORKER: RecordWorker | None = None


def _run(items):
    return _WORKER(items)


def _init_pool_worker():
    import torch

    torch.set_num_threads(1)


def render_all(specs, processor, data, chat: ChatFormat, *, num_proc: int = 1,
               keep=None) -> Iterator[dict]:
    """Yield one result per record, in order: a sample dict, or {'rejected': reason, ...}.

    `keep(origin)` selects records before anything is parsed or rendered.
    """
    global _WORKER
    _WORKER = RecordWorker(processor, data, chat)
    todo = chunks(records(specs, keep))
    if num_proc <= 1:
        for chunk in todo:
            with one_thread():  # only around rendering: a consumer between yields keeps its threads
                results = _WORKER(chunk)
            yield from results
        return
    # fork shares the processor with the workers without pickling it; they start with one
    # thread each (set before the fork, restored right after). gc.freeze: the workers' garbage
    # collector would otherwise write to every inherited object and copy their pages.
    gc.freeze()
    with one_thread():
        pool = mp.get_context("fork").Pool(num_proc, initializer=_init_pool_worker)
    gc.unfreeze()
    with pool:
        for results in pool.imap(_run, todo):
            yield from results


def collect(specs, processor, data, chat: ChatFormat, *, rejects_path: Path | None, progress=True,
            desc="data", keep=None, num_proc: int | None = None) -> tuple[list[dict], dict[str, Stats], Stats, dict]:
    """Render every record of `specs`; return (samples, stats per dataset, total stats, the media
    files read: {path: [size, mtime_ns] or []})."""
    from tqdm import tqdm

    ledger = Ledger(data.on_bad_record, rejects_path)
    num_proc = data.num_proc if num_proc is None else num_proc
    results = render_all(specs, processor, data, chat, num_proc=num_proc, keep=keep)
    samples = [r for r in tqdm(results, desc=desc, unit=" rec", disable=not progress, leave=False)
               if ledger.add(r)]
    return samples, ledger.per, ledger.total(), ledger.media
