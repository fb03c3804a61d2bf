"""What a resumed run may change, and stopping a run cleanly on Ctrl-C or SIGTERM.

`check_resume` compares the recipe with the run's `recipe.lock.yaml` before anything loads:
edits that change the adapter's shapes or what is trained are refused (the checkpoint could not
be loaded, or would mean something else), other edits are allowed with a warning naming them,
and bookkeeping keys (how long, how often to save or log) pass silently.

`StopRequest` turns the first SIGINT/SIGTERM into a request the loop honours at the end of the
current step (a checkpoint is written there); a second one stops at once.
"""

from __future__ import annotations

import signal
from pathlib import Path

from finetune.errors import UserError

REFUSED = ("model.base", "model.quantization", "lora.r", "lora.targets", "train.objective")
SILENT = ("train.max_steps", "train.epochs", "train.save_every", "train.keep_checkpoints", "train.eval_every",
          "train.preview_every", "train.preview_items", "train.log_every", "train.report_to",
          "train.output_dir", "train.keep_best", "train.early_stopping_patience", "data.num_proc",
          "data.cache", "data.cache_dir", "eval.")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flat(v, key + ".")
        else:
            out[key] = v
    return out


def check_resume(recipe, out: Path, log) -> None:
    """Refuse shape-changing edits since the run began (exit 2 naming them); warn about the rest."""
    from finetune.config.yaml_io import read_yaml

    lock = Path(out) / "recipe.lock.yaml"
    if not lock.is_file():
        return
    # The lock is `recipe.to_dict()` as the run began: compared as written, not loaded again
    # (loading would resolve relative paths against the run folder and report them as edits).
    before, now = _flat(read_yaml(lock) or {}), _flat(recipe.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    refused = [k for k in changed if k in REFUSED]
    if refused:
        raise UserError(", ".join(refused), f"changed since the run in {out} began "
                        f"({'; '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in refused)}); "
                        "its checkpoints can't be resumed with that", "Put them back, or train into a new "
                        "train.output_dir (or pass --overwrite to start this one over)")
    warned = [k for k in changed if not k.startswith(SILENT)]
    if warned:
        log(f"resume: warning: changed since the run began: "
            f"{'; '.join(f'{k}: {before.get(k)!r} -> {now.get(k)!r}' for k in warned)}")


class StopRequest:
    """Context: the first SIGINT/SIGTERM sets `requested` (the loop saves and stops after the
    current step); a second one raises KeyboardInterrupt at once. Inert outside the main thread."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the handlers alone
            self._old = {}
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
