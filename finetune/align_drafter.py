"""`finetune align-drafter` and the demo's drafter steps: align, measure, report.

`align_drafter` trains the `drafter` objective (finetune.objectives.drafter) on the recipe's data
with the shipped drafter (`drafter.path`) and the given adapter, into one folder that is both the
training run (metrics.jsonl, checkpoints/, recipe.lock.yaml) and the drafter's HF folder.
`measure_drafters` loads the base once and measures (base, shipped), (adapted, shipped) and
(adapted, aligned) with transformers' assisted generation (finetune.acceptance).
`demo_drafter` is the demo's part: distil the tiny random drafter on the base (the stand-in for
the drafter Google ships), measure, align it to the demo's adapter, measure again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune.errors import UserError

# The demo's drafter runs (recipes/demo.yaml otherwise): answers of one word would leave nothing
# to draft, so answers run 16 tokens past the end of turn, as serving benchmarks measure.
DEMO_SETTINGS = ["drafter.ignore_eos=true", "drafter.continuation_tokens=16", "drafter.eval_items=12",
                 "train.batch_size=8", "train.lr=0.01", "train.warmup=0", "train.scheduler=linear",
                 "train.save_every=0", "train.eval_every=0"]
DEMO_STEPS = {"shipped": 60, "aligned": 15}


def _silent(*_):
    pass


def drafter_recipe(recipe, *, adapter: str | None, out: str | Path, overrides=()):
    """`recipe` training the drafter objective into `out`, aligned to `adapter` (None: the base)."""
    from finetune.recipe import recipe_from_dict, with_overrides

    raw = recipe.to_dict()
    raw["train"]["objective"] = "drafter"
    raw["train"]["output_dir"] = str(out)
    raw["drafter"]["adapter"] = str(adapter) if adapter else None
    return with_overrides(recipe_from_dict(raw, recipe.source), list(overrides))


def align_drafter(recipe, adapter: str | None, out: str | Path, *, resume: bool = False, log=None,
                  progress: bool | None = None) -> dict:
    """Align `recipe.drafter.path` to base + `adapter`; the drafter folder and run go to `out`.
    Returns (and writes as `align_report.json`) what was trained and how it ended."""
    from finetune.training.loop import train

    if recipe.drafter.path is None:
        raise UserError("drafter.path", "no drafter to align",
                        "Set drafter.path to the shipped drafter (google/gemma-4-12B-it-assistant for the 12B)")
    # A wrong drafter or adapter fails now, before the base and the data load.
    from finetune.drafter import check_pair, read_config
    from finetune.families import family_config

    check_pair(read_config(recipe.drafter.path), family_config(recipe.model.base, where="model.base")[1],
               "drafter.path")
    if adapter is not None:
        from finetune.adapters import open_adapter

        open_adapter(adapter, base=recipe.model.base, allow_pickle=recipe.model.allow_pickle)
    r = drafter_recipe(recipe, adapter=adapter, out=out)
    result = train(r, resume=resume, log=log, progress=progress)
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    report = {"drafter": str(out), "shipped": r.drafter.path, "adapter": adapter, "method": r.drafter.method,
              "num_tokens": r.drafter.num_tokens, "steps": result.steps, "seconds": round(result.seconds, 2),
              "final": {k: last[k] for k in ("loss", "drafter/token_acc", "drafter/acceptance") if k in last}}
    (Path(out) / "align_report.json").write_text(json.dumps(report, indent=1))
    return report


def measure_drafters(recipe, adapter: str | None, drafters: dict[str, str], *, log=None,
                     progress: bool = False) -> dict:
    """Acceptance of each drafter in `drafters` ({"shipped": path, "aligned": path}) on the base
    (the shipped one only) and on base + `adapter`, over the recipe's held-out prompts."""
    from finetune.acceptance import pairing_rows, pick_items, report
    from finetune.adapters import load_adapter
    from finetune.drafter import load_drafter
    from finetune.evaluate import eval_items
    from finetune.model import base_family, load_processor, load_recipe_base

    log = log or _silent
    m = recipe.model
    family = base_family(m.base, m.trust_remote_code)
    processor = load_processor(m.base, recipe.data.image_tokens, m.trust_remote_code)
    items = pick_items(eval_items(recipe, processor, family.chat, None, log)[0], recipe.drafter.eval_items)
    if not items:
        raise UserError("eval_datasets", "no held-out prompts to measure acceptance on",
                        "Add eval_datasets, or set data.eval_fraction")
    model = load_recipe_base(m)
    loaded = {name: (path, load_drafter(path, model.config, where=f"drafter ({name})"))
              for name, path in drafters.items()}
    args = (processor, family.chat, items, recipe)
    rows = pairing_rows(model, "base", {"shipped": loaded["shipped"]}, *args, progress) if "shipped" in loaded else []
    if adapter is not None:
        model = load_adapter(model, str(adapter), allow_pickle=m.allow_pickle)
        rows += pairing_rows(model, "adapted", loaded, *args, progress)
    return {**report(rows, recipe, len(items)), "adapter": str(adapter) if adapter else None}


def format_pairings(result: dict) -> str:
    lines = [f"{'target':<9}{'drafter':<9}{'tokens/forward':>15}{'accepted/round':>16}{'accept rate':>13}"
             f"{'identical':>11}",
             "-" * 73]
    for p in result["pairings"]:
        lines.append(f"{p['target']:<9}{p['drafter']:<9}{p['tokens_per_forward']:>15.3f}{p['mean_accepted']:>16.3f}"
                     f"{p['acceptance_rate']:>13.3f}{'yes' if p['identical'] else 'NO':>11}")
    lines.append(f"(k = {result['k']}, {result['items']} held-out prompts, {result['new_tokens']} new tokens"
                 f"{' past the end of turn' if result['ignore_eos'] else ''})")
    return "\n".join(lines)


def demo_distil(recipe, out: Path, log=None) -> float:
    """The demo's stand-in for the drafter Google ships: the tiny random drafter next to the base
    (`<base>/drafter`) distilled on the base into `out/shipped/`. Returns the seconds it took."""
    t0 = time.time()
    demo = drafter_recipe(recipe, adapter=None, out=out / "shipped", overrides=[
        *DEMO_SETTINGS, f"drafter.path={Path(recipe.model.base) / 'drafter'}", f"train.max_steps={DEMO_STEPS['shipped']}"])
    align_drafter(demo, None, out / "shipped", log=log, progress=False)
    return time.time() - t0


def demo_align(recipe, adapter: Path, out: Path, log=None, distil_seconds: float = 0.0) -> dict:
    """The demo's drafter steps after the adapter: align `out/shipped/` to it into `out/aligned/`,
    measure the three pairings, write `out/report.json` and return it."""
    from finetune.recipe import with_overrides

    demo = with_overrides(recipe, [*DEMO_SETTINGS, f"drafter.path={out / 'shipped'}",
                                   f"train.max_steps={DEMO_STEPS['aligned']}"])
    t0 = time.time()
    align_drafter(demo, str(adapter), out / "aligned", log=log, progress=False)
    t1 = time.time()
    result = measure_drafters(demo, str(adapter), {"shipped": str(out / "shipped"), "aligned": str(out / "aligned")},
                              log=log)
    seconds = {"distil_shipped": distil_seconds, "align": t1 - t0, "measure": time.time() - t1}
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    (out / "report.json").write_text(json.dumps(result, indent=1))
    return result
