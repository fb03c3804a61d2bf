"""Workflows that string several library steps together: the demo, data stats."""

from __future__ import annotations

import json
import time
from pathlib import Path


def _eval_table(result: dict) -> str:
    mods = sorted({m for side in result.values() for m in side})
    lines = [f"{'modality':<10}{'base':>10}{'adapter':>10}{'n':>6}", "-" * 36]
    for m in mods:
        b, a = result["base"].get(m, {}), result["adapter"].get(m, {})
        lines.append(f"{m:<10}{b.get('accuracy', 0):>10.2f}{a.get('accuracy', 0):>10.2f}{a.get('n', 0):>6}")
    return "\n".join(lines)


def run_demo(overrides: list[str] | tuple[str, ...] = (), log=None) -> dict:
    """Data + tiny base → QLoRA adapter → held-out eval (base vs adapter) → merge + parity, and
    the drafter: distilled on the base first (the stand-in for a shipped one), aligned to the
    adapter and measured at the end (finetune.align_drafter).

    The demo owns its output folder: what an earlier run produced there is replaced (the
    generated base, data and tokenized cache are kept: they come out the same every time)."""
    from finetune.align_drafter import demo_align, demo_distil, format_pairings
    from finetune.demo import DEMO_RECIPE, make_demo_data
    from finetune.evaluate import accuracy_table, evaluate_adapter
    from finetune.merge import merge_adapter
    from finetune.recipe import load_recipe
    from finetune.tiny import write_tiny_model
    from finetune.tiny_drafter import write_tiny_drafter
    from finetune.training.loop import train

    log = log or (lambda *_: None)
    t0 = time.time()
    recipe = load_recipe(DEMO_RECIPE, overrides)
    out = Path(recipe.train.output_dir)
    base = Path(recipe.model.base)
    data_dir = Path(recipe.datasets[0].path).parent
    _clear_demo_outputs(out, keep=[base, data_dir, Path(recipe.data.cache_dir or out / ".cache")])
    if not (base / "config.json").exists():
        # Two layers (one sliding, one full): the demo's 5-minute budget on 2 cores; the test
        # fixture keeps four.
        write_tiny_model(base, seed=0, num_layers=2)
        log(f"demo: tiny gemma4_unified base written to {base}")
    if not (base / "drafter" / "config.json").exists():
        write_tiny_drafter(base)
    if not (data_dir / "eval.jsonl").exists():
        make_demo_data(data_dir, seed=0)
        log(f"demo: dataset written to {data_dir}")

    distil_seconds = demo_distil(recipe, out / "drafter", log=log)
    log(f"demo: tiny drafter distilled on the base (the stand-in for a shipped one) in {distil_seconds:.0f}s")
    result = train(recipe, log=log)
    log(f"demo: trained {result.steps} steps in {result.seconds:.0f}s")

    evaluation, _ = evaluate_adapter(recipe, result.adapter_dir, log=log, progress=True)
    scores = accuracy_table(evaluation)
    (out / "eval.json").write_text(json.dumps(scores, indent=1))
    log("held-out exact match:\n" + _eval_table(scores))

    report = merge_adapter(str(result.adapter_dir), str(out / "merged"), dtype="fp32", log=log)
    log(f"demo: merged into {out / 'merged'}; max |logits(merged) - logits(base+adapter)| = "
        f"{report['max_abs_diff']:.2e}")

    drafter = demo_align(recipe, result.adapter_dir, out / "drafter", log=log, distil_seconds=distil_seconds)
    log("drafter acceptance (transformers assisted generation):\n" + format_pairings(drafter))
    log("demo: tokens per target forward " + ", ".join(f"{k} {v:.2f}" for k, v in drafter["figures"].items())
        + f" → {out}/drafter/report.json")
    log(f"demo: done in {time.time() - t0:.0f}s → {out}/eval.json, {out}/adapter, {out}/merged, {out}/drafter")
    return scores


def _clear_demo_outputs(out: Path, keep: list[Path]) -> None:
    """Remove what an earlier demo run left in `out`, except the folders in `keep`."""
    import shutil

    if not out.is_dir():
        return
    kept = {p.resolve() for p in keep}
    for p in out.iterdir():
        if p.resolve() in kept:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def data_stats(recipe_path: str, overrides=()) -> dict:
    """Render every record of the recipe; {records, used, rejected, …, datasets: {...}}."""
    from data_tools.pipeline import prepare
    from finetune.model import base_family, load_processor
    from finetune.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    processor = load_processor(recipe.model.base, recipe.data.image_tokens, recipe.model.trust_remote_code)
    chat = base_family(recipe.model.base, recipe.model.trust_remote_code).chat
    out = Path(recipe.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Stats need the full pass, also for a streaming recipe (which then just isn't cached).
    prep = prepare(recipe, processor, recipe.model.base, chat=chat, rejects_path=out / "rejects.jsonl",
                   log=None, streaming=False, use_cache=not recipe.data.streaming)
    total = dict(prep.stats["total"])
    total["datasets"] = prep.stats["datasets"]
    total["eval"] = prep.stats["eval"]
    total["train_samples_after_mixing"] = len(prep.train)
    return total


def format_stats(s: dict) -> str:
    lines = [f"records {s['records']}  used {s['used']}  rejected {s['rejected']}"]
    if s["rejected_by_reason"]:
        lines.append("rejected by reason: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()))
    if s["overflow_actions"]:
        lines.append("overflow actions: " + ", ".join(f"{k} {v}" for k, v in s["overflow_actions"].items()))
    t = s["tokens"]
    lines.append(f"tokens: text {t['text']}  image {t['image']}  audio {t['audio']}  label {t['label']}")
    if s.get("length_percentiles"):
        lines.append("length: " + "  ".join(f"{k} {v}" for k, v in s["length_percentiles"].items()))
    for name, d in s.get("datasets", {}).items():
        lines.append(f"  {name}: records {d['records']} used {d['used']} rejected {d['rejected']} "
                     f"{d['rejected_by_reason'] or ''}")
    return "\n".join(lines)
