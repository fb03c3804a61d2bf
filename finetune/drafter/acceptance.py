"""How well a drafter serves a target, measured with transformers' own assisted generation.

For each held-out prompt (image, audio, text; batch 1, as assisted generation runs) the target
answers greedily twice: alone, and with `assistant_model=drafter` (transformers picks
`SinglePositionMultiTokenCandidateGenerator`, drafting `k` tokens per round). A forward pre-hook
on the target counts its forward passes and one on the drafter its drafted tokens. Reported:

- `tokens_per_forward`: new tokens / target forwards (1.0 = no speed-up; k + 1 at best);
- `mean_accepted`: accepted draft tokens per verification round (each target forward yields one
  token of its own, the rest of its tokens were drafts it accepted);
- `acceptance_rate`: accepted drafts / drafted tokens (vLLM's "draft acceptance rate");
- `identical`: the output equals the plain greedy output on every prompt. Speculative decoding
  is lossless; anything else is a bug, reported, never hidden.

Answers follow the served settings of finetune.model.generate (chat template with the generation
prompt, media and channel tokens suppressed); with `ignore_eos` every answer runs its full
length, as serving benchmarks measure (`vllm bench serve --ignore-eos`).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from finetune.model.generate import prompt_inputs, stop_ids, suppressed_ids


def pick_items(items: list, n: int) -> list:
    """At most `n` items, taken round-robin over their modalities (image, audio, text, …) so
    that each is measured, in their original order within a modality."""
    by = defaultdict(list)
    for it in items:
        by[it.conv.modality()].append(it)
    queues = [by[m] for m in sorted(by)]
    out = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


class _Counter:
    """Counts forward calls of a module while registered."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def _core(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def measure(target, drafters: dict, processor, chat, items: list, *, k: int, new_tokens: int,
            ignore_eos: bool, image_tokens: int, progress: bool = False) -> dict:
    """{name: summary} for each drafter in `drafters` ({name: drafter}) on `target`, over `items`
    (with `.conv`, `.images`, `.audios`); the plain greedy answers are computed once."""
    from tqdm import tqdm

    core = _core(target)
    device = next(core.parameters()).device
    dtype = core.get_input_embeddings().weight.dtype
    gen = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": processor.tokenizer.pad_token_id,
           "eos_token_id": None if ignore_eos else stop_ids(processor, chat),
           "bad_words_ids": suppressed_ids(processor, chat), "use_cache": True}
    was_training = target.training
    target.eval()
    rows: dict[str, list[dict]] = {name: [] for name in drafters}
    for d in drafters.values():
        d.to(device=device, dtype=dtype).eval()
        d.generation_config.num_assistant_tokens = k
        d.generation_config.num_assistant_tokens_schedule = "constant"
    bar = tqdm(total=len(items) * (1 + len(drafters)), desc="acceptance", leave=False, file=sys.stderr,
               disable=not progress)
    for it in items:
        inputs = prompt_inputs(processor, chat, [it.conv], [it.images], [it.audios], image_tokens)
        inputs = {key: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for key, v in inputs.items()}
        n_prompt = inputs["input_ids"].shape[1]
        plain = target.generate(**inputs, **gen)
        bar.update(1)
        for name, drafter in drafters.items():
            forwards, drafted = _Counter(core), _Counter(drafter)
            try:
                assisted = target.generate(**inputs, **gen, assistant_model=drafter)
            finally:
                forwards.handle.remove()
                drafted.handle.remove()
            rows[name].append({"id": it.id, "modality": it.conv.modality(), "new_tokens": assisted.shape[1] - n_prompt,
                               "target_forwards": forwards.n, "drafted": drafted.n,
                               "identical": torch.equal(assisted, plain)})
            bar.update(1)
    bar.close()
    if was_training:
        target.train()
    return {name: summarise(r) for name, r in rows.items()}


def summarise(rows: list[dict]) -> dict:
    """Totals over `rows` (see the module docstring), overall and by modality."""
    def agg(rs: list[dict]) -> dict:
        new = sum(r["new_tokens"] for r in rs)
        fwd = sum(r["target_forwards"] for r in rs)
        drafted = sum(r["drafted"] for r in rs)
        accepted = new - fwd
        rounds = fwd - len(rs)  # the first forward of each answer is the prompt's, nothing to verify
        return {"n": len(rs), "new_tokens": new, "target_forwards": fwd, "drafted": drafted,
                "tokens_per_forward": round(new / max(fwd, 1), 4),
                "mean_accepted": round(accepted / max(rounds, 1), 4),
                "acceptance_rate": round(accepted / max(drafted, 1), 4),
                "identical": all(r["identical"] for r in rs)}

    by = defaultdict(list)
    for r in rows:
        by[r["modality"]].append(r)
    out = agg(rows)
    out["by_modality"] = {m: agg(rs) for m, rs in sorted(by.items())}
    out["mismatched"] = [r["id"] for r in rows if not r["identical"]]
    return out


def pairing_rows(target, which: str, drafters: dict[str, tuple[str, object]], processor, chat, items: list,
                 recipe, progress: bool = False) -> list[dict]:
    """Rows `{target: which, drafter: name, path, **summary}` for `drafters` ({name: (path,
    drafter)}) on `target`, with the recipe's drafting settings (`drafter.*`)."""
    d = recipe.drafter
    got = measure(target, {name: m for name, (_, m) in drafters.items()}, processor, chat, items, k=d.num_tokens,
                  new_tokens=d.continuation_tokens, ignore_eos=d.ignore_eos, image_tokens=recipe.data.image_tokens,
                  progress=progress)
    return [{"target": which, "drafter": name, "path": path, **got[name]} for name, (path, _) in drafters.items()]


def report(pairings: list[dict], recipe, n_items: int) -> dict:
    """The acceptance report of `finetune eval` (`eval.json["drafter"]`) and the demo."""
    d = recipe.drafter
    return {"k": d.num_tokens, "new_tokens": d.continuation_tokens, "ignore_eos": d.ignore_eos, "items": n_items,
            "pairings": pairings, "identical": all(p["identical"] for p in pairings),
            "figures": {f"{p['target']}+{p['drafter']}": p["tokens_per_forward"] for p in pairings}}
