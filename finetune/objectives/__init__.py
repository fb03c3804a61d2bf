"""Training objectives, one module each (see `finetune.objectives.base` for the interface)."""

from finetune.objectives import drafter, kto, preference, sft  # noqa: F401  (register drafter; kto; dpo, orpo; sft)
from finetune.objectives.base import Objective, build, get, names, register

__all__ = ["Objective", "build", "get", "names", "register"]
