"""`finetune data stats | clear-cache`: the recipe's data rendered and counted, or its cache removed."""

from __future__ import annotations

from pathlib import Path


def data_stats(recipe_path: str, overrides=()) -> dict:
    """Render every record of the recipe; {records, used, rejected, …, datasets: {...}}. The
    run's yield rule is not applied here (the caller shows the counts first, then
    `data_tools.accounting.check_yield(stats, stats["max_rejected_fraction"], ...)`)."""
    from data_tools.pipeline import prepare
    from finetune.config.recipe import load_recipe
    from finetune.model.load import base_family, load_processor

    recipe = load_recipe(recipe_path, overrides)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens, recipe.model.trust_remote_code)
    chat = base_family(recipe.model.base, recipe.model.trust_remote_code).chat
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stats need the full pass, also for a streaming recipe (which then just isn't cached).
    prep = prepare(recipe, processor, recipe.model.base, chat=chat, rejects_path=out / "rejects.jsonl",
                   log=None, streaming=False, use_cache=not recipe.data.streaming, check=False)
    total = dict(prep.stats["total"])
    total["datasets"] = prep.stats["datasets"]
    total["eval"] = prep.stats["eval"]
    total["eval_datasets"] = prep.stats.get("eval_datasets") or {}
    total["max_rejected_fraction"] = recipe.data.max_rejected_fraction
    total["train_samples_after_mixing"] = len(prep.train)
    total["rejects_file"] = str(out / "rejects.jsonl")
    return total


def clear_cache(recipe_path: str, overrides=()) -> Path | None:
    """Remove the recipe's tokenized data (what `prepare` would reuse); the folder, or None."""
    import shutil

    from data_tools.pipeline import cache_folder
    from finetune.config.recipe import load_recipe
    from finetune.model.load import base_family

    recipe = load_recipe(recipe_path, overrides)
    folder = cache_folder(recipe, recipe.model.base, base_family(recipe.model.base, recipe.model.trust_remote_code).chat)
    if not folder.exists():
        return None
    shutil.rmtree(folder)
    return folder


def format_stats(s: dict) -> str:
    lines = [f"records {s['records']}  used {s['used']}  rejected {s['rejected']}"]
    if s["rejected_by_reason"]:
        lines.append("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()))
    if s.get("rejects_file"):
        lines.append(f"rejected records: {s['rejects_file']}")
    if s["overflow_actions"]:
        lines.append("overflow actions: " + ", ".join(f"{k} {v}" for k, v in s["overflow_actions"].items()))
    t = s["tokens"]
    lines.append(f"tokens: text {t['text']}  image {t['image']}  audio {t['audio']}  label {t['label']}")
    if s.get("length_percentiles"):
        lines.append("length: " + "  ".join(f"{k} {v}" for k, v in s["length_percentiles"].items()))
    for name, d in s.get("datasets", {}).items():
        lines.append(f"  {name}: records {d['records']} used {d['used']} rejected {d['rejected']} "
                     f"{d['rejected_by_reason'] or ''}")
        if d.get("overflow_actions"):
            lines.append("    overflow actions: " + ", ".join(f"{k} {v}" for k, v in d["overflow_actions"].items()))
    return "\n".join(lines)
