"""Peak GPU memory of one training step: arithmetic over the skeleton and the recipe.

Pure arithmetic (no torch), so the planner can re-plan a dozen variants in milliseconds.

What is modelled, and why each term looks the way it does (code paths of transformers 5.24
gemma4_unified, PEFT 0.21, bitsandbytes 0.50 and `finetune.training`/`finetune.objectives.losses`):

- **Frozen weights.** bitsandbytes quantizes every `nn.Linear` except the tied `lm_head`
  (what `finetune.model.load.load_base` asks for; the vision and audio projections are quantized).
  NF4 = 4 bits/weight plus a fp32 absmax per 64-block; double quant stores that absmax as
  uint8 plus a fp32 absmax per 256 blocks and a 256-entry code table per tensor. int8 = 1
  byte/weight plus a fp32 scale per output row. Everything else (embeddings, norms, the
  vision position table, biases) stays in the compute dtype. While a matmul runs, bnb
  dequantizes one whole weight to the compute dtype (one buffer of the largest).
- **LoRA**: adapter and grads in fp32 (`attach_lora` upcasts them); AdamW 2 fp32 states, bnb
  8-bit AdamW 2 uint8 states plus a fp32 absmax per 256 (tensors under 4096 values keep
  32-bit states, as bnb does). Paged optimizers are counted like the non-paged ones: their
  pages sit on the GPU while the step runs (outside torch's allocator counters).
- **Batch inputs**: the trainer moves all `grad_accum` micro-batches to the GPU up front;
  with packing each carries its own boolean masks (layer types × batch × seq²).
- **Activations** under gradient checkpointing: every decoder layer keeps its input
  (tokens × hidden × 2 bytes; four of them when offloaded to pinned host memory), plus one
  layer's recompute saved for backward and the backward's short-lived gradients; with
  `train.mlp_tile_tokens` the MLP's share of those for one tile only. The CE chunks run
  before the decoder's backward, so the peak holds one or the other, never both.
  `MatMul4Bit` saves *no* input (the weight is frozen); PEFT casts each LoRA input to fp32
  (no autocast) and `lora_A` saves that copy; RMSNorm saves its fp32 upcast; q/k/v after
  norm and RoPE are saved by sdpa with k/v already repeated to all heads (transformers
  repeats kv whenever a mask is passed); sdpa's memory-efficient kernel keeps no seq²
  scores, but the boolean masks (one per layer type) live through the step and each layer's
  sdpa call holds a float copy. `train.attention` changes that part (finetune.model.attention):
  `sdpa_gqa` keeps k/v and their grads at their own width; `blocked` also saves no attention
  output, log-sum-exp or float mask (each block is recomputed), never builds the whole mask
  (lazy masks: one block's rows at a time) and holds one block's folded mask, scores workspace
  and q/k/v grads in its backward.
- **Loss**: chunked CE (recomputed per chunk) holds one chunk's soft-capped fp32 logits,
  fp32 log-softmax and two fp32 grads in flight (16 bytes per logit); unchunked holds the
  same for every token.
- **Preference objectives** (`finetune.objectives.preference`, `kto`): a sample is two rows
  (chosen and rejected answers after the same prompt, media in both), so every per-token and
  per-media term counts 2 × batch_size rows; their log-probs are always chunked. DPO and KTO
  first run the reference (and KTO's KL rows) without grad: a phase of its own, smaller than
  the decoder's backward.
- **Outside tensors**: the CUDA context (~0.75 GiB, invisible to torch's counters but taken
  from the card), cuBLAS workspace, and a caching-allocator slack for fragmentation.

The sequence is taken at its worst: every row filled to `data.max_seq_len` (media tokens
are inside that length), one image at `data.image_tokens` and one clip of
`data.max_audio_seconds` per sample unless every dataset is plain text.

Calibrated against the 12B measured on an H200 (`benchmarks/gpu_memory.py`, results in
`benchmarks/results/`): see the README's table for plan vs measurement.
"""

from __future__ import annotations

import math
import re

from finetune.model.families import family_for
from finetune.objectives.losses import ce_chunk_rows
from finetune.plan.skeleton import Layer, Skeleton

GIB = 2**30
# ---- constants, each with its reason ----------------------------------------------------
NF4_BLOCK = 64            # bnb 4-bit blocksize: one absmax per 64 weights
DQ_BLOCK = 256            # double quant: one fp32 absmax per 256 uint8 absmax values
DQ_CODE_BYTES = 256 * 4   # double quant keeps a 256-entry fp32 code table per tensor
NF4_CODE_BYTES = 16 * 4   # the 16 NF4 levels, fp32, per tensor
LORA_BYTES = 4            # adapters and their grads are fp32 (PEFT upcasts them)
NORM_BYTES = 4            # RMSNorm upcasts to fp32 and saves that copy for backward
ADAM8_BLOCK = 256         # bnb 8-bit optimizers: one fp32 absmax per 256 state values
ADAM8_MIN_SIZE = 4096     # bnb keeps 32-bit states for tensors smaller than this
AUDIO_TOKENS_PER_S = 25   # 640 samples per token at 16 kHz = 40 ms
# Calibrated on an H200 (torch 2.11, CUDA 13; benchmarks/results/gpu_memory.json): the card's
# used memory minus torch's reserved pool was 0.753-0.764 GiB in three runs, and reserved over
# allocated 1.074-1.094.
CUDA_CONTEXT_GIB = 0.75   # driver context + torch/bnb kernels (lazy loading); not in torch's counters
CUBLAS_WORKSPACE_GIB = 1 / 32  # 32 MiB: cuBLAS(Lt) workspace on sm90 (4 MiB on older cards)
ALLOCATOR_SLACK = 0.08    # reserved/allocated overhead of the caching allocator (round-up, splits)
OFFLOAD_RESIDENT_INPUTS = 4  # offloaded layer inputs still on the GPU (in flight, in use)



def _objective_shape(name: str) -> tuple[int, bool]:
    """(sequences per sample, whether a reference pass runs) as the objective declares them:
    preference objectives train on chosen + rejected rows (`rows_per_sample`), DPO and KTO also
    score them under the reference (`uses_reference`). Preference log-probs are always chunked."""
    from finetune.objectives import get

    cls = get(name)
    return cls.rows_per_sample, cls.uses_reference


def _dtype_bytes(recipe, device: str) -> int:
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return 4 if dtype == "fp32" else 2


def quant_tensor_bytes(n: int, out: int, quantization: str, double_quant: bool, ab: int) -> tuple[int, int]:
    """(the weight's own bytes, its quantization metadata: absmax, code tables, scales) as
    bitsandbytes stores one linear weight of `n` values and `out` rows. Only the first is a
    parameter (what FSDP shards); the metadata stays whole with its module."""
    if quantization == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        meta = NF4_CODE_BYTES + (blocks + 4 * math.ceil(blocks / DQ_BLOCK) + DQ_CODE_BYTES + 4 if double_quant
                                 else 4 * blocks)
        return math.ceil(n / 2), meta
    if quantization == "int8":
        return n, 4 * out  # int8 weight + fp32 row scale (SCB)
    return n * ab, 0


def _quant_bytes(sk: Skeleton, quantization: str, double_quant: bool, ab: int) -> int:
    """Bytes of the quantizable linear weights as bitsandbytes stores them."""
    return sum(sum(quant_tensor_bytes(n, out, quantization, double_quant, ab)) for _, n, out in sk.quant_tensors)


def _lora(sk: Skeleton, recipe) -> tuple[list[tuple[str, int, int]], set[str]]:
    """The modules PEFT would wrap (full-match of the target regex) and their shapes."""
    from finetune.model.lora import target_regex

    key = tuple(recipe.lora.targets)
    if key in sk.lora_hits:  # suggestions re-plan many variants of one recipe
        return sk.lora_hits[key]
    family = family_for(sk.model_type)
    if family is None:  # unknown family: only regexes can target anything
        regex = "(" + "|".join(t if t.startswith(".*") else f".*{t}" for t in recipe.lora.targets) + ")"
    else:
        regex = target_regex(recipe.lora.targets, family)
    pattern = re.compile(regex)
    hits = [(n, i, o) for n, i, o in sk.lora_candidates if pattern.fullmatch(n)]
    sk.lora_hits[key] = hits, {n for n, _, _ in hits}
    return sk.lora_hits[key]


def _optimizer_bytes(shapes: list[tuple[int, int]], optimizer: str) -> int:
    total = 0
    for numel in (a for pair in shapes for a in pair):
        if "8bit" in optimizer and numel >= ADAM8_MIN_SIZE:
            total += 2 * numel + 2 * 4 * math.ceil(numel / ADAM8_BLOCK)
        else:
            total += 8 * numel
    return total


def mask_bytes(sk: Skeleton, attention: str, rows: int, S: int) -> int:
    """The 4-D boolean masks of one forward: (rows, 1, S, S) per layer type, True = attend; none
    under `blocked`, whose masks are built one query block at a time (data_tools.masks), inside
    the block's recompute (counted with the block in `_attention_backward`)."""
    return 0 if attention == "blocked" else sk.layer_types * rows * S * S


def _layer_saved(L: Layer, hid: int, targeted: set[str], r: int, ab: int, lb: int,
                 dropout: bool, attention: str = "sdpa", tiled: bool = False) -> tuple[int, int]:
    """Bytes per token one decoder layer keeps for its backward: (attention side, MLP side).

    The MLP side is what `train.mlp_tile_tokens` holds for one tile instead of the sequence.
    `tiled` (`train.tile_attention`): the q/k/v/o projections, their norms, RoPE and LoRA copies
    live inside tiles' recomputes; what stays is k and v, the attention input the tiles read
    and the four layer norms' upcasts."""
    Dq, Dk, inter = L.q_out, L.k_out, L.inter
    repeated = L.kv_heads < L.heads and attention == "sdpa"
    kv_saved = ab * (Dq if repeated else Dk)  # stock sdpa saves k and v after repeat_kv
    # blocked: the block outputs and their log-sum-exp are recomputed, not kept
    sdpa_out = 0 if attention == "blocked" else ab * Dq + 4 * L.heads
    attn = (4 * NORM_BYTES * hid                # the layer's 4 RMSNorms keep their fp32 upcast (the two
                                                # around the MLP sit outside it: never tiled)
            + NORM_BYTES * Dq + ab * Dq         # q_norm upcast; q after RoPE (sdpa input)
            + 2 * (NORM_BYTES * Dk + kv_saved)  # k_norm / v_norm upcasts; k, v for sdpa
            + sdpa_out)                         # attention output (= o_proj input), fp32 logsumexp
    mlp = 3 * ab * inter                        # gate out (gelu input), gelu out, up out
    ins = {"q_proj": hid, "k_proj": hid, "v_proj": hid, "o_proj": Dq,
           "gate_proj": hid, "up_proj": hid, "down_proj": inter}
    shared_groups: set[str] = set()
    for name, width in ins.items():
        in_mlp = name.endswith(("gate_proj", "up_proj", "down_proj"))
        full = f"{L.prefix}.{'mlp' if in_mlp else 'self_attn'}.{name}"
        if full not in targeted or (name == "v_proj" and not L.has_v):
            continue
        extra = lb * r  # lora_A output, saved by lora_B
        if dropout:
            extra += width * (lb + 1)  # dropout output (saved by lora_A) + its bool mask
        elif lb != ab:
            extra += lb * width        # each module casts its own fp32 copy of the input
        else:
            # same dtype: lora_A saves the shared input itself, once per input tensor;
            # o_proj's input (attention output) and nothing else is already saved.
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp_in",
                     "up_proj": "mlp_in", "down_proj": "mlp_mid", "o_proj": "attn_out"}[name]
            if group not in shared_groups and group != "attn_out":
                shared_groups.add(group)
                extra += ab * width
        if in_mlp:
            mlp += extra
        else:
            attn += extra
    if tiled:
        attn = 4 * NORM_BYTES * hid + ab * hid + 2 * ab * Dk
    return attn, mlp


def _attention_backward(L: Layer, t, B: int, S: int, ab: int, H: int) -> int:
    """Bytes one layer's attention backward holds at its top, by `train.attention`."""
    T, Dq, Dk = B * S, L.q_out, L.k_out
    if t.attention == "sdpa":  # fp32 grad-of-q workspace; q, k, v grads with k/v repeated to all heads
        return T * (NORM_BYTES * Dq + 3 * ab * Dq)
    if t.attention == "sdpa_gqa":  # the same with k/v grads at their own width
        return T * (NORM_BYTES * Dq + ab * Dq + 2 * ab * Dk)
    # blocked: the q grads of every block and their concatenation, the k/v grad accumulators and a
    # block's sliced k/v grad at full length; one block's folded mask (boolean + its float copy,
    # against at most every key), fp32 grad-of-q workspace, q fold, output and q grad
    g = max(1, L.heads // max(L.kv_heads, 1))
    C = min(S, max(1, t.attention_block_rows // g))
    block = B * g * C * S * (1 + ab) + B * L.heads * C * L.head_dim * (NORM_BYTES + 3 * ab)
    if not t.tile_attention:
        return T * (2 * ab * Dq + 4 * ab * Dk) + block
    # tiled: the attention input's grad (accumulated over blocks, and the blocks' outputs' grad)
    # instead of q's; one query block's projections recomputed (q LoRA input copy, q norm upcast
    # and q, o LoRA input copy) and one k/v tile's (LoRA input copies, norm upcasts, k and v)
    lb = LORA_BYTES
    tile = min(S, t.attention_block_rows)
    return (T * (2 * ab * H + 4 * ab * Dk) + block + B * C * (lb * H + (NORM_BYTES + ab + lb) * Dq)
            + B * tile * (2 * lb * H + 2 * (NORM_BYTES + ab) * Dk))


def estimate(recipe, sk: Skeleton, device: str) -> dict:
    """Bytes per item for one micro-batch step; pure arithmetic."""
    ab = _dtype_bytes(recipe, device)
    lb = LORA_BYTES
    t, d, q = recipe.train, recipe.data, recipe.model
    rows, reference = _objective_shape(t.objective)
    # Rows per micro-batch: a preference pair is two (chosen, rejected), each with the prompt's media.
    B, S = t.batch_size * rows, d.max_seq_len
    T = B * S  # worst case: every row filled to max_seq_len (media tokens are inside it)
    H = sk.hidden

    hits, targeted = _lora(sk, recipe)
    r = recipe.lora.r
    shapes = [(r * i, r * o) for _, i, o in hits]  # (A, B) numels
    lora_params = sum(a + b for a, b in shapes)

    items: dict[str, float] = {}
    items["linear_weights"] = _quant_bytes(sk, q.quantization, q.double_quant, ab)
    items["unquantized_weights"] = (sk.embeddings + sk.linear_kept + sk.other) * ab
    items["lora_weights"] = lora_params * lb
    items["lora_grads"] = lora_params * lb
    items["optimizer_states"] = _optimizer_bytes(shapes, t.optimizer)
    if device == "cuda":
        items["cublas_workspace"] = CUBLAS_WORKSPACE_GIB * GIB
    if q.quantization != "none":
        # bnb dequantizes a whole weight to the compute dtype for matmuls with > 1536 rows
        # (training always) and again in backward: one buffer of the largest weight.
        items["dequant_buffer"] = sk.largest_quant * ab

    # Worst case per sample: one image at its budget and one clip of the longest allowed
    # duration, unless every dataset is plain text (the only format that cannot carry media).
    media = not all(ds.format == "text" for ds in recipe.datasets)
    img_tok = d.image_tokens if sk.patch_dim and media else 0
    aud_tok = int(d.max_audio_seconds * AUDIO_TOKENS_PER_S) if sk.audio_dim and media else 0
    img_tok, aud_tok = min(img_tok, S), min(aud_tok, max(S - img_tok, 0))
    masks = mask_bytes(sk, t.attention, B, S)

    # finetune.train moves all `grad_accum` micro-batches to the GPU before the first forward:
    # ids/labels/types/mask or positions (int64), media in the compute dtype, and with packing
    # each micro-batch's own 4-D masks (the one in flight is counted under attention_masks).
    items["batch_inputs"] = t.grad_accum * (4 * 8 * T + B * (
        img_tok * (sk.patch_dim * ab + 2 * 8) + aud_tok * (sk.audio_dim * ab + 1)))
    if t.packing:
        items["batch_inputs"] += (t.grad_accum - 1) * masks

    # --- activations of forward + backward --------------------------------------------
    # Three kinds: what lives through the whole forward and backward (`persistent`), the loss
    # phase (CE chunks, after the decoder's forward) and the decoder's backward (one layer
    # recomputed at a time). The loss and the decoder backward never overlap: the step's peak
    # is persistent + the larger of the two. (Summing them overstated the 12B's peak by the
    # whole CE term, ~1.1 GiB, on the H200: benchmarks/results/gpu_memory.json.)
    dropout = recipe.lora.dropout > 0
    offload = t.offload_activations and device == "cuda"  # saved tensors go to pinned host memory
    persistent: dict[str, float] = {}
    backward: dict[str, float] = {}
    # Built once per forward (or passed in when packed); checkpointed layers keep them as inputs.
    persistent["attention_masks"] = masks
    layers = sk.layers
    tile = t.mlp_tile_tokens if 0 < t.mlp_tile_tokens < S else 0
    if layers:
        sides = [_layer_saved(L, H, targeted, r, ab, lb, dropout, t.attention, t.tile_attention) for L in layers]
        inter = max(L.inter for L in layers)
        down_lora = any(f"{L.prefix}.mlp.down_proj" in targeted for L in layers)
        # Tiled: one tile's MLP intermediates, plus the whole MLP input the tiles recompute from.
        mlp_tokens = B * tile if tile else T
        float_mask = 0 if t.attention == "blocked" else ab * B * S * S  # each sdpa call's float copy
        saved = [a * T + m * mlp_tokens + (ab * H * T if tile else 0) + float_mask for a, m in sides]
        # Short-lived in a layer's backward, whichever part runs it to the top: the MLP's (grads of
        # down input, gelu out, gate/up outs and the fp32 grad of down's LoRA input; one tile's
        # when tiled) or attention's (`_attention_backward`: with stock sdpa the fp32 grad-of-q
        # workspace and q/k/v grads, k/v repeated to every head: 8192 wide on the 12B's full
        # layers). Plus the hidden-state grad
        # pair between layers. (Measured: with 1k MLP tiles at 16k the attention part is the
        # larger, 1.4 GiB on the H200.)
        mlp_back = mlp_tokens * (3 * ab * inter + (lb * inter if down_lora else 0))
        attn_back = max(_attention_backward(L, t, B, S, ab, H) for L in layers)
        transient = max(mlp_back, attn_back) + T * 2 * ab * H
        if t.gradient_checkpointing:
            # offloaded: the inputs in flight to and from host memory (4 measured at 16k on an H200)
            # (+1 with prefetch: the next layer's input comes back while this one recomputes)
            resident = OFFLOAD_RESIDENT_INPUTS + (1 if t.offload_prefetch else 0)
            persistent["checkpointed_inputs"] = (resident if offload else len(layers)) * T * H * ab
            backward["layer_recompute"] = max(saved)  # recomputed in backward, outside the offload hooks
        else:
            persistent["saved_activations"] = 2 * max(saved) if offload else sum(saved)
        backward["backward_transients"] = transient
    # final norm (fp32 upcast + output) and the embedding output that starts the stack
    persistent["embeddings_and_final_norm"] = T * H * (NORM_BYTES + 2 * ab)
    vision_lora = lb if any(".embed_vision." in n for n in targeted) else 0
    audio_lora = lb if any(".embed_audio." in n for n in targeted) else 0
    # raw patch → LayerNorm → Dense (+ fp32 LoRA input) → 3 LayerNorms/RMSNorm upcasts → Dense
    persistent["media_embedders"] = B * (
        img_tok * (sk.patch_dim * (ab + vision_lora) + sk.mm_dim * (6 * 4 + vision_lora))
        + aud_tok * sk.audio_dim * (NORM_BYTES + audio_lora))
    # Per logit, the backward of a chunk (finetune.objectives.losses recomputes each chunk) holds the
    # soft-capped fp32 logits (tanh output), the fp32 log-softmax and two fp32 grads in flight;
    # the unchunked path holds the same in bf16 logits + fp32 copies for every token.
    chunked = t.chunked_ce or rows > 1  # preference log-probs have no unchunked path
    rows_ce = min(t.ce_chunk_size or ce_chunk_rows(sk.vocab), T) if chunked else T
    per_logit = 16 if sk.softcap else 12
    # + the label positions' hidden states gathered for the chunks and their grad (T × H each)
    loss = {"logits_and_loss": rows_ce * sk.vocab * per_logit + 2 * T * H * ab}

    # The optimizer step runs after backward freed the activations: the peak is the larger.
    step = 4 * lora_params if t.optimizer in ("adamw", "paged_adamw") else 0  # foreach sqrt temp
    phases = {"decoder backward": backward, "loss": loss}
    if reference:
        # The reference pass runs first, without grad: no layer keeps anything, so it holds the
        # hidden-state pair, one MLP's intermediates and one logits chunk at a time.
        phases["reference forward"] = {"reference_forward": T * (2 * ab * H + 3 * ab * max(
            (L.inter for L in layers), default=0)) + rows_ce * sk.vocab * 8}
    name, worst = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    act = persistent | worst
    phase = name if sum(act.values()) >= step else "optimizer step"
    items.update(act if phase != "optimizer step" else {"optimizer_step_temporaries": step})
    allocated = sum(items.values())
    if device == "cuda":
        items["allocator_slack"] = ALLOCATOR_SLACK * allocated
        items["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return {"items": items, "allocated": allocated, "phase": phase, "tokens": T, "rows_per_sample": rows,
            "lora_params": lora_params, "lora_modules": len(hits), "media": (img_tok, aud_tok),
            "compute_bytes": ab}
