"""GRPO rollouts: `group_size` sampled completions per prompt from the current policy, as rows.

A prompt is the served prompt of a rendered sample (cut where its last answer starts, media
included: `finetune.drafting.served_prompts`). Its group is sampled with transformers
`generate` on the LoRA model in eval mode, the prompt repeated `group_size` times in one batch
(its media repeated with it); with a drafter, assisted generation runs one completion at a
time (transformers drafts for batch 1 only). Each prompt samples under its own seed
(`prompt_seed`: the run's seed, the rollout batch, the record), so neither the split over
processes nor a resume changes what is sampled.

`rows` lays the completions of all prompts out as TRL's GRPO trainer does: the prompt
left-padded, the completion right-padded after it, so one forward gives every completion
token's log-probability; `completion_mask` is 1 up to and including each completion's stop.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import torch

from finetune.model.generate import in_step

MEDIA = ("pixel_values", "image_position_ids", "input_features", "input_features_mask")


@dataclass
class Sampling:
    group_size: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: list[int]
    suppress: list[list[int]]
    pad_id: int


class ForwardCounter:
    """Counts a module's forwards while registered, row by row: a forward over a batch of g rows
    counts g, so batched sampling and one-row assisted generation compare per sequence."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        self.n += x.shape[0] if x is not None else 1


def _repeat(prompt: dict, g: int) -> dict:
    """One served prompt (batch 1) as `g` identical rows, its media repeated row by row."""
    return {k: v.repeat(g, *([1] * (v.dim() - 1))) for k, v in prompt.items()}


def _trim(ids: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion ids with everything after the first stop set to pad, mask of kept tokens)."""
    if stop_ids:
        stops = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
        keep = (stops.cumsum(1) - stops.long()) == 0  # up to and including the first stop
    else:
        keep = torch.ones_like(ids, dtype=torch.bool)
    keep &= ids != pad_id
    return ids.masked_fill(~keep, pad_id), keep.long()


@torch.no_grad()
def sample_group(model, prompt: dict, s: Sampling, drafter=None) -> tuple[torch.Tensor, int]:
    """(`group_size` × new-token ids, the target's row-forwards) for one served prompt."""
    gen = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0,
           "max_new_tokens": s.max_new_tokens, "eos_token_id": s.stop_ids, "pad_token_id": s.pad_id,
           "bad_words_ids": s.suppress or None, "use_cache": True}
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    gen |= in_step(core)
    counter = ForwardCounter(core)
    n = prompt["input_ids"].shape[1]
    try:
        if drafter is None:
            out = model.generate(**_repeat(prompt, s.group_size), **gen)[:, n:]
        else:
            rows = [model.generate(**prompt, **gen, assistant_model=drafter)[:, n:] for _ in range(s.group_size)]
            width = max(r.shape[1] for r in rows)
            out = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=s.pad_id) for r in rows])
    finally:
        counter.handle.remove()
    return out, counter.n


@dataclass
class Group:
    """The completions of one prompt."""
    ids: torch.Tensor  # (G, T) new tokens, pad after the stop
    mask: torch.Tensor  # (G, T) 1 on completion tokens (stop included)
    forwards: int


def prompt_seed(seed: int, batch: int, origin: str) -> int:
    """The sampling seed of one prompt: its record (`origin`), the run's seed and which batch of
    rollouts this is. Independent of the rank and the micro-batch the prompt lands in, so a run
    split over processes samples what one process would, and a resumed run what a straight one did."""
    digest = hashlib.sha256(f"{seed}:{batch}:{origin}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def roll_out(model, prompts: list[dict], s: Sampling, drafter=None, seeds: list[int] | None = None
             ) -> tuple[list[Group], dict]:
    """Groups for `prompts` (served prompts, batch 1 each, on the model's device), each sampled
    under its seed in `seeds` (torch's global generator is left as it was), and rollout figures:
    new tokens, target forwards, seconds."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    groups = []
    device = next(model.parameters()).device
    try:
        for k, p in enumerate(prompts):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seeds is not None:
                    torch.manual_seed(seeds[k])
                ids, forwards = sample_group(model, p, s, drafter)
            ids, mask = _trim(ids, s.stop_ids, s.pad_id)
            groups.append(Group(ids, mask, forwards))
    finally:
        model.train(was_training)
    tokens = sum(int(g.mask.sum()) for g in groups)
    return groups, {"tokens": tokens, "forwards": sum(g.forwards for g in groups),
                    "seconds": time.perf_counter() - t0}


def rows(prompts: list[dict], groups: list[Group], pad_id: int) -> dict:
    """Every completion after its prompt as one batch: prompts left-padded to one width P,
    completions right-padded to one width T; media in row order; `position_ids` count real
    tokens (as the unpadded prompt is served); `completion_ids`/`completion_mask` (N, T)."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    t = max(g.ids.shape[1] for g in groups)
    ids, attn, types, comp, cmask = [], [], [], [], []
    media: dict[str, list[torch.Tensor]] = {}
    for p, g in zip(prompts, groups):
        k = g.ids.shape[0]
        left = width - p["input_ids"].shape[1]
        right = t - g.ids.shape[1]
        pad = torch.nn.functional.pad
        c_ids, c_mask = pad(g.ids, (0, right), value=pad_id), pad(g.mask, (0, right))
        ids.append(torch.cat([pad(p["input_ids"], (left, 0), value=pad_id).expand(k, -1), c_ids], 1))
        attn.append(torch.cat([pad(p["attention_mask"], (left, 0)).expand(k, -1), c_mask], 1))
        types.append(torch.cat([pad(p["mm_token_type_ids"], (left, 0)).expand(k, -1), torch.zeros_like(c_ids)], 1))
        comp.append(c_ids)
        cmask.append(c_mask)
        for key in MEDIA:
            if key in p:
                media.setdefault(key, []).append(_repeat({key: p[key]}, k)[key])
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(attn), "mm_token_type_ids": torch.cat(types),
           "completion_ids": torch.cat(comp), "completion_mask": torch.cat(cmask), "prompt_len": width}
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    for key, parts in media.items():
        out[key] = _cat_media(parts)
    return out


def _cat_media(parts: list[torch.Tensor]) -> torch.Tensor:
    """Media tensors of several prompts in one: padded to the widest (patches, audio frames) as
    `data_tools.collate` pads them (pixels 0, positions -1, audio mask False)."""
    width = max(p.shape[1] for p in parts)
    fill = -1 if parts[0].dtype == torch.long else 0
    out = []
    for p in parts:
        if p.shape[1] < width:
            spec = (0, 0) * (p.dim() - 2) + (0, width - p.shape[1])
            p = torch.nn.functional.pad(p.long() if p.dtype == torch.bool else p, spec, value=fill).to(p.dtype)
        out.append(p)
    return torch.cat(out)


# ---------------------------------------------------------------- checkpointed rollouts

_NESTED = ("rows", "stats")


def cycle_tensors(calls: int, cycle: dict[int, dict]) -> dict[str, torch.Tensor]:
    """The rollouts reused across `grpo.iterations` steps as flat tensors (safetensors holds no
    strings): `slot.key` and `slot.rows.key` / `slot.stats.name`."""
    out = {"calls": torch.tensor(calls)}
    for slot, ro in cycle.items():
        for key, value in ro.items():
            if key in _NESTED:
                for k, v in value.items():
                    out[f"{slot}.{key}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
            elif torch.is_tensor(value):
                out[f"{slot}.{key}"] = value.detach().cpu().contiguous()
    return out


def cycle_from_tensors(state: dict[str, torch.Tensor]) -> tuple[int, dict[int, dict]]:
    """The inverse of `cycle_tensors` (scalars back to Python numbers)."""
    calls = int(state.pop("calls"))
    cycle: dict[int, dict] = {}
    for name, v in state.items():
        slot, _, key = name.partition(".")
        ro = cycle.setdefault(int(slot), {})
        head, _, sub = key.partition(".")
        if head in _NESTED:
            ro.setdefault(head, {})[sub] = v.item() if v.dim() == 0 else v
        else:
            ro[key] = v
    return calls, cycle
