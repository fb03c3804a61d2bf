"""`finetune align-drafter`: the shipped drafter aligned to base + adapter, and its report.

`align_drafter` trains the `drafter` objective (finetune.drafter.objective) on the recipe's data
with the shipped drafter (`drafter.path`) and the given adapter, into one folder that is both the
training run (metrics.jsonl, checkpoints/, recipe.lock.yaml) and the drafter's HF folder.
Measuring drafters on held-out prompts is `finetune eval --drafter` (and the demo's
`finetune.workflows.drafter`).
"""

from __future__ import annotations

import json
from pathlib import Path


def _silent(*_):
    pass


def drafter_recipe(recipe, *, adapter: str | None, out: str | Path, overrides=()):
    """`recipe` training the drafter objective into `out`, aligned to `adapter` (None: the base)."""
    from finetune.config.recipe import apply_overrides, recipe_from_dict

    raw = recipe.to_dict()
    raw["train"]["objective"] = "drafter"
    raw["train"]["output_dir"] = str(out)
    raw["drafter"]["adapter"] = str(adapter) if adapter else None
    apply_overrides(raw, list(overrides))
    return recipe_from_dict(raw, recipe.source)


def align_drafter(recipe, adapter: str | None, out: str | Path, *, resume: bool = False, log=None,
                  progress: bool | None = None) -> dict:
    """Align `recipe.drafter.path` to base + `adapter`; the drafter folder and run go to `out`.
    Returns (and writes as `align_report.json`) what was trained and how it ended."""
    from finetune.drafter.objective import DrafterAlignment
    from finetune.training.loop import train

    # the user's recipe trains another objective: the drafter objective's own check, asked now
    for problem in DrafterAlignment.check(recipe):
        raise problem
    # A wrong drafter or adapter fails now, before the base and the data load.
    from finetune.drafter.model import check_pair, read_config
    from finetune.model.families import family_config

    check_pair(read_config(recipe.drafter.path), family_config(recipe.model.base, where="model.base")[1],
               "drafter.path")
    if adapter is not None:
        from finetune.model.adapters import open_adapter

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
