"""Loss over label positions only, with Gemma's final-logit soft-cap.

`chunked_ce_sum` never materialises full-vocabulary logits for the whole sequence: it selects
the positions that carry a label, then projects + soft-caps + cross-entropies them in chunks,
each chunk recomputed in backward (so only one chunk's logits exist at a time). On the 12B
(vocab 262,144) that is the difference between 21.5 GB and ~0.5 GB at 8k tokens.

Both paths return a *sum* over label tokens; the trainer divides by the number of label
tokens in the whole accumulation window (token-weighted loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_tools.render import IGNORE

CE_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (and their grads) stay near this size
CE_BYTES_PER_LOGIT = 16  # in a chunk's backward: soft-capped fp32 logits, fp32 log-softmax, two fp32 grads


def ce_chunk_rows(vocab: int, budget_bytes: int = CE_CHUNK_BYTES) -> int:
    """Label positions per chunk so one chunk's logits stay within `budget_bytes`: 64 at the
    12B's 262,144-token vocabulary, the whole sequence at a tiny one."""
    return max(1, budget_bytes // (vocab * CE_BYTES_PER_LOGIT))


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: half-precision logits are widened, float64 (equivalence tests) is kept."""
    return x if x.dtype == torch.float64 else x.float()


def _softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                cap: float | None) -> torch.Tensor:
    logits = _softcap(_wide(F.linear(hidden, weight)), cap)
    return F.cross_entropy(logits, targets, reduction="sum")


def shifted_targets(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, h) hidden states whose next token is a label, and those k labels."""
    h = hidden[:, :-1]
    t = labels[:, 1:].to(hidden.device)
    keep = t != IGNORE
    return h[keep], t[keep]


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor,
                   cap: float | None, chunk_size: int | None = None) -> torch.Tensor:
    """Summed CE over label positions, `chunk_size` positions at a time (None: `ce_chunk_rows`)."""
    h, t = shifted_targets(hidden, labels)
    # An empty sum still hangs off the graph: a window without labels backpropagates zeros.
    total = _wide(h[:0].sum())
    for piece in _by_chunk(_chunk_loss, h, t, lm_weight, cap, chunk_size):
        total = total + piece
    return total


def _by_chunk(fn, h: torch.Tensor, t: torch.Tensor, lm_weight: torch.Tensor, cap: float | None,
              chunk_size: int | None):
    """`fn(hidden, weight, targets, cap)` over `chunk_size` label positions at a time (None:
    `ce_chunk_rows`), each chunk recomputed in backward so one chunk's logits exist at a time."""
    chunk_size = chunk_size or ce_chunk_rows(lm_weight.shape[0])
    for start in range(0, len(t), chunk_size):
        hs, ts = h[start:start + chunk_size], t[start:start + chunk_size]
        if torch.is_grad_enabled():
            yield checkpoint(fn, hs, lm_weight, ts, cap, use_reentrant=False)
        else:
            yield fn(hs, lm_weight, ts, cap)


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 cap: float | None) -> torch.Tensor:
    logits = _softcap(_wide(F.linear(hidden, weight)), cap)
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_weight: torch.Tensor,
                  cap: float | None, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's label tokens, their count per row), fp32, (rows,).

    The preference objectives' path: like `chunked_ce_sum`, only label positions are projected,
    `chunk_size` at a time and recomputed in backward, so one chunk's logits exist at a time."""
    rows = labels.shape[0]
    keep = labels[:, 1:].to(hidden.device) != IGNORE
    row_of = keep.nonzero()[:, 0]  # the row of each selected position, in `shifted_targets` order
    h, t = shifted_targets(hidden, labels)
    pieces = [_wide(h[:0].sum(-1))]  # keeps an empty selection on the graph
    pieces += _by_chunk(_chunk_logps, h, t, lm_weight, cap, chunk_size)
    per_token = torch.cat(pieces)
    sums = per_token.new_zeros(rows).index_add(0, row_of, per_token)
    return sums, keep.sum(1).to(sums.dtype)


def full_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference path: logits for every position (already soft-capped by the model)."""
    lg = _wide(logits[:, :-1])
    t = labels[:, 1:].to(logits.device)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
