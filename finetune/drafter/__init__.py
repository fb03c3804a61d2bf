"""Gemma 4's MTP drafter as one feature: the model, its unrolled drafting, the alignment objective,
its memory plan, its export and acceptance measurement.

It registers itself where the rest of the product looks things up, the way PEFT's tuners do:
`train.objective: drafter` (objective.py) and `finetune export --format drafter` (export.py).
The registries know this package by module path and import it on first use
(`finetune.registry`), so nothing below it imports it.
"""
