"""The model as a skeleton on the meta device: what `finetune plan` counts, with no weights.

The model is built from a local `config.json`, the bundled config of a known base
(`finetune/configs/`), or the hub's config (~0.2 s for the 12B, no memory). The skeleton
records every parameter by role (embeddings, linears bitsandbytes would quantize, the rest),
each decoder layer's projection shapes, and the module names LoRA targets can match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.locations import hub_reachable, looks_like_hub_id
from finetune.errors import UserError
from finetune.model.families import Family, family_for
from finetune.model.load import quiet_loading

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Hub ids whose config ships with finetune (lower-cased): the pretrained and instruction-tuned
# 12B share one architecture, so both plan offline.
BUNDLED = {
    "google/gemma-4-12b-it": "gemma-4-12b.json",
    "google/gemma-4-12b": "gemma-4-12b.json",
    "gemma-4-12b-it": "gemma-4-12b.json",
    "gemma-4-12b": "gemma-4-12b.json",
}

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
    # Candidates whose LoRA no export carries exactly: embeddings, and a head tied to one
    unexportable: dict[str, str] = field(default_factory=dict)  # name -> why
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
        if not local_only and not hub_reachable():
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


def model_class(config, family: Family | None):
    import transformers

    names = [family.model_class] if family else []
    names += list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise UserError("model.base", f"no transformers class for model_type {config.model_type!r}",
                    "Use a gemma4_unified checkpoint or a model transformers knows")


def not_quantized(model) -> tuple[list[str], object]:
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
    cls = model_class(config, family)
    with torch.device("meta"), quiet_loading():
        model = cls(config)
    skip, should_convert = not_quantized(model)
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
            s.unexportable[name] = "an embedding"
    if getattr(config.get_text_config(), "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        for name, m in modules.items():
            if name.split(".")[-1] == "lm_head" and isinstance(m, nn.Linear):
                s.unexportable[name] = "the output head, tied to the token embedding"

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
