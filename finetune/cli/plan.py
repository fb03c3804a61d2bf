"""`finetune plan RECIPE [k=v ...] [--json] [--budget-gib G] [--check]`: memory prediction, offline.

Exit codes: 0 when the plan ran (the verdict is the `fits` key of `--json` and a loud "DOES NOT
FIT" line in the table); with `--check`, 3 when the recipe does not fit, for scripts and CI.
A bad recipe raises `UserError`, which the CLI turns into exit 2.
"""

from __future__ import annotations

import json

from finetune.config.recipe import load_recipe
from finetune.errors import UserError
from finetune.plan.report import plan

DOES_NOT_FIT = 3

BAR_WIDTH = 24


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def format_plan(result: dict, recipe) -> str:
    """The human-readable table: one line per breakdown item, biggest first."""
    a, p = result["assumptions"], result["params"]
    m = recipe.model
    quant = m.quantization + (" + double quant" if m.quantization == "nf4" and m.double_quant else "")
    lines = [
        f"plan: {recipe.source}",
        f"  base {m.base} ({a['config']}) · {a['device']} · {a['compute_dtype']} · {quant}",
        f"  {a['tokens_per_micro_batch']:,} tokens per micro-batch (batch {recipe.train.batch_size} × "
        f"{_rows(a)}{a['seq_len']:,}; media inside: {a['media_tokens_per_sample']['image']} image + "
        f"{a['media_tokens_per_sample']['audio']} audio tokens) · "
        f"LoRA r={recipe.lora.r} on {p['lora_modules']} modules ({_fmt_count(p['lora_trainable'])})",
        "",
    ]
    if "drafter" in a:  # train.objective: drafter: the trainable part is the drafter, not a LoRA
        dr = a["drafter"]
        lines[-2] = (f"  drafter {recipe.drafter.path} ({dr['source']}, {_fmt_count(dr['params'])}) · "
                     f"{dr['method']} · {_fmt_count(dr['trainable'])} trainable · continuation "
                     f"{recipe.drafter.continuation_tokens} tokens · k = {recipe.drafter.num_tokens}")
    peak = result["peak_gib"]
    width = max(len(k) for k in result["breakdown"]) + 2
    for name, gib in result["breakdown"].items():
        bar = "█" * round(BAR_WIDTH * gib / peak) if peak else ""
        lines.append(f"  {name:<{width}}{gib:>8.2f} GiB  {bar}")
    lines.append("  " + "-" * (width + 12))
    budget = result["budget_gib"]
    if result["fits"]:
        verdict = f"fits ({budget - peak:.2f} GiB headroom)"
    else:
        verdict = f"DOES NOT FIT ({peak - budget:.2f} GiB over)"
    per = f" per GPU of {a['gpus']} ({STRATEGY_NAMES[a['strategy']]})" if a.get("gpus", 1) > 1 else ""
    lines.append(f"  {'peak':<{width}}{peak:>8.2f} GiB{per}  of a {budget:g} GiB budget: {verdict}")
    lines.append(f"  (torch allocated ≈ {result['allocated_gib']:.2f} GiB; peak phase: {a['peak_phase']})")
    longest = result.get("longest_seq_len")
    lines.append(f"  longest data.max_seq_len that fits {budget:g} GiB: "
                 + (f"{longest:,}" if longest else "none (not even 256 tokens)"))
    lines.append("")
    lines.append(f"parameters: {_fmt_count(p['total'])} total · {_fmt_count(p['embeddings'])} embeddings · "
                 f"{_fmt_count(p['quantizable_linear'])} quantizable linear · "
                 f"{_fmt_count(p['linear_not_quantized'])} linear kept · "
                 f"{_fmt_count(p['norms_and_other'])} norms/other")
    if a.get("mlp_tile_tokens"):
        lines.append(f"  {a['mlp_tile_tokens']}")
    for line in a.get("fsdp_refuses", []):
        lines.append(f"  under FSDP train refuses {line}")
    if result["suggestions"]:
        lines.append("")
        lines.append("to fit, override (finetune plan RECIPE key=value ...):")
        lines.extend(f"  {s}" for s in result["suggestions"])
    lines.append("")
    lines.append(f"note: {a['error_bar']}")
    return "\n".join(lines)


def _rows(a: dict) -> str:
    n = a.get("sequences_per_sample", 1)
    return f"{n} sequences ({a['objective']}: chosen + rejected) × " if n > 1 else ""


STRATEGY_NAMES = {"ddp": "DDP: a whole model on each", "fsdp": "FSDP2: sharded"}


def cmd_plan(args) -> int:
    """Print the plan for `args.recipe` with `args.overrides`; see the module doc for exit codes."""
    recipe = load_recipe(args.recipe, list(getattr(args, "overrides", None) or []))
    budget = getattr(args, "budget_gib", None)
    budget = 16.0 if budget is None else float(budget)
    if not budget > 0:
        raise UserError("--budget-gib", f"{budget:g} is not a positive size", "Give the GPU memory in GiB, e.g. 16")
    gpus = getattr(args, "gpus", None)
    gpus = 1 if gpus is None else gpus
    if gpus < 1:
        raise UserError("--gpus", f"{gpus} is not a number of GPUs", "Give 1 or more")
    result = plan(recipe, budget_gib=budget, device=getattr(args, "device", None) or "cuda", gpus=gpus,
                  strategy=getattr(args, "strategy", None) or "ddp")
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        print(format_plan(result, recipe))
    return DOES_NOT_FIT if getattr(args, "check", False) and not result["fits"] else 0
