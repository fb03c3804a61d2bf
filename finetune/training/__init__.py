"""The one training engine: an explicit loop on accelerate, shared by every objective.

`finetune.training.loop.train` is the entry point; the other modules are its named steps.
"""
