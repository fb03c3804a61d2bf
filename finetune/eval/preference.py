"""Held-out preference accuracy, base vs adapter, per modality (`finetune eval` on preference data).

For each held-out pair (rendered by the data pipeline exactly as training saw it) three policies
score both answers by their log-probability over the answer tokens: the base (adapter off), the
adapter, and the reference (the base, or `train.reference_adapter` loaded as `ref`).

- `accuracy` of a model: how often it ranks the chosen answer above the rejected one, by its
  implicit reward β·log π(answer) (ORPO: per-token means, as ORPO's rewards are); ties count
  half. A random base sits near 0.5.
- `reward_accuracy`: the training metric `rewards/accuracies` on held-out pairs, the adapter's
  reward measured against the reference, β·(log π − log π_ref) (KTO's unpaired examples: the
  reward has the label's sign).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from data_tools.collate import collate
from finetune.objectives.preference import (
    REFERENCE,
    answer_row,
    pair_batch,
    reference_policy,
    sequence_logps,
    sides,
)


def is_preference(sample: dict) -> bool:
    return "rejected_ids" in sample or "desirable" in sample


def _scores(model, batch: dict, mean: bool) -> dict[str, torch.Tensor]:
    """Log-probabilities of every row under base, adapter and reference (ORPO: per-token means)."""
    out = {}
    with torch.no_grad():
        with model.disable_adapter():
            out["base"], tokens = sequence_logps(model, batch)
        out["adapter"], _ = sequence_logps(model, batch)
        with reference_policy(model):
            out["reference"], _ = sequence_logps(model, batch)
    if mean:
        out = {k: v / tokens.clamp(min=1) for k, v in out.items()}
    return out


def _rank(chosen: torch.Tensor, rejected: torch.Tensor) -> list[float]:
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen.tolist(), rejected.tolist())]


def score_samples(model, samples: list, pad_id: int, *, beta: float, mean: bool,
                  batch_size: int = 8) -> list[dict]:
    """One row per held-out sample: modality, each model's ranking and margin, the reward's."""
    rows = []
    model.eval()
    pairs = [s for s in samples if sides(s)[2] is not None]
    singles = [s for s in samples if sides(s)[2] is None and "desirable" in s]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        sc = _scores(model, pair_batch(chunk, pad_id), mean)
        n = len(chunk)
        reward = beta * (sc["adapter"] - sc["reference"])
        for j, s in enumerate(chunk):
            row = {"modality": s["modality"], "origin": s.get("origin", "")}
            for side in ("base", "adapter"):
                c, r = beta * sc[side][j], beta * sc[side][n + j]
                row[side] = {"correct": _rank(c[None], r[None])[0], "margin": float(c - r)}
            row["reward"] = {"correct": _rank(reward[j][None], reward[n + j][None])[0],
                             "margin": float(reward[j] - reward[n + j])}
            rows.append(row)
    for s in singles:
        start, answer, _ = sides(s)
        sc = _scores(model, collate([answer_row(s, start, answer)], pad_id), mean)
        reward = float(beta * (sc["adapter"][0] - sc["reference"][0]))
        sign = reward if s["desirable"] else -reward
        rows.append({"modality": s["modality"], "origin": s.get("origin", ""),
                     "reward": {"correct": 1.0 if sign > 0 else 0.5 if sign == 0 else 0.0, "margin": sign}})
    return rows


def summarise(rows: list[dict]) -> dict:
    """{modality: {pairs, base, adapter, reward_accuracy, reward_margin, n}} and "all"."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["modality"]].append(r)
        groups["all"].append(r)
    out = {}
    for name, g in sorted(groups.items()):
        paired = [r for r in g if "base" in r]
        entry = {"n": len(g), "pairs": len(paired),
                 "reward_accuracy": round(sum(r["reward"]["correct"] for r in g) / len(g), 4),
                 "reward_margin": round(sum(r["reward"]["margin"] for r in g) / len(g), 4)}
        for side in ("base", "adapter"):
            if paired:
                entry[side] = {"accuracy": round(sum(r[side]["correct"] for r in paired) / len(paired), 4),
                               "margin": round(sum(r[side]["margin"] for r in paired) / len(paired), 4)}
        out[name] = entry
    return out


def preference_report(model, recipe, samples: list, pad_id: int, *, log=None) -> dict:
    """`{"by_modality": summarise(...), "items": rows, "objective", "beta", "reference"}` for the
    preference samples among `samples`; `model` is base + the adapter under test (PEFT)."""
    if not hasattr(model, "peft_config"):
        raise TypeError("preference_report needs a PEFT model (base + adapter)")
    ref = recipe.train.reference_adapter
    if ref and REFERENCE not in model.peft_config:
        model.load_adapter(ref, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter("default")
    chosen = [s for s in samples if is_preference(s)]
    rows = score_samples(model, chosen, pad_id, beta=recipe.preference.beta,
                         mean=recipe.train.objective == "orpo", batch_size=recipe.eval.batch_size)
    if log:
        log(f"preference: {len(rows)} held-out preference items scored by base, adapter and reference")
    return {"objective": recipe.train.objective, "beta": recipe.preference.beta,
            "reference": ref or "base (adapter off)", "by_modality": summarise(rows), "items": rows}


def format_table(report: dict) -> str:
    """The per-modality table `finetune eval` prints."""
    lines = [f"preference ({report['objective']}, β={report['beta']:g}, reference: {report['reference']})",
             f"{'':<10}{'n':>5}{'base acc':>10}{'adapter acc':>13}{'reward acc':>12}{'reward margin':>15}"]
    for name, g in report["by_modality"].items():
        base, adapter = g.get("base", {}).get("accuracy"), g.get("adapter", {}).get("accuracy")
        lines.append(f"{name:<10}{g['n']:>5}{_num(base):>10}{_num(adapter):>13}{g['reward_accuracy']:>12.3f}"
                     f"{g['reward_margin']:>15.3f}")
    return "\n".join(lines)


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"
