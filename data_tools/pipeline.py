"""`prepare()`: recipe datasets → the train and eval samples a run uses, with their accounting.

Every record read ends up in exactly one place: a used sample, or a reject with a reason
(`data_tools.accounting`). Two ways to get training samples:
- cached (default): one pass renders everything (`data.num_proc` processes,
  `data_tools.render_pool`), mixes by weight (`data_tools.mixing`), and stores the result as
  Arrow keyed by a hash of the data section, the processor files, the chat format and this
  package's code (`data_tools.cache`); the next run loads it in well under a second.
- streaming (`data.streaming: true`): `data_tools.streaming.StreamingSamples` renders record by
  record while the trainer consumes them; nothing is written but rejects.jsonl, and the
  accounting is complete when the first epoch ends.

Every pass ends with `data_tools.accounting.check_yield` (a dataset that lost all its records, more
than `data.max_rejected_fraction`, or any to a cut-off media file stops the run), unless the
caller asks to check later (`check=False`: `data stats` prints its counts first).

Model-specific facts arrive as arguments: the processor, its folder, the model family's chat
format. Where rejects.jsonl goes is the caller's choice (`rejects_path`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from data_tools import cache
from data_tools.accounting import check_yield
from data_tools.mixing import held_out, mix, split_eval
from data_tools.render import ChatFormat
from data_tools.render_pool import collect
from data_tools.streaming import LazyList, StreamingSamples


@dataclass
class Prepared:
    train: object  # SampleList, list of dicts, or StreamingSamples
    eval: object  # SampleList, list, or (streaming) a list built on first use
    stats: dict  # {"total": Stats dict, "datasets": {name: Stats dict}, "eval": Stats dict | None}
    cache_dir: str | None
    from_cache: bool
    streaming: bool = False

    def render_eval(self) -> None:
        """Render the held-out records now: a streamed run renders them on first use, and its
        accounting (rejects included) is complete only once they are."""
        if hasattr(self.eval, "materialize"):
            self.eval.materialize()


def prepare(recipe, processor, processor_dir: str, *, rejects_path: Path, chat: ChatFormat,
            log=None, use_cache: bool = True, streaming: bool | None = None, check: bool = True) -> Prepared:
    """Everything the trainer needs from the recipe's datasets and data section, cached by
    content hash.

    `processor_dir`: the folder (or hub id) the processor came from, hashed into the cache key.
    `rejects_path`: where rejects.jsonl is written (its folder must exist).
    `chat`: the model family's chat format. `log`: a callback for progress lines; None is
    silent and also hides the progress bar.
    `streaming` overrides `data.streaming` (e.g. `data stats` wants the full pass).
    `check`: apply `check_yield` (a streamed pass is checked by its consumer when it completes).
    """
    quiet = log is None
    log = log or (lambda *_: None)
    rejects_path = Path(rejects_path)
    streaming = recipe.data.streaming if streaming is None else streaming
    if streaming:
        return _prepare_streaming(recipe, processor, chat, rejects_path, log)
    use_cache = use_cache and recipe.data.cache
    d = recipe.data
    cdir = cache_folder(recipe, processor_dir, chat)
    if use_cache and cache.is_complete(cdir):
        changed = cache.changed_media(cdir)
        if not changed:
            t0 = time.time()
            train, ev, stats = cache.load(cdir, rejects_path)
            if check:
                check_yield(stats, d.max_rejected_fraction, str(rejects_path))
            log(f"data: reusing cached tokenized data {cdir} ({len(train)} train, {len(ev)} "
                f"eval, {time.time() - t0:.2f}s; data.cache=false or `finetune data clear-cache` "
                "renders again)")
            return Prepared(train, ev, stats, str(cdir), from_cache=True)
        log(f"data: {len(changed)} media file(s) changed since {cdir} was written (e.g. {changed[0]}): "
            "rendering again")

    rejects_path.write_text("")
    t0 = time.time()
    samples, per, total, media = collect(recipe.datasets, processor, d, chat, rejects_path=rejects_path,
                                         progress=not quiet, desc="train data")
    if recipe.eval_datasets:
        train_s = samples
        eval_s, eval_per, eval_total, eval_media = collect(recipe.eval_datasets, processor, d, chat,
                                                    rejects_path=rejects_path, progress=not quiet,
                                                    desc="eval data")
        media |= eval_media
    else:
        train_s, eval_s = split_eval(samples, d.eval_fraction, d.seed)
        eval_total, eval_per = None, {}
    train_s = mix(train_s, recipe.datasets, d.mix_by, d.seed)
    stats = {"total": total.to_dict(), "datasets": {k: v.to_dict() for k, v in per.items()},
             "eval": eval_total.to_dict() if eval_total else None,
             "eval_datasets": {k: v.to_dict() for k, v in eval_per.items()}}
    log(f"data: {total.records} records → {total.used} used, {total.rejected} rejected "
        f"{dict(total.rejected_by_reason) or ''} in {time.time() - t0:.1f}s; "
        f"{len(train_s)} train samples after mixing, {len(eval_s)} eval")
    for name, st in per.items():
        if st.overflow_actions:
            done = ", ".join(f"{k} {v}" for k, v in st.overflow_actions.items())
            log(f"data: {name}: media and overflow actions: {done} (data_stats.json overflow_actions)")
    if check:
        check_yield(stats, d.max_rejected_fraction, str(rejects_path))
    if not use_cache:
        return Prepared(train_s, eval_s, stats, None, False)
    cache.save(cdir, train_s, eval_s, stats, rejects_path, media)
    log(f"data: cached in {cdir}")
    # Served from the cache even now, so this run and the next see the same row-decoding views.
    train, ev, stats = cache.load(cdir, rejects_path)
    return Prepared(train, ev, stats, str(cdir), from_cache=False)


def cache_folder(recipe, processor_dir: str, chat: ChatFormat) -> Path:
    """Where `prepare` keeps (or finds) this recipe's tokenized data."""
    return Path(recipe.data.cache_dir) / cache.cache_key(recipe, processor_dir, chat)


def _prepare_streaming(recipe, processor, chat: ChatFormat, rejects_path: Path, log) -> Prepared:
    rejects_path.write_text("")
    d = recipe.data
    stats: dict = {"total": None, "datasets": {}, "eval": None, "streaming": True}
    holdout = 0.0 if recipe.eval_datasets else d.eval_fraction
    train = StreamingSamples(recipe.datasets, processor, d, chat, rejects_path, holdout=holdout,
                             stats_out=stats, log=log)

    def make_eval() -> list:
        # In the training process, mid-run: no worker pool (no fork after CUDA is up), and
        # only the rank that counts writes rejects.
        kw = {"rejects_path": rejects_path if train.counts_records else None, "progress": False,
              "num_proc": 1}
        if recipe.eval_datasets:
            samples, _, total, _ = collect(recipe.eval_datasets, processor, d, chat, **kw)
        elif holdout:
            # The records the train stream skips: one read of the sources, only these rendered.
            samples, _, total, _ = collect(recipe.datasets, processor, d, chat,
                                        keep=lambda o: held_out(o, holdout, d.seed), **kw)
        else:
            return []
        stats["eval"] = total.to_dict()
        return samples

    log("data: streaming: samples are rendered as training consumes them (no cache); the "
        "accounting is complete after the first epoch")
    return Prepared(train, LazyList(make_eval), stats, None, False, streaming=True)
