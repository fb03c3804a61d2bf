"""Training objectives: the contract (`base`), the registry, and the built-in SFT and preference losses.

Feature packages register more (the drafter's alignment, GRPO); see `finetune.objectives.base`.
"""

from finetune.objectives import kto, preference, sft  # noqa: F401  (register kto; dpo, orpo; sft)
from finetune.objectives.base import Objective, build, get, names, register

__all__ = ["Objective", "build", "get", "names", "register"]
