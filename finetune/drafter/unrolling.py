"""Drafting as transformers' `SinglePositionMultiTokenCandidateGenerator` does it, unrolled for training.

What the generator feeds the drafter (transformers 5.24, generation/candidate_generator.py), for a
drafting round that starts at token x_t (the token the target just produced, at position t):

- step 1: `[target embedding of x_t, target's last hidden state at t-1]` (the state that produced
  x_t), position id t, cross-attention to the target's shared k/v of positions < t — all of them
  on full layers, the last `sliding_window + 1` on sliding ones (its bidirectional window mask,
  flipped);
- step s > 1: `[target embedding of the drafter's own argmax at step s-1, the drafter's own
  projected last hidden state of step s-1]`, same position id and k/v.

`unroll` computes exactly that, for every start t of a sequence at once (each row of the batch
dimension a start, each with its own mask), feeding back the drafter's own argmax and state, so k
steps cost k drafter forwards over all starts. `tests/drafter/test_drafter.py` holds it against the
generator itself. It is exact for the first round after the prompt and after a fully accepted
round; after a partly accepted one, transformers 5.24 also lets the drafter see the target's k/v
of the rejected drafts (it cuts the returned states by length, not by what was accepted), which
training does not imitate: a server keeps only accepted tokens' states.

The distillation targets are the target's own: its greedy continuation of the prompt (what the
drafter meets when serving) and its next-token distribution at each drafted position, with the
tokens greedy decoding suppresses (media placeholders, channel markers) masked out, as the
verifier's logits processors mask them.
"""

from __future__ import annotations

import numpy as np
import torch

from data_tools.collate import collate
from data_tools.render import IGNORE

PROMPT_KEYS = ("input_ids", "labels", "mm_token_type_ids")
MEDIA_KEYS = ("pixel_values", "image_position_ids", "input_features")


def served_length(labels) -> int:
    """Tokens of a sample's served prompt: all before its last labelled answer (all of it when
    nothing is labelled). The answer follows the rendered generation prompt, so the cut is exactly
    what a server is sent."""
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels != IGNORE)
    if not len(labelled):
        return len(labels)
    before = np.flatnonzero(labels[:labelled[-1]] == IGNORE)
    return int(before[-1]) + 1 if len(before) else 0


def served_prompts(samples: list[dict], pad_id: int) -> dict:
    """Each sample cut where its last answer starts (the served prompt), left-padded, with media."""
    cut = []
    for s in samples:
        n = served_length(s["labels"])
        cut.append({**{k: s[k][:n] for k in PROMPT_KEYS}, **{k: s[k] for k in MEDIA_KEYS if k in s}})
    batch = collate(cut, pad_id)
    batch.pop("labels")
    # collate pads on the right; generation appends on the right, so move each row's padding left
    lengths = batch["attention_mask"].sum(1)
    width = batch["input_ids"].shape[1]
    for i, n in enumerate(lengths.tolist()):
        for k in ("input_ids", "mm_token_type_ids", "attention_mask"):
            batch[k][i] = batch[k][i].roll(width - n)
    return batch


@torch.no_grad()
def continue_greedy(target, prompts: dict, *, new_tokens: int, stop_ids: list[int] | None,
                    suppress: list[list[int]], pad_id: int) -> dict:
    """`prompts` + the target's greedy continuation of `new_tokens` tokens (stopping at `stop_ids`
    unless None), as one batch: input_ids, attention_mask, mm_token_type_ids, position_ids,
    media, `prompt_len` (continuations start there) and `live` (B, T): positions up to and
    including each row's end of turn."""
    from finetune.model.generate import in_step

    seq = target.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False,
                          eos_token_id=stop_ids, pad_token_id=pad_id, bad_words_ids=suppress or None, use_cache=True,
                          **in_step(target))
    b, p = prompts["input_ids"].shape
    cont = seq[:, p:]
    live = torch.ones_like(cont, dtype=torch.bool)
    if stop_ids:
        stops = torch.isin(cont, torch.tensor(stop_ids, device=cont.device))
        live = (stops.cumsum(1) - stops.long()) == 0  # up to and including the first stop
    attn = torch.cat([prompts["attention_mask"], live.long()], 1)
    out = {"input_ids": seq, "attention_mask": attn,
           "mm_token_type_ids": torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(cont)], 1),
           # positions count real tokens, as unpadded serving does (rope is relative, but the
           # sliding window is cut by position)
           "position_ids": (attn.cumsum(1) - 1).clamp(min=0),
           "prompt_len": p, "live": torch.cat([prompts["attention_mask"].bool(), live], 1)}
    out.update({k: v for k, v in prompts.items() if k not in out})
    return out


@torch.no_grad()
def target_states(target_lm, seq: dict, suppress_ids: list[int]):
    """(last hidden states (B, T, H), shared k/v, log-probs (B, T - P, V) of the continuation
    positions' next tokens with the suppressed tokens masked) of one forward over `seq`.
    `target_lm` is the transformers model (under PEFT the LoRA layers sit inside it)."""
    inputs = {k: v for k, v in seq.items() if k not in ("prompt_len", "live")}
    out = target_lm.model(**inputs, use_cache=False, return_shared_kv_states=True)
    hidden = out.last_hidden_state
    p = seq["prompt_len"]
    logits = target_lm.lm_head(hidden[:, p - 1:-1]).float()
    cap = target_lm.config.get_text_config().final_logit_softcapping
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if suppress_ids:
        logits[..., suppress_ids] = float("-inf")
    return hidden, dict(out.shared_kv_states), logits.log_softmax(-1)


def draft_masks(live: torch.Tensor, starts: torch.Tensor, sliding_window: int) -> dict[str, torch.Tensor]:
    """Boolean (B, 1, Q, T) masks for drafting from each of `starts` (Q positions): every live
    position before the start on full layers, the last `sliding_window + 1` of them on sliding
    ones (what the generator's flipped bidirectional window keeps)."""
    kv = torch.arange(live.shape[1], device=live.device)
    before = kv[None, :] < starts[:, None]                                  # (Q, T)
    full = before[None] & live[:, None, :]                                  # (B, Q, T)
    near = (starts[:, None] - kv[None, :]) <= sliding_window + 1
    return {"full_attention": full[:, None], "sliding_attention": (full & near[None])[:, None]}


def unroll(drafter, embed, hidden, shared_kv, seq: dict, starts: torch.Tensor, k: int,
           sliding_window: int) -> list[torch.Tensor]:
    """The drafter's logits (B, Q, V) at each of `k` steps of rounds starting at `starts`."""
    dtype = drafter.pre_projection.weight.dtype
    kv = {name: (key.to(dtype), value.to(dtype)) for name, (key, value) in shared_kv.items()}
    masks = draft_masks(seq["live"], starts, sliding_window)
    token = seq["input_ids"][:, starts]
    state = hidden[:, starts - 1].to(dtype)
    positions = seq["position_ids"][:, starts]
    ordered = getattr(drafter.config, "use_ordered_embeddings", False)
    steps = []
    for _ in range(k):
        with torch.no_grad():
            embedded = embed(token).to(dtype)
        x = drafter.pre_projection(torch.cat([embedded, state], -1))
        last = drafter.model(inputs_embeds=x, attention_mask=masks, position_ids=positions,
                             shared_kv_states=dict(kv), use_cache=False).last_hidden_state
        logits = drafter.lm_head(last)
        state = drafter.post_projection(last)
        with torch.no_grad():  # what the generator picks: the centroid-masked logits when it has them
            shown = drafter.masked_embedding(last, drafter.lm_head.weight) if ordered else logits
            token = shown.argmax(-1)
        steps.append(logits)
    return steps


def slots_per_prompt(new_tokens: int, k: int) -> int:
    """Draft slots of one continuation: rounds start at each of its tokens but the last, and step
    s of a round starting j tokens before the end exists while s < j."""
    return sum(min(k, new_tokens - 1 - q) for q in range(new_tokens - 1))


def distill_loss(steps: list[torch.Tensor], seq: dict, starts: torch.Tensor, target_logp: torch.Tensor,
                 loss: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed loss over the live draft slots, and summed metrics: `drafter/token_acc` (drafts equal
    to the target's greedy token) and `drafter/acceptance` (drafts a greedy verifier accepts:
    each step counts only after all earlier ones of its round were right)."""
    ids, live, p = seq["input_ids"], seq["live"], seq["prompt_len"]
    total = torch.zeros((), device=ids.device)
    correct = torch.zeros((), device=ids.device)
    accepted = torch.zeros((), device=ids.device)
    still = torch.ones(ids.shape[0], len(starts), dtype=torch.bool, device=ids.device)
    for s, logits in enumerate(steps, start=1):
        at = starts + s                                     # the token step s predicts
        ok = at < ids.shape[1]
        at = at.clamp(max=ids.shape[1] - 1)
        valid = live[:, at] & live[:, starts] & ok[None]    # (B, Q)
        want = ids[:, at]
        logq = logits.float().log_softmax(-1)
        if loss == "ce":
            per = -logq.gather(-1, want[..., None])[..., 0]
        else:  # forward KL(target || drafter) on the target's distribution at that position
            logp = target_logp[:, at - p]
            per = (logp.exp() * (logp - logq)).nan_to_num().sum(-1)  # exp(-inf) * -inf = nan, → 0
        total = total + (per * valid).sum()
        hit = (logits.detach().argmax(-1) == want) & valid
        still = still & hit
        correct = correct + hit.sum()
        accepted = accepted + still.sum()
    return total, {"drafter/token_acc": correct, "drafter/acceptance": accepted}


def starts_of(seq: dict) -> torch.Tensor:
    """Round starts: every continuation token but the last (the first is the target's answer to
    the prompt, drafted from the prompt's last hidden state)."""
    return torch.arange(seq["prompt_len"], seq["input_ids"].shape[1] - 1, device=seq["input_ids"].device)
