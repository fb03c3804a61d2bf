"""Training objectives, one module each (see `finetune.objectives.base` for the interface)."""

from finetune.objectives import sft  # noqa: F401  (registers "sft")
from finetune.objectives.base import Objective, build, get, names, register

__all__ = ["Objective", "build", "get", "names", "register"]
