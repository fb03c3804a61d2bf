"""`finetune plan`: predict the peak GPU memory of a recipe before downloading anything.

The model is built as a skeleton on the meta device (no weights, ~0.2 s for the 12B) from a
local `config.json`, the bundled config of a known base (`finetune/configs/`), or the hub's
config. Every figure below is then arithmetic over that skeleton and the recipe, so the
suggestions can re-plan a dozen variants in milliseconds.

What is modelled, and why each term looks the way it does (code paths of transformers 5.24
gemma4_unified, PEFT 0.21, bitsandbytes 0.50 and `finetune.train`/`finetune.losses`):

- **Frozen weights.** bitsandbytes quantizes every `nn.Linear` except the tied `lm_head`
  (what `finetune.model.load_base` asks for; the vision and audio projections are quantized).
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
  (tokens × hidden × 2 bytes; two of them when offloaded to pinned host memory), plus one
  layer's recompute saved for backward and the backward's short-lived gradients.
  `MatMul4Bit` saves *no* input (the weight is frozen); PEFT casts each LoRA input to fp32
  (no autocast) and `lora_A` saves that copy; RMSNorm saves its fp32 upcast; q/k/v after
  norm and RoPE are saved by sdpa with k/v already repeated to all heads (transformers
  repeats kv whenever a mask is passed); sdpa's memory-efficient kernel keeps no seq²
  scores, but the boolean masks (one per layer type) live through the step and each layer's
  sdpa call holds a float copy.
- **Loss**: chunked CE (recomputed per chunk) holds one chunk's soft-capped fp32 logits,
  fp32 log-softmax and two fp32 grads in flight (16 bytes per logit); unchunked holds the
  same for every token.
- **Outside tensors**: the CUDA context (~0.5 GiB, invisible to torch's counters but taken
  from the card), cuBLAS workspace, and a caching-allocator slack for fragmentation.

The sequence is taken at its worst: every row filled to `data.max_seq_len` (media tokens
are inside that length), one image at `data.image_tokens` and one clip of
`data.max_audio_seconds` per sample unless every dataset is plain text.

Not calibrated on a GPU yet: `benchmarks/gpu_memory.py` measures the 12B and writes the
ratios next to these predictions. Treat ±15 % as the honest error bar until then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.locations import looks_like_hub_id
from finetune.errors import UserError
from finetune.families import Family, family_for

GIB = 2**30
CONFIG_DIR = Path(__file__).parent / "configs"
# Hub ids whose config ships with finetune (lower-cased): the pretrained and instruction-tuned
# 12B share one architecture, so both plan offline.
BUNDLED = {
    "google/gemma-4-12b-it": "gemma-4-12b.json",
    "google/gemma-4-12b": "gemma-4-12b.json",
    "gemma-4-12b-it": "gemma-4-12b.json",
    "gemma-4-12b": "gemma-4-12b.json",
}

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
CUDA_CONTEXT_GIB = 0.5    # driver context + torch/bnb kernels (lazy loading); not in torch's counters
CUBLAS_WORKSPACE_GIB = 1 / 32  # 32 MiB: cuBLAS(Lt) workspace on sm90 (4 MiB on older cards)
ALLOCATOR_SLACK = 0.05    # reserved/allocated overhead of the caching allocator (round-up, splits)
OPT_MIN_SAVING_GIB = 0.005  # a suggestion must save at least this much to be shown


# ---- the skeleton -----------------------------------------------------------------------


@dataclass
class Layer:
    """One decoder layer's projection shapes and full module names (for LoRA matching)."""

    prefix: str
    q_out: int
    k_out: int
    has_v: bool
    heads: int
    head_dim: int
    kv_heads: int
    inter: int


@dataclass
class Skeleton:
    model_type: str
    source: str
    total: int = 0
    embeddings: int = 0
    quantizable: int = 0          # nn.Linear weights bitsandbytes would quantize
    linear_kept: int = 0          # nn.Linear weights it leaves alone (not counted as embedding)
    other: int = 0                # norms, position tables, biases, scalars
    # (name, numel, out_features) of every quantizable weight, for per-tensor overheads
    quant_tensors: list[tuple[str, int, int]] = field(default_factory=list)
    # (name, in, out) of every module PEFT could wrap (Linear and Embedding)
    lora_candidates: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    hidden: int = 0
    vocab: int = 0
    softcap: bool = False
    layer_types: int = 1          # distinct attention masks (full, sliding)
    patch_dim: int = 0            # raw values per image soft token
    mm_dim: int = 0
    audio_dim: int = 0            # raw values per audio soft token
    largest_quant: int = 0        # numel of the biggest quantized weight (dequant buffer)
    lora_hits: dict = field(default_factory=dict, repr=False)  # memo: targets -> matched modules


def load_config(model):
    """The transformers config for `recipe.model`, offline where possible."""
    from transformers import AutoConfig

    base = model.base
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError("model.base", f"{path} has no config.json",
                            "Point model.base at a model folder (one with config.json)")
        try:
            return AutoConfig.from_pretrained(str(path), trust_remote_code=model.trust_remote_code), \
                str(path / "config.json")
        except (ValueError, OSError, KeyError) as e:
            raise UserError("model.base", f"cannot read {path / 'config.json'} ({e})",
                            "Check that it is a transformers config") from None
    bundled = BUNDLED.get(base.lower())
    if bundled:
        raw = json.loads((CONFIG_DIR / bundled).read_text())
        raw.pop("_source", None)
        return AutoConfig.for_model(raw.pop("model_type"), **raw), f"bundled:{bundled}"
    if not looks_like_hub_id(base):
        raise UserError("model.base", f"{base} does not exist",
                        "Give a local model folder or a hub id like google/gemma-4-12B-it")
    errors = []
    for local_only in (True, False):  # the cache first, then the hub if it can be reached
        if not local_only and not _hub_reachable():
            errors.append("offline: the hub cannot be reached and the config is not in the cache")
            break
        try:
            cfg = AutoConfig.from_pretrained(base, local_files_only=local_only,
                                             trust_remote_code=model.trust_remote_code)
            return cfg, f"hub:{base}"
        except Exception as e:  # noqa: BLE001 - hub errors come in many types; all mean "no config"
            errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
    raise UserError("model.base", f"cannot get the config of {base!r} ({errors[-1]})",
                    "Connect to the hub once, or download the model and point model.base at its folder")


def _hub_reachable() -> bool:
    """False in offline mode or when the hub's name does not resolve (then transformers would
    spend ~30 s in retries before failing)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
    except OSError:
        return False
    return True


def _model_class(config, family: Family | None):
    import transformers

    names = [family.model_class] if family else []
    names += list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise UserError("model.base", f"no transformers class for model_type {config.model_type!r}",
                    "Use a gemma4_unified checkpoint or a model transformers knows")


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _not_converted(model) -> tuple[list[str], object]:
    """The Linear modules bitsandbytes leaves alone when `from_pretrained` quantizes.

    transformers' rule (`get_keys_to_not_convert`): tied weights, the output embeddings and the
    module of the last parameter. `from_pretrained` applies it before tying, so the last
    parameter is `lm_head.weight` there; on our tied skeleton `named_parameters()` would drop
    it and wrongly spare the last real module (the 12B's audio projection, checked against a
    real NF4 load). Hence `remove_duplicate=False`.
    """
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # older/newer layout: exact-or-suffix match
        def should_convert_module(name, patterns):
            return not any(name == p or name.endswith("." + p) for p in patterns)
    keys = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    keys |= set(tied) | set(tied.values())
    keys.add(list(model.named_parameters(remove_duplicate=False))[-1][0])
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys |= {n for n, m in model.named_modules() if out_emb is not None and m is out_emb}
    return sorted({k.removesuffix(".weight") for k in keys}), should_convert_module


def skeleton(config, source: str = "") -> Skeleton:
    """Build the model on the meta device and count every parameter by role."""
    import torch
    from torch import nn

    family = family_for(config.model_type)
    cls = _model_class(config, family)
    with torch.device("meta"), _quiet():
        model = cls(config)
    skip, should_convert = _not_converted(model)
    s = Skeleton(model_type=config.model_type, source=source, skipped=sorted(skip))
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():  # tied weights appear once
        owner_name, _, pname = name.rpartition(".")
        owner = modules[owner_name]
        n = p.numel()
        s.total += n
        if isinstance(owner, nn.Embedding):
            s.embeddings += n
        elif type(owner) is nn.Linear and pname == "weight":
            if should_convert(owner_name, skip):
                s.quantizable += n
                s.quant_tensors.append((owner_name, n, owner.out_features))
                s.largest_quant = max(s.largest_quant, n)
            else:
                s.linear_kept += n
        else:
            s.other += n
    for name, m in modules.items():
        if isinstance(m, nn.Linear):
            s.lora_candidates.append((name, m.in_features, m.out_features))
        elif isinstance(m, nn.Embedding):
            s.lora_candidates.append((name, m.num_embeddings, m.embedding_dim))

    text = config.get_text_config()
    s.hidden, s.vocab = text.hidden_size, text.vocab_size
    s.softcap = bool(getattr(text, "final_logit_softcapping", None))
    s.layer_types = len(set(getattr(text, "layer_types", None) or ["full_attention"]))
    heads = text.num_attention_heads
    for name, m in modules.items():
        if isinstance(m, nn.ModuleList) and len(m) == text.num_hidden_layers and name.endswith("layers"):
            for i, layer in enumerate(m):
                attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
                if attn is None or mlp is None or not hasattr(attn, "q_proj"):
                    continue
                hd = attn.q_proj.out_features // heads
                k_out = attn.k_proj.out_features if getattr(attn, "k_proj", None) is not None else 0
                s.layers.append(Layer(
                    prefix=f"{name}.{i}", q_out=attn.q_proj.out_features, k_out=k_out,
                    has_v=getattr(attn, "v_proj", None) is not None, heads=heads, head_dim=hd,
                    kv_heads=max(k_out // hd, 1), inter=mlp.down_proj.in_features))
            break
    vision = getattr(config, "vision_config", None)
    if vision is not None and hasattr(vision, "pooling_kernel_size"):
        s.patch_dim = (vision.patch_size * vision.pooling_kernel_size) ** 2 * 3
        s.mm_dim = vision.mm_embed_dim
    audio = getattr(config, "audio_config", None)
    if audio is not None and hasattr(audio, "audio_embed_dim"):
        s.audio_dim = audio.audio_embed_dim
    return s


# ---- the estimate -----------------------------------------------------------------------


def _dtype_bytes(recipe, device: str) -> int:
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = "bf16" if device == "cuda" else "fp32"
    return 4 if dtype == "fp32" else 2


def _quant_bytes(sk: Skeleton, quantization: str, double_quant: bool, ab: int) -> int:
    """Bytes of the quantizable linear weights as bitsandbytes stores them."""
    total = 0
    for _, n, out in sk.quant_tensors:
        if quantization == "nf4":
            blocks = math.ceil(n / NF4_BLOCK)
            total += math.ceil(n / 2) + NF4_CODE_BYTES
            if double_quant:
                total += blocks + 4 * math.ceil(blocks / DQ_BLOCK) + DQ_CODE_BYTES + 4
            else:
                total += 4 * blocks
        elif quantization == "int8":
            total += n + 4 * out  # int8 weight + fp32 row scale (SCB)
        else:
            total += n * ab
    return total


def _lora(sk: Skeleton, recipe) -> tuple[list[tuple[str, int, int]], set[str]]:
    """The modules PEFT would wrap (full-match of the target regex) and their shapes."""
    from finetune.lora import target_regex

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


def _layer_saved(L: Layer, hid: int, targeted: set[str], r: int, ab: int, lb: int, dropout: bool,
                 tokens: int) -> int:
    """Bytes one decoder layer keeps for its backward, for `tokens` tokens of width `hid`."""
    Dq, Dk, inter = L.q_out, L.k_out, L.inter
    repeated = L.kv_heads < L.heads
    kv_saved = ab * (Dq if repeated else Dk)  # sdpa saves k and v after repeat_kv
    per_tok = (4 * NORM_BYTES * hid                 # 4 RMSNorms keep their fp32 upcast
               + NORM_BYTES * Dq + ab * Dq          # q_norm upcast; q after RoPE (sdpa input)
               + 2 * (NORM_BYTES * Dk + kv_saved)   # k_norm / v_norm upcasts; k, v for sdpa
               + ab * Dq                            # attention output (sdpa out = o_proj input)
               + 4 * L.heads                        # sdpa logsumexp, fp32
               + 3 * ab * inter)                    # gate out (gelu input), gelu out, up out
    ins = {"q_proj": hid, "k_proj": hid, "v_proj": hid, "o_proj": Dq,
           "gate_proj": hid, "up_proj": hid, "down_proj": inter}
    shared_groups: set[str] = set()
    for name, width in ins.items():
        full = f"{L.prefix}.{'mlp' if name.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{name}"
        if full not in targeted or (name == "v_proj" and not L.has_v):
            continue
        per_tok += lb * r  # lora_A output, saved by lora_B
        if dropout:
            per_tok += width * (lb + 1)  # dropout output (saved by lora_A) + its bool mask
        elif lb != ab:
            per_tok += lb * width        # each module casts its own fp32 copy of the input
        else:
            # same dtype: lora_A saves the shared input itself, once per input tensor;
            # o_proj's input (attention output) and nothing else is already saved.
            group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "mlp_in",
                     "up_proj": "mlp_in", "down_proj": "mlp_mid", "o_proj": "attn_out"}[name]
            if group not in shared_groups and group != "attn_out":
                shared_groups.add(group)
                per_tok += ab * width
    return per_tok * tokens


def _estimate(recipe, sk: Skeleton, device: str) -> dict:
    """Bytes per item for one micro-batch step; pure arithmetic."""
    ab = _dtype_bytes(recipe, device)
    lb = LORA_BYTES
    t, d, q = recipe.train, recipe.data, recipe.model
    B, S = t.batch_size, d.max_seq_len
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
    masks = sk.layer_types * B * S * S  # bool (B, 1, S, S) per layer type, True = attend

    # finetune.train moves all `grad_accum` micro-batches to the GPU before the first forward:
    # ids/labels/types/mask or positions (int64), media in the compute dtype, and with packing
    # each micro-batch's own 4-D masks (the one in flight is counted under attention_masks).
    items["batch_inputs"] = t.grad_accum * (4 * 8 * T + B * (
        img_tok * (sk.patch_dim * ab + 2 * 8) + aud_tok * (sk.audio_dim * ab + 1)))
    if t.packing:
        items["batch_inputs"] += (t.grad_accum - 1) * masks

    # --- activations of forward + backward --------------------------------------------
    dropout = recipe.lora.dropout > 0
    offload = t.offload_activations and device == "cuda"  # save_on_cpu: saved tensors go to host
    act: dict[str, float] = {}
    # Built once per forward (or passed in when packed); checkpointed layers keep them as inputs.
    act["attention_masks"] = masks
    layers = sk.layers
    if layers:
        saved = [_layer_saved(L, H, targeted, r, ab, lb, dropout, T) + ab * B * S * S for L in layers]
        inter = max(L.inter for L in layers)
        down_lora = any(f"{L.prefix}.mlp.down_proj" in targeted for L in layers)
        # backward of the MLP: grads of down input, gelu out, gate/up outs (bf16), the fp32
        # grad of down's LoRA input, and the hidden-state grad pair between layers.
        transient = T * (3 * ab * inter + (lb * inter if down_lora else 0) + 2 * ab * H)
        if t.gradient_checkpointing:
            # offloaded: the input being copied back plus the one in use
            act["checkpointed_inputs"] = (2 if offload else len(layers)) * T * H * ab
            act["layer_recompute"] = max(saved)  # recomputed in backward, outside save_on_cpu
        else:
            act["saved_activations"] = 2 * max(saved) if offload else sum(saved)
        act["backward_transients"] = transient
    # final norm (fp32 upcast + output) and the embedding output that starts the stack
    act["embeddings_and_final_norm"] = T * H * (NORM_BYTES + 2 * ab)
    # Per logit, the backward of a chunk (finetune.losses recomputes each chunk) holds the
    # soft-capped fp32 logits (tanh output), the fp32 log-softmax and two fp32 grads in flight;
    # the unchunked path holds the same in bf16 logits + fp32 copies for every token.
    rows = min(t.ce_chunk_size, T) if t.chunked_ce else T
    per_logit = 16 if sk.softcap else 12
    # + the label positions' hidden states gathered for the chunks and their grad (T × H each)
    act["logits_and_loss"] = rows * sk.vocab * per_logit + 2 * T * H * ab
    vision_lora = lb if any(".embed_vision." in n for n in targeted) else 0
    audio_lora = lb if any(".embed_audio." in n for n in targeted) else 0
    # raw patch → LayerNorm → Dense (+ fp32 LoRA input) → 3 LayerNorms/RMSNorm upcasts → Dense
    act["media_embedders"] = B * (
        img_tok * (sk.patch_dim * (ab + vision_lora) + sk.mm_dim * (6 * 4 + vision_lora))
        + aud_tok * sk.audio_dim * (NORM_BYTES + audio_lora))

    # The optimizer step runs after backward freed the activations: the peak is the larger.
    step = 4 * lora_params if t.optimizer in ("adamw", "paged_adamw") else 0  # foreach sqrt temp
    phase = "forward/backward" if sum(act.values()) >= step else "optimizer step"
    items.update(act if phase == "forward/backward" else {"optimizer_step_temporaries": step})
    allocated = sum(items.values())
    if device == "cuda":
        items["allocator_slack"] = ALLOCATOR_SLACK * allocated
        items["cuda_context"] = CUDA_CONTEXT_GIB * GIB
    return {"items": items, "allocated": allocated, "phase": phase, "tokens": T,
            "lora_params": lora_params, "lora_modules": len(hits), "media": (img_tok, aud_tok),
            "compute_bytes": ab}


def _result(recipe, sk: Skeleton, est: dict, budget_gib: float, device: str) -> dict:
    peak = sum(est["items"].values()) / GIB
    ordered = sorted(est["items"].items(), key=lambda kv: -kv[1])
    breakdown = {k: round(v / GIB, 6) for k, v in ordered}
    img, aud = est["media"]
    return {
        "peak_gib": round(peak, 3),
        "budget_gib": budget_gib,
        "fits": peak <= budget_gib,
        "allocated_gib": round(est["allocated"] / GIB, 3),  # what torch.cuda.max_memory_allocated sees
        "reserved_gib": round((est["allocated"] + est["items"].get("allocator_slack", 0)) / GIB, 3),
        "breakdown": breakdown,
        "breakdown_bytes": {k: int(v) for k, v in ordered},
        "suggestions": [],
        "suggested_overrides": [],
        "params": {
            "total": sk.total, "embeddings": sk.embeddings, "quantizable_linear": sk.quantizable,
            "linear_not_quantized": sk.linear_kept, "norms_and_other": sk.other,
            "lora_trainable": est["lora_params"], "lora_modules": est["lora_modules"],
        },
        "assumptions": {
            "config": sk.source,
            "device": device,
            "compute_dtype": {2: "bf16" if recipe.model.dtype != "fp16" else "fp16", 4: "fp32"}[
                est["compute_bytes"]],
            "tokens_per_micro_batch": est["tokens"],
            "seq_len": recipe.data.max_seq_len,
            "media_tokens_per_sample": {"image": img, "audio": aud},
            "peak_phase": est["phase"],
            "not_quantized_modules": sk.skipped,
            "attention": "sdpa memory-efficient (no seq² scores); bool masks (batch×seq²) materialised",
            "lora": "fp32 adapter, no autocast: PEFT casts each LoRA input to fp32",
            "chunked_ce": (f"one chunk of {recipe.train.ce_chunk_size} positions at a time"
                           if recipe.train.chunked_ce else "full logits for every token"),
            "error_bar": "analytic, not yet calibrated on a GPU; see benchmarks/gpu_memory.py",
        },
    }


def _with(recipe, overrides: list[str]):
    from finetune.recipe import with_overrides

    return with_overrides(recipe, overrides)


def _candidates(recipe, device: str) -> list[list[str]]:
    """Overrides worth trying, each a change from the recipe as it is."""
    t, d, m, lo = recipe.train, recipe.data, recipe.model, recipe.lora
    out: list[list[str]] = []
    if not t.chunked_ce:
        out.append(["train.chunked_ce=true"])
    if not t.gradient_checkpointing:
        out.append(["train.gradient_checkpointing=true"])
    elif device == "cuda" and not t.offload_activations:
        out.append(["train.offload_activations=true"])
    if t.optimizer in ("adamw", "paged_adamw"):
        out.append(["train.optimizer=adamw8bit"])
    if m.quantization != "nf4":
        out.append(["model.quantization=nf4"])
    elif not m.double_quant:
        out.append(["model.double_quant=true"])
    if t.batch_size > 1:
        out.append(["train.batch_size=1", f"train.grad_accum={t.batch_size * t.grad_accum}"])
    if t.packing:
        out.append(["train.packing=false"])
    if lo.r > 4:
        out.append([f"lora.r={lo.r // 2}"])
    smaller = [x for x in (70, 140, 280, 560, 1120) if x < d.image_tokens]
    if smaller:
        out.append([f"data.image_tokens={smaller[-1]}"])
    if t.chunked_ce and t.ce_chunk_size > 64:
        out.append([f"train.ce_chunk_size={t.ce_chunk_size // 2}"])
    return out


def _fitting_seq_len(recipe, sk: Skeleton, device: str, budget_gib: float) -> int | None:
    """The longest max_seq_len (a multiple of 256, below the current one) that fits."""
    lo, hi = 1, recipe.data.max_seq_len // 256  # in units of 256 tokens
    if hi * 256 == recipe.data.max_seq_len:
        hi -= 1
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, max_seq_len=mid * 256))
        if sum(_estimate(r, sk, device)["items"].values()) / GIB <= budget_gib:
            best, lo = mid * 256, mid + 1
        else:
            hi = mid - 1
    return best


def _suggest(recipe, sk: Skeleton, device: str, budget_gib: float, peak: float) -> tuple[list[str], list[dict]]:
    """Single overrides with what each saves, then one stack of them that fits."""
    def peak_of(r) -> float:
        return sum(_estimate(r, sk, device)["items"].values()) / GIB

    def entry(ov: list[str]) -> dict:
        new = peak_of(_with(recipe, ov))
        return {"overrides": ov, "saves_gib": round(peak - new, 3), "peak_gib": round(new, 3),
                "fits": new <= budget_gib}

    singles = [entry(ov) for ov in _candidates(recipe, device)]
    singles = sorted((x for x in singles if x["saves_gib"] >= OPT_MIN_SAVING_GIB), key=lambda x: -x["saves_gib"])
    seq = _fitting_seq_len(recipe, sk, device, budget_gib)
    if seq:
        singles.append(entry([f"data.max_seq_len={seq}"]))
    # Shorter samples change what the model learns: when no other single change is enough,
    # stack the others (biggest first, skipping crumbs) and shorten samples only as a last step.
    out = singles
    if not any(x["fits"] for x in singles if not x["overrides"][0].startswith("data.max_seq_len")):
        combo: list[str] = []
        for x in singles:
            if x["overrides"][0].startswith("data.max_seq_len") or x["saves_gib"] < 0.1:
                continue
            combo += x["overrides"]
            if peak_of(_with(recipe, combo)) <= budget_gib:
                break
        if combo and peak_of(_with(recipe, combo)) > budget_gib:
            seq = _fitting_seq_len(_with(recipe, combo), sk, device, budget_gib)
            combo += [f"data.max_seq_len={seq}"] if seq else []
        if len(combo) > 1 and peak_of(_with(recipe, combo)) <= budget_gib:
            out = [entry(combo)] + singles
    lines = [f"{' '.join(x['overrides'])}  # saves {x['saves_gib']:.2f} GiB -> {x['peak_gib']:.2f} GiB"
             f"{' (fits)' if x['fits'] else ''}" for x in out]
    return lines, out


def plan(recipe, *, budget_gib: float = 16.0, device: str = "cuda") -> dict:
    """Predict peak GPU memory of one training step of `recipe` (see the module docstring)."""
    if device not in ("cuda", "cpu"):
        raise UserError("device", f"{device!r} is not cuda or cpu", "Use cuda or cpu")
    config, source = load_config(recipe.model)
    sk = skeleton(config, source)
    est = _estimate(recipe, sk, device)
    out = _result(recipe, sk, est, budget_gib, device)
    if not out["fits"]:
        out["suggestions"], out["suggested_overrides"] = _suggest(
            recipe, sk, device, budget_gib, sum(est["items"].values()) / GIB)
    return out
