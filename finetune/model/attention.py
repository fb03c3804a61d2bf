"""Attention without k/v repeated to every query head: named functions behind `train.attention`.

transformers' sdpa path repeats k and v to all query heads whenever a mask is passed (on the
12B's full layers 1 k/v head → 16: 8192 values a token instead of 512), and each call turns the
whole (seq × seq) boolean mask into a float copy. At 16k tokens that, with the fp32 grad-of-q
workspace of the memory-efficient kernel, is what put the first GPU run at 17.8 GiB. Two
functions, registered through transformers' public `AttentionInterface` (and the sdpa mask
builder through `AttentionMaskInterface`) and chosen with `set_attn_implementation`:

- `sdpa_gqa`: one sdpa call with `enable_gqa=True` (native GQA; no repeat in Python). Whether
  a fused CUDA kernel takes GQA with a mask depends on torch and the head size.
- `blocked`: the queries in blocks; in each block the query heads that share a k/v head are
  folded into the query axis ((heads per k/v head × block) rows against that head's k/v), so k
  and v are never repeated and their gradients stay k/v-sized; the keys are cut to the span the
  block's mask allows (causal: up to the block's end; sliding layers: a window behind it), so no
  block computes scores it then masks away; each block runs under its own recompute, so the
  backward holds one block's folded mask, scores and fp32 workspace at a time. Every block is a
  plain sdpa call (any head size, any mask: the image's bidirectional spans, packed rows).
  Its masks are lazy (`data_tools.masks`): transformers' mask builder gives a `FunctionMask`
  (`lazy_sdpa_mask`) and packed rows a `PackedMask`, and each block's rows are built inside the
  block's recompute, so the (seq × seq) masks (2 GiB at 32k on the 12B) never exist.

The loss and gradients equal the stock path (tests/model/test_attention.py, float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data_tools.masks import LazyMask

STOCK = "sdpa"
GQA = "sdpa_gqa"
BLOCKED = "blocked"
CHOICES = (STOCK, GQA, BLOCKED)
# query rows (block queries × query heads per k/v head) of one block; `train.attention_block_rows`
DEFAULT_BLOCK_ROWS = 4096


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """The mask as booleans, True = may attend (transformers' sdpa masks are already boolean)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _key_spans(mask, q_len: int, k_len: int, block: int, causal: bool) -> list[tuple[int, int]]:
    """[lo, hi) of the keys each query block may attend to (one host sync for all blocks; a lazy
    mask builds one block's rows at a time)."""
    starts = range(0, q_len, block)
    if mask is None:
        return [(0, min(a + block, k_len) if causal else k_len) for a in starts]
    cols = torch.stack([_allowed(mask[:, :, a:a + block, :]).reshape(-1, k_len).any(0) for a in starts]).cpu()
    spans = []
    for row in cols:
        hit = row.nonzero()
        # a block that may attend nothing (all padding) keeps every key, as the stock call does
        spans.append((int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, k_len))
    return spans


def _folded_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full_mask, q0: int, k0: int,
                  causal: bool, dropout: float, scaling: float | None) -> torch.Tensor:
    """sdpa of one query block, the g query heads of each k/v head folded into the query axis.

    q (B, H, C, D): queries q0…; k/v (B, Hkv, K, D): keys k0…; `full_mask` (B, 1|H, S, S), dense
    or lazy, or None: its (C, K) block is cut (or built) here, inside the block's recompute, so
    a lazy mask's blocks exist one at a time → (B, H, C, Dv)."""
    B, H, C, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    g = H // Hkv
    mask = None if full_mask is None else full_mask[:, :, q0:q0 + C, k0:k0 + K]
    qf = q.reshape(B, Hkv, g * C, D)  # head h = kv * g + j (repeat_kv's order); row j * C + i
    if mask is None and causal:  # queries q0 + i, keys k0 + j: attend when key <= query
        qi = torch.arange(q0, q0 + C, device=q.device)
        mask = (torch.arange(k0, k0 + K, device=q.device)[None, :] <= qi[:, None])[None, None]
    if mask is not None:
        mask = _allowed(mask)
        if mask.shape[1] == 1:  # one mask for all heads: repeat it for the g folded heads
            mask = mask[:, :, None].expand(mask.shape[0], 1, g, C, K).reshape(mask.shape[0], 1, g * C, K)
        else:  # a mask per head (not what transformers builds, but kept exact)
            mask = mask.reshape(mask.shape[0], Hkv, g * C, K)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.reshape(B, H, C, v.shape[-1])


def blocked_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, block_rows: int | None = None,
                      **kwargs):
    """`AttentionInterface` function: query blocks, folded GQA, keys cut to each block's span."""
    B, H, S, D = query.shape
    K = key.shape[2]
    if S != K or S == 1 or kwargs.get("position_bias") is not None:
        # decoding against a cache (or a bias this function doesn't carry): the stock function
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if isinstance(attention_mask, LazyMask):
            attention_mask = attention_mask.dense()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.shape[-2] == 1 and not isinstance(attention_mask, LazyMask):
        attention_mask = attention_mask.expand(*attention_mask.shape[:-2], S, K)  # one row for all queries: a view
    g = H // key.shape[1]
    rows = block_rows or getattr(module, "attention_block_rows", DEFAULT_BLOCK_ROWS)
    block = max(1, rows // g)
    spans = _key_spans(attention_mask, S, K, block, causal)
    outs = []
    for (lo, hi), a in zip(spans, range(0, S, block)):
        b = min(a + block, S)
        args = (query[:, :, a:b], key[:, :, lo:hi], value[:, :, lo:hi], attention_mask, a, lo, causal, dropout, scaling)
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            outs.append(checkpoint(_folded_block, *args, use_reentrant=False))
        else:
            outs.append(_folded_block(*args))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None


def gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """`AttentionInterface` function: one sdpa call with native GQA (`enable_gqa=True`)."""
    S, K = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = causal and attention_mask is None and S > 1 and S == K
    if attention_mask is None and S > 1 and S != K:  # prefill against a cache: the stock function
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


class FunctionMask(LazyMask):
    """A mask transformers describes by its mask function, built by block: what
    `lazy_sdpa_mask` returns for the `blocked` attention instead of the (batch, 1, q, k) tensor.
    Each block is transformers' own `sdpa_mask` of that block (its offsets, its function)."""

    def __init__(self, fn, batch: int, q_len: int, kv_len: int, q_offset: int, kv_offset: int,
                 use_vmap: bool, device):
        self.fn, self.use_vmap, self.device = fn, use_vmap, torch.device(device)
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.shape = (batch, 1, q_len, kv_len)

    def to(self, device) -> FunctionMask:
        return self  # built where the queries are; nothing to move

    def block(self, rows: slice, q: slice, k: slice) -> torch.Tensor:
        from transformers.masking_utils import sdpa_mask

        qs, ks = range(self.shape[2])[q], range(self.shape[3])[k]
        if qs.step != 1 or ks.step != 1:
            raise TypeError("a lazy mask builds contiguous blocks only")
        m = sdpa_mask(batch_size=self.shape[0], q_length=len(qs), kv_length=len(ks),
                      q_offset=self.q_offset + qs.start, kv_offset=self.kv_offset + ks.start,
                      mask_function=self.fn, allow_is_causal_skip=False, use_vmap=self.use_vmap,
                      device=self.device)
        return m[rows]


def lazy_sdpa_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: torch.Tensor | None = None, allow_is_causal_skip: bool = True,
                   use_vmap: bool = False, device="cpu", **kwargs):
    """`AttentionMaskInterface` builder for `blocked`: transformers' `sdpa_mask` arguments, a
    `FunctionMask` back (None for plain causal without padding, as `sdpa_mask` gives). Decoding
    and prefill against a cache (q ≠ kv) get the dense mask: the stock function runs those."""
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        padding_mask_function,
        prepare_padding_mask,
        sdpa_mask,
    )

    mask_function = mask_function or causal_mask_function
    if q_length != kv_length or q_length == 1:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, device=device, **kwargs)
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None and bool(padding.all()):
        padding = None
    if allow_is_causal_skip and padding is None and mask_function is causal_mask_function and q_offset == kv_offset:
        return None
    if padding is not None:
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    return FunctionMask(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap, device)


def register() -> None:
    """Make `sdpa_gqa` and `blocked` known to transformers (idempotent): the attention functions
    and their mask builders (transformers' own sdpa one for `sdpa_gqa`; `lazy_sdpa_mask` for
    `blocked`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA, gqa_attention)
    AttentionInterface.register(BLOCKED, blocked_attention)
    AttentionMaskInterface.register(GQA, sdpa_mask)
    AttentionMaskInterface.register(BLOCKED, lazy_sdpa_mask)


def set_attention(model: torch.nn.Module, name: str, block_rows: int = DEFAULT_BLOCK_ROWS) -> str:
    """Switch the language model's attention to `name` (`train.attention`); the vision and audio
    towers keep sdpa. Returns the implementation the text config had before (to switch back)."""
    if name not in CHOICES:
        raise ValueError(f"unknown attention {name!r}: one of {CHOICES}")
    register()
    base = _pretrained(model)
    text = base.config.get_text_config()
    before = text._attn_implementation
    for m in base.modules():  # read by blocked_attention from the module it is called with
        if getattr(m, "config", None) is text and hasattr(m, "num_key_value_groups"):
            m.attention_block_rows = block_rows
    key = next((k for k in base.config.sub_configs if getattr(base.config, k) is text), None)
    base.set_attn_implementation({key: name} if key else name)
    return before


def _pretrained(model: torch.nn.Module):
    """The transformers model under PEFT / wrappers (the first module with `set_attn_implementation`)."""
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and hasattr(m, "config"):
            return m
    raise ValueError("no transformers model inside")
