"""LoRA targets (presets + regex) → PEFT LoraConfig, and the per-modality trainable table."""

from __future__ import annotations

import re
from collections import OrderedDict

import torch

from finetune.errors import UserError
from finetune.model.families import Family

# Presets name *roles*; each model family says which module names play them.
PRESETS = ("attention", "mlp", "vision", "audio", "all")


def check_target(target: str) -> str | None:
    """None when `target` is a preset or a compilable regex, else what is wrong."""
    if target in PRESETS:
        return None
    if not target.strip():
        return "an empty target"
    try:
        re.compile(target)
    except re.error as e:
        return f"{target!r} is not a preset and not a valid regex ({e})"
    return None


def target_regex(targets: list[str], family: Family) -> str:
    """One full-match regex over runtime module names, as PEFT takes it."""
    parts = []
    for t in targets:
        roles = ("attention", "mlp", "vision", "audio") if t == "all" else (t,)
        if t in PRESETS:
            parts.extend(family.role_patterns[r] for r in roles)
        else:
            parts.append(t if t.startswith(".*") else f".*{t}")
    return "(" + "|".join(f"(?:{p})" for p in parts) + ")"


def lora_config(lora, family: Family):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_regex(lora.targets, family),
        use_rslora=lora.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainable_table(model, family: Family) -> list[dict]:
    """Rows of {part, modules, trainable, frozen} grouped by which modality a weight serves."""
    import torch  # here, not at the top: `finetune validate` imports this module

    rows: OrderedDict[str, dict] = OrderedDict(
        (part, {"part": part, "lora_modules": 0, "trainable": 0, "frozen": 0})
        for part in ("text backbone", "vision projection", "audio projection", "embeddings + head"))
    seen_modules = set()
    for name, p in model.named_parameters():
        part = family.part_of(name)
        n = p.numel()
        # 4-bit weights are packed two per byte; report the logical parameter count.
        if p.dtype == torch.uint8 and hasattr(p, "quant_state"):
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        row = rows[part]
        if p.requires_grad:
            row["trainable"] += n
            mod = name.split(".lora_")[0]
            if mod not in seen_modules:
                seen_modules.add(mod)
                row["lora_modules"] += 1
        else:
            row["frozen"] += n
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    head = f"{'part':<20}{'LoRA modules':>14}{'trainable':>14}{'frozen':>16}{'% trainable':>13}"
    lines = [head, "-" * len(head)]
    tt = tf = 0
    for r in rows:
        total = r["trainable"] + r["frozen"]
        pct = 100.0 * r["trainable"] / total if total else 0.0
        lines.append(f"{r['part']:<20}{r['lora_modules']:>14,}{r['trainable']:>14,}{r['frozen']:>16,}"
                     f"{pct:>12.3f}%")
        tt += r["trainable"]
        tf += r["frozen"]
    lines.append("-" * len(head))
    lines.append(f"{'total':<20}{'':>14}{tt:>14,}{tf:>16,}{100.0 * tt / max(tt + tf, 1):>12.3f}%")
    return "\n".join(lines)


def attach_lora(model, lora_section, family: Family):
    from peft import get_peft_model

    cfg = lora_config(lora_section, family)
    try:
        peft_model = get_peft_model(model, cfg)
    except ValueError as e:
        raise UserError("lora.targets", f"no module matched ({str(e).splitlines()[0][:160]})",
                        "Use presets attention, mlp, vision, audio or a regex over module names") from None
    # LoRA weights train in fp32 even over a bf16/4-bit base: Adam on bf16 weights loses updates.
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model

