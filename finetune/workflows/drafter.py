"""The drafter's measurements and the demo's drafter steps: distil, align, measure, report.

`measure_drafters` loads the base once and measures (base, shipped), (adapted, shipped) and
(adapted, aligned) with transformers' assisted generation (finetune.drafter.acceptance) on the
recipe's held-out prompts. `demo_distil`/`demo_align` are the demo's part: distil the tiny random
drafter on the base (the stand-in for the drafter Google ships), align it to the demo's adapter,
measure the three pairings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from finetune.drafter.alignment import align_drafter, drafter_recipe
from finetune.errors import UserError

# The demo's drafter runs (recipes/demo.yaml otherwise): answers of one word would leave nothing
# to draft, so answers run 16 tokens past the end of turn, as serving benchmarks measure.
DEMO_SETTINGS = ["drafter.ignore_eos=true", "drafter.continuation_tokens=16", "drafter.eval_items=12",
                 "train.packing=false", "train.batch_size=8", "train.lr=0.01", "train.warmup=0", "train.scheduler=linear",
                 "train.save_every=0", "train.eval_every=0"]
DEMO_STEPS = {"shipped": 60, "aligned": 15}



def _silent(*_):
    pass


def measure_drafters(recipe, adapter: str | None, drafters: dict[str, str], *, log=None,
                     progress: bool = False) -> dict:
    """Acceptance of each drafter in `drafters` ({"shipped": path, "aligned": path}) on the base
    (the shipped one only) and on base + `adapter`, over the recipe's held-out prompts."""
    from finetune.drafter.acceptance import pairing_rows, pick_items, report
    from finetune.drafter.model import load_drafter
    from finetune.eval.evaluate import eval_items
    from finetune.model.adapters import load_adapter
    from finetune.model.load import base_family, load_processor, load_recipe_base

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
    from finetune.config.recipe import with_overrides

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
