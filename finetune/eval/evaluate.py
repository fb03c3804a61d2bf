"""Base vs adapter, item by item, on held-out samples: the one eval flow.

`finetune eval` and the demo both call `evaluate_adapter`: the recipe's held-out items are
answered by the base and then by base + adapter (the base loaded once, in the recipe's
quantization, the adapter attached on top), with the same greedy generation as serving
(finetune.model.generate), and every answer is scored with its dataset's metric: exact match
(case/punctuation-insensitive), token F1, or character/word error rate.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from data_tools.conversation import BadRecord, Conversation, Part
from finetune.errors import UserError


def _norm(s: str) -> str:
    return re.sub(r"[^\w\s,]", "", s.lower()).strip()


def exact_match(pred: str, ref: str) -> float:
    return float(_norm(pred) == _norm(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = _norm(pred).split(), _norm(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def _edit_distance(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(pred: str, ref: str) -> float:
    r = _norm(ref)
    return _edit_distance(list(_norm(pred)), list(r)) / max(1, len(r))


def wer(pred: str, ref: str) -> float:
    r = _norm(ref).split()
    return _edit_distance(_norm(pred).split(), r) / max(1, len(r))


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "cer": cer, "wer": wer}
LOWER_IS_BETTER = {"cer", "wer"}


# ---------------------------------------------------------------- held-out items


@dataclass
class EvalItem:
    id: str
    dataset: str
    metric: str
    conv: Conversation  # the prompt turns and the reference answer (last message)
    images: list
    audios: list

    @property
    def reference(self) -> str:
        return self.conv.messages[-1].text().strip()


def prepared_again(recipe, processor, chat):
    """The run's data as the trainer prepared it (the pipeline decides what was held out, and its
    cache makes asking again cheap); rejects are not written again (the run wrote them)."""
    import tempfile

    from data_tools.pipeline import prepare

    with tempfile.TemporaryDirectory() as tmp:
        return prepare(recipe, processor, recipe.model.base, chat=chat, rejects_path=Path(tmp) / "rejects.jsonl",
                       log=None, streaming=False, use_cache=not recipe.data.streaming)


def _held_out_origins(recipe, processor, chat) -> set[str]:
    """The records the trainer held out (data.eval_fraction)."""
    ev = prepared_again(recipe, processor, chat).eval
    return set(ev.table["origin"]) if hasattr(ev, "table") else {s["origin"] for s in ev}


def eval_items(recipe, processor, chat, limit: int | None = None, log=None) -> tuple[list[EvalItem], int]:
    """(items, skipped): held-out chat records ending in an answer, with decoded media."""
    from data_tools.accounting import dataset_name
    from data_tools.formats import parse_record
    from data_tools.media import load_media
    from data_tools.preference import preferred_conversation
    from data_tools.sources import iter_records

    specs, held = recipe.eval_datasets, None
    if not specs:
        specs = recipe.datasets
        if recipe.data.eval_fraction > 0:
            held = _held_out_origins(recipe, processor, chat)
        elif log:
            log("note: no eval_datasets and data.eval_fraction is 0: evaluating on the training data")
    items, skipped = [], 0
    for i, spec in enumerate(specs):
        name = dataset_name(i, spec)
        for origin, record, base_dir in iter_records(spec):
            if limit is not None and len(items) >= limit:
                return items, skipped
            if held is not None and origin not in held:
                continue
            try:
                if isinstance(record, BadRecord):
                    raise record
                if spec.format == "preference":  # the prompt and its preferred answer
                    conv = preferred_conversation(record, origin, base_dir)
                else:
                    conv = parse_record(record, spec.format, origin, base_dir)
                last = conv.messages[-1]
                if conv.kind not in ("chat", "prompt") or last.role != "assistant" or not last.text().strip():
                    raise BadRecord("no_answer", "nothing to compare against", origin)
                images, audios = load_media(conv, recipe.data)
            except BadRecord:
                skipped += 1  # training already reported it (rejects.jsonl)
                continue
            rid = record.get("id") if isinstance(record.get("id"), (str, int)) else None
            items.append(EvalItem(str(rid) if rid is not None else origin, name,
                                  spec.metric or recipe.eval.metric, conv, images, audios))
    return items, skipped


# ---------------------------------------------------------------- scoring


def winner(metric: str, base: float, adapter: float) -> str:
    if abs(base - adapter) < 1e-12:
        return "tie"
    return "adapter" if (adapter < base) == (metric in LOWER_IS_BETTER) else "base"


def _aggregate(rows: list[dict]) -> dict:
    """Wins/losses/ties from the adapter's side, and mean scores per metric."""
    agg = {"n": len(rows), "wins": 0, "losses": 0, "ties": 0, "metrics": {}}
    for r in rows:
        agg[{"adapter": "wins", "base": "losses", "tie": "ties"}[r["winner"]]] += 1
    for metric in sorted({r["metric"] for r in rows}):
        sel = [r["scores"] for r in rows if r["metric"] == metric]
        agg["metrics"][metric] = {"base": round(sum(s["base"] for s in sel) / len(sel), 4),
                                  "adapter": round(sum(s["adapter"] for s in sel) / len(sel), 4),
                                  "n": len(sel), "lower_is_better": metric in LOWER_IS_BETTER}
    return agg


def prompt_text(conv: Conversation) -> str:
    """The prompt turns as readable text, media as <image>/<audio>."""
    def part(p: Part) -> str:
        return (p.text or "") if p.type == "text" else f"<{p.type}>"

    return "\n".join(f"{m.role}: " + "".join(map(part, m.parts)) for m in conv.messages[:-1])


def score(items: list[EvalItem], base_out: list[str], adapter_out: list[str]) -> dict:
    """{items, by_modality, by_dataset, summary}: each answer scored by its dataset's metric."""
    rows = []
    for it, b, a in zip(items, base_out, adapter_out):
        fn = METRICS[it.metric]
        s = {"base": round(fn(b, it.reference), 4), "adapter": round(fn(a, it.reference), 4)}
        rows.append({"id": it.id, "dataset": it.dataset, "modality": it.conv.modality(), "metric": it.metric,
                     "prompt": prompt_text(it.conv), "reference": it.reference, "base": b, "adapter": a,
                     "scores": s, "winner": winner(it.metric, s["base"], s["adapter"])})
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by["modality"][r["modality"]].append(r)
        by["dataset"][r["dataset"]].append(r)
    return {"items": rows,
            "by_modality": {k: _aggregate(v) for k, v in sorted(by["modality"].items())},
            "by_dataset": {k: _aggregate(v) for k, v in sorted(by["dataset"].items())},
            "summary": _aggregate(rows)}


# ---------------------------------------------------------------- the flow


def evaluate_adapter(recipe, adapter: str | Path, *, max_items: int | None = None, log=None,
                     progress: bool = False, drafter: str | Path | None = None) -> tuple[dict, list[EvalItem]]:
    """(result, items): the recipe's held-out items answered by base and base + adapter, scored.

    With a drafter (the recipe's shipped `drafter.path`, and/or `drafter`: an aligned one),
    `result["drafter"]` is its acceptance (finetune.drafter.acceptance) on both models, measured on
    `drafter.eval_items` of the items with the models already loaded."""
    from finetune.drafter.acceptance import pairing_rows, pick_items, report
    from finetune.eval.agent import agent_eval, is_agent_item
    from finetune.model.adapters import load_adapter, open_adapter
    from finetune.model.generate import generate_items
    from finetune.model.load import base_family, load_processor, load_recipe_base

    m = recipe.model
    # A missing, pickled, corrupt or other-base adapter fails now, not after the base's answers.
    open_adapter(adapter, base=m.base, allow_pickle=m.allow_pickle)
    family = base_family(m.base, m.trust_remote_code)
    processor = load_processor(m.base, recipe.data.image_tokens, m.trust_remote_code)
    items, skipped = eval_items(recipe, processor, family.chat, max_items or recipe.eval.max_items, log)
    if not items:
        raise UserError("eval_datasets", "no usable held-out items (chat records ending in an answer)",
                        "Add eval_datasets, or set data.eval_fraction")
    model = load_recipe_base(m)
    gen = {"max_new_tokens": recipe.eval.max_new_tokens, "image_tokens": recipe.data.image_tokens,
           "batch_size": recipe.eval.batch_size, "progress": progress, "thinking": recipe.data.thinking}
    drafters = _drafters(recipe, drafter, model.config)
    measured = (pick_items(items, recipe.drafter.eval_items), recipe)  # acceptance: a few items per modality
    # Tool-use items run as an agent loop (finetune.eval.agent); the rest answer once.
    agents = [it for it in items if is_agent_item(it.conv)]
    plain = [it for it in items if not is_agent_item(it.conv)]
    loop = {"responder_spec": recipe.eval.tool_responder, "max_new_tokens": recipe.eval.max_new_tokens,
            "image_tokens": recipe.data.image_tokens, "thinking": recipe.data.thinking, "match": exact_match}
    rows = []
    if "shipped" in drafters:
        rows += pairing_rows(model, "base", {"shipped": drafters["shipped"]}, processor, family.chat, *measured)
    raws: dict[str, list] = {"base": [], "adapter": []}  # GRPO's format/tool_call rewards read the raw text
    base_out = generate_items(model, processor, family.chat, plain, **gen, raw=raws["base"])
    base_agent = agent_eval(model, processor, family.chat, agents, **loop) if agents else None
    model = load_adapter(model, str(adapter), allow_pickle=m.allow_pickle)
    adapter_out = generate_items(model, processor, family.chat, plain, **gen, raw=raws["adapter"])
    if drafters:
        rows += pairing_rows(model, "adapted", drafters, processor, family.chat, *measured)
    result = score(plain, base_out, adapter_out)
    if recipe.train.objective == "grpo":  # the recipe's rewards on the greedy answers, by modality
        from finetune.grpo.rewards import reward_by_modality

        result["rewards"] = reward_by_modality(recipe.grpo.rewards, family.chat, plain,
                                               {"base": base_out, "adapter": adapter_out}, raws,
                                               _written_references(processor, family.chat, plain, recipe))
    if agents:
        adapter_agent = agent_eval(model, processor, family.chat, agents, **loop)
        result["agent"] = {"base": base_agent[0], "adapter": adapter_agent[0],
                           "items": [{"id": b["id"], "base": b, "adapter": a}
                                     for b, a in zip(base_agent[1], adapter_agent[1])]}
    result["summary"].update(skipped=skipped, adapter=str(adapter), base=m.base)
    if drafters:
        result["drafter"] = report(rows, recipe, len(measured[0]))
    if any(s.format == "preference" for s in recipe.eval_datasets or recipe.datasets):
        result["preference"] = _preference(model, recipe, processor, family.chat, log)
    return result, plain + agents  # result["items"] pairs with the plain items, first


def _written_references(processor, chat, items, recipe) -> list[str]:
    """Each item's reference as the model would write it (thought, calls and stop token in the
    template's syntax), next to the raw answers."""
    from finetune.model.generate import renderer, wants_thinking

    r = renderer(processor, chat)
    return [r.answer_text(it.conv, wants_thinking(recipe.data.thinking, it.conv, chat)) for it in items]


def _preference(model, recipe, processor, chat, log) -> dict:
    """Held-out preference accuracy (finetune.eval.preference) on the samples training held out."""
    from finetune.eval.preference import preference_report

    data = prepared_again(recipe, processor, chat)
    samples = data.eval if len(data.eval) else data.train  # no held-out data: the note above applies
    return preference_report(model, recipe, [samples[i] for i in range(len(samples))],
                             processor.tokenizer.pad_token_id, log=log)


def _drafters(recipe, aligned, target_cfg) -> dict:
    """{"shipped": (path, drafter), "aligned": (path, drafter)} for those given."""
    from finetune.drafter.model import load_drafter

    paths = {"shipped": (recipe.drafter.path, "drafter.path"), "aligned": (aligned, "--drafter")}
    return {name: (str(p), load_drafter(str(p), target_cfg, where=where))
            for name, (p, where) in paths.items() if p}


def accuracy_table(result: dict, metric: str = "exact_match") -> dict:
    """{"base": {modality: {"accuracy", "n"}}, "adapter": {...}} from a result (the demo's eval.json)."""
    out: dict[str, dict] = {"base": {}, "adapter": {}}
    for modality, agg in result["by_modality"].items():
        m = agg["metrics"].get(metric)
        if m:
            for side in out:
                out[side][modality] = {"accuracy": m[side], "n": m["n"]}
    return out
