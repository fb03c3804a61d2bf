"""The demos as one call each: data, tiny base, training, eval, merge and drafter steps in order."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from finetune.demo.data import DATA_VERSION

# The main demo's base: four layers (two sliding, two full). With two, the text facts (one
# country token, 15 tokens before the answer) and neighbouring hues were each missed on some
# seeds (held-out exact match 0.875–0.917); with four, packed rows and recipes/demo.yaml's
# settings, train.seed 0, 1 and 2 reach ≥ 0.95 on every modality in about the time two layers
# took unpacked (236–242 s against 267 s, two runs sharing 2 cores). The GRPO and preference
# demos keep two: their many short rollout forwards would pay the depth twice.
DEMO_LAYERS = 4
DATA_MARK = ".demo_data_version"


def _eval_table(result: dict) -> str:
    mods = sorted({m for side in result.values() for m in side})
    lines = [f"{'modality':<10}{'base':>10}{'adapter':>10}{'n':>6}", "-" * 36]
    for m in mods:
        b, a = result["base"].get(m, {}), result["adapter"].get(m, {})
        lines.append(f"{m:<10}{b.get('accuracy', 0):>10.2f}{a.get('accuracy', 0):>10.2f}{a.get('n', 0):>6}")
    return "\n".join(lines)


def run_demo(overrides: list[str] | tuple[str, ...] = (), log=None, root: str | Path | None = None) -> dict:
    """Data + tiny base → QLoRA adapter → held-out eval (base vs adapter) → merge + parity, and
    the drafter: distilled on the base first (the stand-in for a shipped one), aligned to the
    adapter and measured at the end (finetune.drafter.alignment).

    The demo owns its output folder: what an earlier run produced there is replaced (the
    generated base, data and tokenized cache are kept: they come out the same every time)."""
    from finetune.demo.data import DEMO_RECIPE, make_demo_data
    from finetune.demo.tiny_drafter import write_tiny_drafter
    from finetune.drafter.alignment import format_pairings
    from finetune.eval.evaluate import accuracy_table, evaluate_adapter
    from finetune.export.merge import merge_adapter
    from finetune.training.loop import train
    from finetune.workflows.drafter import demo_align, demo_distil

    log = log or (lambda *_: None)
    t0 = time.time()
    recipe, out, base, _ = demo_setup(DEMO_RECIPE, overrides, root, log, make_demo_data, layers=DEMO_LAYERS)
    if not (base / "drafter" / "config.json").exists():
        write_tiny_drafter(base)

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


def _current(data_dir: Path, version: str) -> bool:
    """The demo data there is this version's (an older checkout's is written again)."""
    mark = data_dir / DATA_MARK
    return (data_dir / "eval.jsonl").exists() and mark.exists() and mark.read_text() == version


def demo_setup(recipe_path: Path, overrides, root, log, make_data=None, layers: int = 2,
               data_version: str = DATA_VERSION):
    """(recipe, output folder, base folder, data folder) of a demo: its recipe (moved under `root`
    when given: tests), its earlier outputs cleared, the tiny base of `layers` decoder layers
    written on first use (or when the one there has another depth), and the data
    (`make_data(folder, seed=0)`, when given, unless `data_version`'s is there) too."""
    from finetune.config.recipe import load_recipe
    from finetune.demo.tiny_model import write_tiny_model

    recipe = load_recipe(recipe_path, overrides)
    if root is not None:  # the whole output tree somewhere else
        recipe = relocated(recipe, Path(recipe.train.output_dir), Path(root).absolute())
    out = Path(recipe.train.output_dir)
    base = Path(recipe.model.base)
    data_dir = Path(recipe.datasets[0].path).parent
    _clear_demo_outputs(out, keep=[base, data_dir, Path(recipe.data.cache_dir or out / ".cache")])
    if _layers(base) != layers:
        shutil.rmtree(base, ignore_errors=True)  # its drafter too: made for the base before
        write_tiny_model(base, seed=0, num_layers=layers)
        log(f"demo: tiny gemma4_unified base ({layers} layers) written to {base}")
    if make_data is not None and not _current(data_dir, data_version):
        make_data(data_dir, seed=0)
        (data_dir / DATA_MARK).write_text(data_version)
        log(f"demo: data written to {data_dir}")
    return recipe, out, base, data_dir


def _layers(base: Path) -> int | None:
    if not (base / "config.json").exists():
        return None
    return json.loads((base / "config.json").read_text()).get("text_config", {}).get("num_hidden_layers")


def relocated(recipe, old: Path, new: Path):
    """`recipe` with every path under `old` moved under `new`."""
    from finetune.config.recipe import recipe_from_dict

    def move(v):
        if isinstance(v, str) and (v == str(old) or v.startswith(str(old) + "/")):
            return str(new) + v[len(str(old)):]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return recipe_from_dict(move(recipe.to_dict()), recipe.source)


def run_preference_demo(overrides: list[str] | tuple[str, ...] = (), log=None,
                        root: str | Path | None = None) -> dict:
    """Data + tiny base → DPO adapter → held-out preference accuracy and greedy answers, base vs
    adapter, per modality → `<output_dir>/eval.json`."""
    from finetune.demo.preference import PREFERENCE_RECIPE, make_preference_data
    from finetune.eval.evaluate import accuracy_table, evaluate_adapter
    from finetune.eval.preference import format_table
    from finetune.training.loop import train

    log = log or (lambda *_: None)
    t0 = time.time()
    recipe, out, base, data_dir = demo_setup(PREFERENCE_RECIPE, overrides, root, log, make_preference_data)

    result = train(recipe, log=log)
    log(f"demo: {recipe.train.objective} trained {result.steps} steps in {result.seconds:.0f}s")
    evaluation, _ = evaluate_adapter(recipe, result.adapter_dir, log=log, progress=True)
    pref = evaluation["preference"]["by_modality"]
    scores = {"preference_accuracy": {side: {m: {"accuracy": g[side]["accuracy"], "n": g["pairs"]}
                                             for m, g in pref.items() if m != "all"} for side in ("base", "adapter")},
              "reward_accuracy": {m: g["reward_accuracy"] for m, g in pref.items() if m != "all"},
              "greedy_exact_match": accuracy_table(evaluation),
              "greedy_follows": _greedy_sides(evaluation, recipe),
              "train_seconds": round(result.seconds, 1), "seconds": round(time.time() - t0, 1)}
    (out / "eval.json").write_text(json.dumps(scores, indent=1))
    log(format_table(evaluation["preference"]))
    log("greedy answers equal to the preferred side (exact match):\n" + _eval_table(scores["greedy_exact_match"]))
    log("adapter's greedy answers by side: " + ", ".join(
        f"{m} {g['chosen']:.2f} chosen / {g['rejected']:.2f} rejected" for m, g in scores["greedy_follows"].items()))
    log(f"demo: done in {time.time() - t0:.0f}s → {out}/eval.json, {out}/adapter")
    return scores


def _greedy_sides(evaluation: dict, recipe) -> dict:
    """Per modality, the share of the adapter's greedy answers that are the chosen answer and the
    share that are the rejected one (exact match, as scored)."""
    from data_tools.preference import parse_preference
    from data_tools.sources import iter_records
    from finetune.eval.evaluate import exact_match

    rejected = {}
    for spec in recipe.eval_datasets:
        for origin, record, base_dir in iter_records(spec):
            if isinstance(record, dict) and "rejected" in record:
                pair = parse_preference(record, origin, base_dir)
                rejected[str(record.get("id", origin))] = pair.rejected.messages[-1].text().strip()
    out: dict[str, dict] = {}
    for it in evaluation["items"]:
        if it["id"] in rejected:
            g = out.setdefault(it["modality"], {"chosen": 0.0, "rejected": 0.0, "n": 0})
            g["chosen"] += exact_match(it["adapter"], it["reference"])
            g["rejected"] += exact_match(it["adapter"], rejected[it["id"]])
            g["n"] += 1
    return {m: {"chosen": round(g["chosen"] / g["n"], 4), "rejected": round(g["rejected"] / g["n"], 4),
                "n": g["n"]} for m, g in sorted(out.items())}


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
