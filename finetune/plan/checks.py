"""Pre-flight checks: every mistake in a recipe found before a model is loaded, all at once.

`preflight` runs for `finetune validate` and at the start of `train`: the base exists, the
data sources can be read, a sample of every dataset's records parses in its declared format
(a wrong `format:` is named with the format the records look like), LoRA targets match modules
of the model, trackers are importable, and the output folder can be used. `sharding_problems`:
what FSDP2 can't run, checked when a launch asks for FSDP (and by `finetune plan --strategy fsdp`).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from finetune.errors import RecipeErrors, UserError

SAMPLE = 20  # records parsed per dataset
SHOW_BAD = 20  # bad records listed under on_bad_record: error


def preflight(recipe, *, data: bool = True, model: bool = True) -> None:
    """Raise `RecipeErrors` with every problem found (see the module docstring)."""
    errors: list[UserError] = []
    if model:
        errors += _base(recipe)
        errors += _targets(recipe)
    errors += _trackers(recipe)
    errors += _output(recipe)
    if data:
        errors += _data(recipe)
    if errors:
        raise RecipeErrors(errors)


def _base(recipe) -> list[UserError]:
    from finetune.model.load import check_base_path

    try:
        check_base_path(recipe.model.base, recipe.model.allow_pickle)
    except UserError as e:
        return [e]
    return []


def _data(recipe) -> list[UserError]:
    from data_tools.accounting import dataset_name, yield_problems
    from data_tools.sniff import sample_records
    from data_tools.sources import check_source

    errors = []
    for key, specs in (("datasets", recipe.datasets), ("eval_datasets", recipe.eval_datasets)):
        for i, spec in enumerate(specs):
            try:
                check_source(spec)
                sample = sample_records(spec, SAMPLE, recipe.data)  # media decoded too
            except UserError as e:
                errors.append(UserError(f"{key}[{i}].path", f"{e.where}: {e.what}", e.fix))
                continue
            guess = sample.wrong_format(spec.format)
            if guess:
                errors.append(UserError(
                    f"{key}[{i}].format", f"{len(sample.bad)} of the first {sample.read} records of {spec.path} "
                    f"are not {spec.format!r} records; they look like {guess!r}", f"Set format: {guess}"))
            elif sample.bad and recipe.data.on_bad_record == "error":
                for bad in sample.bad[:SHOW_BAD]:
                    errors.append(UserError(bad.origin or spec.path, f"bad record ({bad.reason}): {bad.detail}",
                                            "Fix it, or set data.on_bad_record: skip to count it in "
                                            "rejects.jsonl and go on"))
            elif sample.bad:  # skipped: the run's own rule, on the sample
                name = ("eval " if key == "eval_datasets" else "") + dataset_name(i, spec)
                for _, _, line in yield_problems({name: sample.as_stats()}, recipe.data.max_rejected_fraction):
                    errors.append(UserError(f"{key}[{i}]", f"in the first {sample.read} records: {line}",
                                            "See why with `finetune data stats` (rejects.jsonl); fix the records "
                                            "or their media files"))
    return errors


def _targets(recipe) -> list[UserError]:
    """Each LoRA target (preset or regex) must match a module of the model."""
    from finetune.model.adapters import UNEXPORTABLE
    from finetune.model.families import family_for
    from finetune.model.lora import target_regex
    from finetune.plan.skeleton import load_config, skeleton

    try:
        config, source = load_config(recipe.model)
    except UserError:
        return []  # the base check reports it
    family = family_for(config.model_type)
    sk = skeleton(config, source)
    names = [n for n, _, _ in sk.lora_candidates]
    errors = []
    for i, t in enumerate(recipe.lora.targets):
        if family is None and t in ("attention", "mlp", "vision", "audio", "all"):
            continue
        pattern = re.compile(target_regex([t], family) if family else f".*{t}")
        if not any(pattern.fullmatch(n) for n in names):
            example = next((n for n in names if "layers.0." in n and n.endswith("q_proj")), names[0] if names else "")
            errors.append(UserError(f"lora.targets[{i}]", f"{t!r} matches no module of {recipe.model.base} "
                                    f"(a full match of module names such as {example})",
                                    "Use a preset (attention, mlp, vision, audio, all) or a regex like q_proj|v_proj"))
            continue
        odd = next((n for n in names if n in sk.unexportable and pattern.fullmatch(n)), None)
        if odd:
            errors.append(UserError(f"lora.targets[{i}]", f"{t!r} matches {odd}, {sk.unexportable[odd]}: no export "
                                    f"carries its LoRA exactly ({UNEXPORTABLE})",
                                    "Target linear layers only: the presets attention, mlp, vision, audio, or "
                                    "a regex that leaves out embed_tokens and lm_head"))
    return errors


def _trackers(recipe) -> list[UserError]:
    modules = {"tensorboard": "tensorboard", "wandb": "wandb"}
    return [UserError(f"train.report_to[{i}]", f"{name} is not installed, so nothing would be logged there",
                      f"pip install {modules[name]}, or remove it from train.report_to")
            for i, name in enumerate(recipe.train.report_to)
            if name in modules and importlib.util.find_spec(modules[name]) is None]


def _output(recipe) -> list[UserError]:
    out = Path(recipe.train.output_dir).absolute()
    there = next(p for p in (out, *out.parents) if p.exists())  # the part that exists already
    if not there.is_dir():
        return [UserError("train.output_dir", f"{there} is a file, not a folder",
                          "Point it at a new or existing folder")]
    return []


def refuse_overwrite(recipe, *, resume: bool, overwrite: bool) -> list[str]:
    """A run folder that holds a finished or started run is never replaced silently; with
    `overwrite` everything in it goes (an old run's best/, eval/, metrics would otherwise pass for
    the new run's), except a data cache kept inside it. Returns the names removed."""
    import shutil

    out = Path(recipe.train.output_dir)
    found = [name for name in ("adapter", "checkpoints") if (out / name).exists()]
    if not found or resume:
        return []
    if not overwrite:
        raise UserError("train.output_dir", f"{out} already holds a run ({', '.join(found)})",
                        "Pass --resume to continue it, --overwrite to replace it, or choose a new "
                        "train.output_dir")
    cache = Path(recipe.data.cache_dir).absolute()
    removed = []
    for entry in sorted(out.iterdir()):
        if entry.absolute() == cache or entry.absolute() in cache.parents:
            continue
        folder = entry.is_dir() and not entry.is_symlink()
        removed.append(entry.name + ("/" if folder else ""))
        if folder:
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return removed


def sharding_problems(recipe) -> None:
    """Raise every recipe setting FSDP2 can't run (each with its fix), all at once."""
    from finetune import objectives

    m, t = recipe.model, recipe.train
    errors = []
    if m.quantization == "nf4" and m.quant_storage == "uint8":
        errors.append(UserError("model.quant_storage", "uint8 storage under FSDP: the 4-bit weights can't be "
                                "sharded (accelerate leaves them whole on every GPU; older versions trained "
                                "with loss 0 or NaN gradients)", "Set model.quant_storage: bf16"))
    if m.quantization == "nf4" and m.quant_storage == "bf16" and m.dtype not in ("auto", "bf16"):
        errors.append(UserError("model.dtype", f"{m.dtype} with model.quant_storage bf16 under FSDP: the shards "
                                "must hold one dtype", "Set model.dtype: bf16"))
    if m.quantization == "int8":
        errors.append(UserError("model.quantization", "int8 weights can't be sharded by FSDP",
                                "Use model.quantization: nf4 with model.quant_storage: bf16, or none"))
    if t.optimizer != "adamw":
        errors.append(UserError("train.optimizer", f"{t.optimizer} under FSDP: bitsandbytes' optimizers keep "
                                "their state outside the sharded weights, so it can't be gathered into a "
                                "checkpoint (or paged)", "Use train.optimizer: adamw (FSDP already splits its "
                                "state across the GPUs)"))
    if t.preview_every:
        errors.append(UserError("train.preview_every", "previews generate on one process, which a sharded "
                                "model can't do", "Set train.preview_every: 0 and run `finetune generate` "
                                "on the adapter"))
    cls = objectives.get(t.objective)
    if t.objective == "grpo" and recipe.drafter.path:
        errors.append(UserError("drafter.path", "assisted rollouts under FSDP: the drafter's steps can't keep "
                                "the ranks' gathers in step", "Remove drafter.path (rollouts sample from the "
                                "policy alone), or launch with DDP (configs/accelerate/ddp.yaml)"))
    elif cls is not None and not cls.shards:
        errors.append(UserError("train.objective", f"{t.objective} is not run under FSDP yet",
                                "Launch it on one process or with DDP (configs/accelerate/ddp.yaml)"))
    if errors:
        raise RecipeErrors(errors)
