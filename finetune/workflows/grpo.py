"""The GRPO demo as one call: brief SFT → eval → drafter aligned → rollout speed → GRPO → eval."""

from __future__ import annotations

import json
import time
from pathlib import Path


def _before_after(before: dict, after: dict) -> str:
    lines = [f"{'modality':<10}{'SFT':>8}{'GRPO':>8}{'gain':>8}{'n':>6}", "-" * 40]
    for m in sorted(after):
        b, a = before[m]["accuracy"], after[m]["accuracy"]
        lines.append(f"{m:<10}{b:>8.2f}{a:>8.2f}{a - b:>+8.2f}{after[m]['n']:>6}")
    return "\n".join(lines)


def _held_out_prompts(recipe, n: int) -> list[dict]:
    """`n` rendered held-out samples, taken round-robin over their modalities."""
    from data_tools.pipeline import prepare
    from finetune.model.load import base_family, load_processor

    m = recipe.model
    processor = load_processor(m.base, recipe.data.image_tokens, m.trust_remote_code)
    out = Path(recipe.train.output_dir)
    data = prepare(recipe, processor, m.base, chat=base_family(m.base).chat, rejects_path=out / "rejects.jsonl")
    by: dict[str, list[dict]] = {}
    for i in range(len(data.eval)):
        s = data.eval[i]
        by.setdefault(s["modality"], []).append(s)
    picked, queues = [], [by[k] for k in sorted(by)]
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def run_grpo_demo(overrides: list[str] | tuple[str, ...] = (), log=None, root: str | Path | None = None) -> dict:
    """Data + tiny base → brief SFT adapter → GRPO from it with the exact-match reward → held-out
    exact match before and after per modality, and the rollouts' tokens per target forward with
    and without a drafter aligned to the SFT adapter → `<output_dir>/eval.json`."""
    from finetune.config.recipe import with_overrides
    from finetune.demo.grpo import DATA_VERSION, GRPO_RECIPE, ROLLOUT_PROMPTS, make_grpo_data, sft_recipe
    from finetune.demo.tiny_drafter import write_tiny_drafter
    from finetune.drafter.alignment import align_drafter
    from finetune.eval.evaluate import accuracy_table, evaluate_adapter
    from finetune.grpo.speed import rollout_speed
    from finetune.training.loop import train
    from finetune.workflows.demo import demo_setup
    from finetune.workflows.drafter import DEMO_SETTINGS, DEMO_STEPS, demo_distil

    log = log or (lambda *_: None)
    t0 = time.time()
    recipe, out, base, _ = demo_setup(GRPO_RECIPE, overrides, root, log, make_grpo_data,
                                        data_version=DATA_VERSION)
    sft = sft_recipe(recipe)
    result = train(sft, log=log)
    adapter = Path(recipe.train.reference_adapter)
    log(f"demo: SFT {result.steps} steps in {result.seconds:.0f}s → {adapter}")
    before = accuracy_table(evaluate_adapter(sft, adapter, log=log)[0])["adapter"]

    # The rollouts' speed-up: a drafter distilled on the base, aligned to the SFT adapter.
    if not (base / "drafter" / "config.json").exists():
        write_tiny_drafter(base)
    demo_distil(sft, out / "drafter", log=log)
    aligning = with_overrides(sft, [*DEMO_SETTINGS, f"drafter.path={out / 'drafter' / 'shipped'}",
                                    f"train.max_steps={DEMO_STEPS['aligned']}"])
    align_drafter(aligning, str(adapter), out / "drafter" / "aligned", log=log, progress=False)
    drafted = with_overrides(recipe, [f"drafter.path={out / 'drafter' / 'aligned'}"])
    speed = rollout_speed(drafted, _held_out_prompts(recipe, ROLLOUT_PROMPTS), seed=recipe.train.seed)
    for setting, what in (("served", "stopping at the end of turn"),
                          ("fixed", f"{recipe.drafter.continuation_tokens} tokens, past any stop")):
        s = speed[setting]
        log(f"demo: rollouts ({what}): {s['plain']['tokens_per_forward']:.2f} tokens per target forward, "
            f"{s['drafter']['tokens_per_forward']:.2f} with the aligned drafter ({s['speedup']:.2f}x)")

    result = train(recipe, log=log)
    log(f"demo: GRPO {result.steps} steps in {result.seconds:.0f}s")
    after = accuracy_table(evaluate_adapter(recipe, result.adapter_dir, log=log)[0])["adapter"]
    scores = {"exact_match": {"sft": before, "grpo": after},
              "gain": {m: round(after[m]["accuracy"] - before[m]["accuracy"], 4) for m in after},
              "rollout_speed": speed, "grpo_seconds": round(result.seconds, 1), "seconds": round(time.time() - t0, 1)}
    (out / "eval.json").write_text(json.dumps(scores, indent=1))
    log("held-out exact match, SFT start vs after GRPO:\n" + _before_after(before, after))
    log(f"demo: done in {time.time() - t0:.0f}s → {out}/eval.json, {out}/adapter")
    return scores
