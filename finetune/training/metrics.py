"""`metrics.jsonl` (one line per step), the trackers (tensorboard/wandb) and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """`metrics.jsonl`, one line per step, appended every `every` steps and at checkpoints.

    On resume the lines after the checkpoint's step (written before the kill) are dropped,
    so the file always tells the story of the weights that exist.
    """

    def __init__(self, out: Path, accelerator, *, resume_step: int = 0, every: int = 1):
        self.path = out / "metrics.jsonl"
        self.acc, self.every = accelerator, every
        self.rows: list[dict] = []
        if resume_step and self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]
        self._written = len(self.rows)
        if self.acc.is_main_process:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.acc.is_main_process:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])
        if row["step"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if self.acc.is_main_process and self._written < len(self.rows):
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows[self._written:]))
        self._written = len(self.rows)

    def plot(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if "loss" in r]
        evals = [r for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)


class EvalWatch:
    """The best eval loss so far, for `train.keep_best` and `train.early_stopping_patience`."""

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.best: float | None = None
        self.best_step = 0
        self.since = 0  # evals since the best

    def update(self, step: int, loss: float) -> tuple[bool, bool]:
        """(improved, stop now)."""
        improved = self.best is None or loss < self.best
        if improved:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        return improved, bool(self.patience) and self.since >= self.patience


def available_trackers(report_to: list[str]) -> list[str]:
    """The trackers of `train.report_to` that can run here (wandb only when installed)."""
    return [r for r in report_to if r != "wandb" or _has_wandb()]


def _has_wandb() -> bool:
    try:
        import wandb  # noqa: F401

        return True
    except ImportError:
        return False
