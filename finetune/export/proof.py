"""The proof that ends every export: a probe holding text, an image and an audio clip, run
through what was exported, gives base + adapter's logits.

`reference` runs the probe once through base + the source adapter (PEFT, fp32); `logits_with`
runs it through the base with the exported weights put in: tensors replaced (a projector read
back from its GGUF), updates added (a LoRA read back from its GGUF), a folder loaded instead
of the base (a linked model folder), an exported PEFT folder attached on top. The tolerances are
the merge's (`finetune.export.merge`: TOLERANCE of the logits' scale, or MERGE_SHARE of what the
adapter moves): an export is a merge whose weights live in the server's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.export.merge import MERGE_SHARE, TOLERANCE, load_base, logits, probe_batch


@dataclass
class Reference:
    """base + adapter on the probe, and how far the adapter moves it."""

    batch: dict
    logits: torch.Tensor
    lora_effect: float  # max |logits(base + adapter) - logits(base)|
    tol: float  # TOLERANCE times the logits' scale: what a lossless export must meet
    merge_tol: float  # also MERGE_SHARE of the effect: fp32 reassociation amplified by depth

    def report(self) -> dict:
        return {"probe_tokens": int(self.batch["input_ids"].shape[1]), "probe_parts": ["text", "image", "audio"],
                "lora_effect": self.lora_effect, "tolerance": self.tol, "merge_tolerance": self.merge_tol}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def reference(base: str, family, adapter: Path) -> Reference:
    """The probe through base + `adapter` (PEFT applies the LoRA unmerged) and through the base alone."""
    _, batch = probe_batch(base)
    model = load_base(base, family)
    ref = logits(model, batch, adapter)
    plain = logits(model, batch)
    tol = TOLERANCE * max(1.0, float(ref.abs().max()))
    effect = max_diff(ref, plain)
    return Reference(batch, ref, effect, tol, max(tol, MERGE_SHARE * effect))


@torch.no_grad()
def logits_with(base: str, family, batch: dict, *, folder: str | Path | None = None,
                replace: dict[str, torch.Tensor] | None = None, add: dict[str, torch.Tensor] | None = None,
                attach: Path | None = None) -> torch.Tensor:
    """fp32 logits of `folder` (default: the base) with parameters replaced (`replace`: runtime
    parameter name -> tensor), module updates added to weights (`add`: runtime module -> delta)
    and a PEFT folder attached."""
    model = load_base(str(folder or base), family)
    params = dict(model.named_parameters())
    for name, t in (replace or {}).items():
        params[name].copy_(t.to(params[name].dtype))
    for module, d in (add or {}).items():
        params[f"{module}.weight"] += d.to(params[f"{module}.weight"].dtype)
    return logits(model, batch, attach)


def furthest(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """{"tensor", "max_rel_diff"}: of the tensors a proof put in, the one furthest (max |got - want|
    over max |want|) from what base + adapter holds there. A failed probe says one number for the
    whole model; this names where to look (a layout, a scale, a file pointing at the wrong bytes)."""
    from finetune.model.adapters import max_rel_diff

    rel = {k: max_rel_diff(got[k].double(), want[k].double()) if got[k].shape == want[k].shape else float("inf")
           for k in want if k in got}
    rel |= {k: float("inf") for k in want if k not in got}
    name = max(rel, key=rel.get) if rel else None
    return {"tensor": name, "max_rel_diff": rel.get(name)}


def failure(out: Path, report: dict, blame: dict, report_file: str) -> str:
    """The ParityError text of a failed probe: both figures and the tensor furthest off."""
    if not blame.get("tensor"):
        where = ""
    elif blame["max_rel_diff"] == 0:
        where = "; every tensor it holds equals base + adapter's: the difference is in its config or how it is read"
    else:
        where = f"; furthest from base + adapter: {blame['tensor']} (max rel diff {blame['max_rel_diff']:.3g})"
    return (f"{out}: the exported files do not reproduce base+adapter on the probe (max |dlogits| "
            f"{report['max_abs_diff']:.3g}, the adapter moves them by {report['lora_effect']:.3g}){where} "
            f"(see {out / report_file})")
