"""`tile_attention` (`train.tile_attention`, with `train.attention: blocked`): each decoder
layer's attention runs over the sequence in tiles, each under its own recompute.

Under gradient checkpointing a layer's backward first recomputes its forward and keeps what that
forward saves: on the 12B at 32k tokens the attention side alone is 5.5 GiB (q after its norm and
RoPE with the norm's fp32 upcast, k and v likewise, the fp32 copy of each projection's input that
PEFT's LoRA makes and keeps, the o-projection's). Only the attention scores mix tokens; the rest
is per token. So:

- k and v are computed in tiles of `tokens`, each recomputed in backward: what stays is k and v
  themselves (what every query block reads), not their projections' inputs, norms or LoRA copies;
- each query block of the `blocked` attention also runs its q projection, norm and RoPE before
  and the o-projection after inside the block's own recompute, so nothing of the query side stays
  but the block in flight.

The loss and gradients equal the untiled layer (tests/model/test_tiled_attention.py, float64).
Decoding against a cache, a no-grad pass, or a sequence within one tile runs the stock forward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from finetune.model.attention import BLOCKED, DEFAULT_BLOCK_ROWS, _folded_block, _key_spans
from finetune.model.memory_tricks import TokenTiles, matching, unwrap_wrappers, wrap_named


def _rope():
    from transformers.models.gemma4_unified.modeling_gemma4_unified import apply_rotary_pos_emb

    return apply_rotary_pos_emb


class TiledAttention(TokenTiles):
    """A gemma4_unified text attention module over sequence tiles (module doc); like `TiledMLP`,
    every parameter keeps its name."""

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of a tile, (B, T, Hkv, D), as the stock forward makes them."""
        a = self.inner
        shape = (*x.shape[:-1], -1, a.head_dim)
        k = a.k_proj(x).view(shape)
        v = a.v_proj(x).view(shape) if a.v_proj is not None else k
        return _rope()(a.k_norm(k), cos, sin, unsqueeze_dim=2), a.v_norm(v)

    def _query_block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, mask, q0: int, k0: int, causal: bool, dropout: float) -> torch.Tensor:
        """One query block: q projection, norm, RoPE, its attention, o projection → (B, C, hidden)."""
        a = self.inner
        q = a.q_proj(x).view(*x.shape[:-1], -1, a.head_dim)
        q = _rope()(a.q_norm(q), cos, sin, unsqueeze_dim=2).transpose(1, 2)
        out = _folded_block(q, k, v, mask, q0, k0, causal, dropout, a.scaling)
        return a.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, shared_kv_states,
                cache=None, **kwargs):
        a = self.inner
        S = hidden_states.shape[1]
        if (cache is not None or not torch.is_grad_enabled() or S <= self.tokens
                or a.config._attn_implementation != BLOCKED or kwargs.get("position_bias") is not None):
            return a(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                     shared_kv_states=shared_kv_states, cache=cache, **kwargs)
        cos, sin = position_embeddings
        x = hidden_states
        # (a layer that reuses an earlier one's k/v is never wrapped: tile_attention refuses it)
        parts = [checkpoint(self._kv, x[:, i:i + self.tokens], cos[:, i:i + self.tokens],
                            sin[:, i:i + self.tokens], use_reentrant=False) for i in range(0, S, self.tokens)]
        k = torch.cat([p[0] for p in parts], 1).transpose(1, 2)
        v = torch.cat([p[1] for p in parts], 1).transpose(1, 2)
        if a.store_full_length_kv:  # a later, untiled layer reuses this one's k/v
            shared_kv_states[a.layer_type] = k, v
        if attention_mask is not None and attention_mask.shape[-2] == 1 and torch.is_tensor(attention_mask):
            attention_mask = attention_mask.expand(*attention_mask.shape[:-2], S, S)
        causal = a.is_causal
        dropout = a.attention_dropout if self.training else 0.0
        block = max(1, getattr(a, "attention_block_rows", DEFAULT_BLOCK_ROWS) // a.num_key_value_groups)
        outs = []
        for (lo, hi), q0 in zip(_key_spans(attention_mask, S, S, block, causal), range(0, S, block)):
            q1 = min(q0 + block, S)
            outs.append(checkpoint(self._query_block, x[:, q0:q1], cos[:, q0:q1], sin[:, q0:q1], k[:, :, lo:hi],
                                   v[:, :, lo:hi], attention_mask, q0, lo, causal, dropout, use_reentrant=False))
        return torch.cat(outs, 1), None


def tile_attention(model: torch.nn.Module, tokens: int, pattern: str) -> int:
    """Wrap every module whose full name matches `pattern` in a `TiledAttention`; how many were."""
    from finetune.errors import UserError

    matched = matching(model, pattern, TiledAttention)
    if any(getattr(model.get_submodule(n), "is_kv_shared_layer", False) for n in matched):
        # the tiled path's gradients differ from the stock one's beyond float64 rounding there
        # (3e-8 relative on the tiny base's padded rows), so it is not offered
        raise UserError("train.tile_attention", "this base's later layers reuse an earlier layer's k/v "
                        "(num_kv_shared_layers > 0)", "Set train.tile_attention: false")
    return wrap_named(model, matched, lambda m: TiledAttention(m, tokens))


def untile_attention(model: torch.nn.Module) -> int:
    """Undo `tile_attention`: every `TiledAttention` back to the module it wraps; how many were."""
    return unwrap_wrappers(model, TiledAttention)
