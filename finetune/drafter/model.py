"""Gemma 4's MTP drafter (`Gemma4UnifiedAssistantForCausalLM`): build, load, check, save.

The drafter reads the target's last hidden state next to the embedding of the last token
(`pre_projection`, 2 × target hidden → its own hidden), cross-attends to the key/value states the
target's last sliding and last full layer computed (every drafter layer reuses them: it has no
k/v projections), and projects back to the target's width (`post_projection`) for its next step.
So a drafter fits one target exactly: its `backbone_hidden_size` is the target's hidden size, and
for each attention type its head size and kv heads are those of the target's layer that stores
the shared states. `check_pair` proves that before anything trains or drafts.

The target's token embedding is the target's own (the candidate generator looks tokens up in
it); the drafter keeps only its tied output embedding, so nothing here copies the target's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_tools.locations import looks_like_hub_id
from finetune.errors import UserError

MODEL_TYPE = "gemma4_unified_assistant"
# Keys of a saved text config that describe the checkpoint, not the architecture.
_BOOKKEEPING = ("_name_or_path", "architectures", "transformers_version", "dtype", "id2label", "label2id",
                "model_type", "per_layer_config")


def kv_shape(text_config, layer_type: str) -> tuple[int, int] | None:
    """(kv heads, head size) of the `layer_type` layer whose k/v a drafter reads: the one that
    stores them (the last of its type before any kv-sharing layers), else the last of its type."""
    types = text_config.layer_types
    modes = getattr(text_config, "kv_sharing_modes", None) or [None] * len(types)
    idx = [i for i, (t, mode) in enumerate(zip(types, modes)) if t == layer_type and mode == "store"]
    idx = idx or [i for i, t in enumerate(types) if t == layer_type]
    if not idx:
        return None
    layer = text_config.per_layer_config[idx[-1]]
    return layer.num_key_value_heads, layer.head_dim


def drafter_config(target_config, *, layers: int, hidden: int, intermediate: int, heads: int):
    """A drafter config for `target_config` (a gemma4_unified config): its text config is the
    target's with `layers` layers (sliding, …, full) of width `hidden`, every layer reading the
    target's shared k/v, and the per-layer head sizes of the layers it reads from."""
    from transformers import Gemma4UnifiedAssistantConfig
    from transformers.models.gemma4_unified import Gemma4UnifiedTextConfig

    text = target_config.get_text_config()
    kv_full = kv_shape(text, "full_attention")
    raw = {k: v for k, v in text.to_dict().items() if k not in _BOOKKEEPING}
    raw.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
               num_attention_heads=heads, num_kv_shared_layers=layers,
               layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
               # The per-layer overrides are derived again from these two (they are indexed by the
               # target's layers, so the target's own per_layer_config can't be reused).
               global_head_dim=kv_full[1], num_global_key_value_heads=kv_full[0])
    return Gemma4UnifiedAssistantConfig(text_config=Gemma4UnifiedTextConfig(**raw),
                                        backbone_hidden_size=text.hidden_size)


def check_pair(drafter_cfg, target_cfg, where: str) -> None:
    """UserError (at `where`) unless this drafter can read this target's states."""
    fix = "Use the drafter shipped for this base (google/gemma-4-12B-it-assistant for the 12B)"
    if getattr(drafter_cfg, "model_type", None) != MODEL_TYPE:
        raise UserError(where, f"model_type {getattr(drafter_cfg, 'model_type', None)!r} is not an MTP drafter "
                        f"({MODEL_TYPE})", fix)
    text, dtext = target_cfg.get_text_config(), drafter_cfg.get_text_config()
    if drafter_cfg.backbone_hidden_size != text.hidden_size:
        raise UserError(where, f"drafter for another target: backbone_hidden_size {drafter_cfg.backbone_hidden_size}, "
                        f"but the base's hidden size is {text.hidden_size}", fix)
    if dtext.vocab_size != text.vocab_size:
        raise UserError(where, f"drafter for another target: vocabulary {dtext.vocab_size}, the base's "
                        f"{text.vocab_size}", fix)
    if dtext.num_kv_shared_layers != dtext.num_hidden_layers:
        raise UserError(where, f"{dtext.num_hidden_layers - dtext.num_kv_shared_layers} drafter layers compute "
                        "their own keys and values; an MTP drafter reads all of them from the target", fix)
    for kind in sorted(set(dtext.layer_types)):
        want, got = kv_shape(text, kind), kv_shape(dtext, kind)
        if want != got:
            raise UserError(where, f"drafter for another target: its {kind} layers read {got} (kv heads, head size), "
                            f"the base's give {want}", fix)


def read_config(path: str, where: str = "drafter.path"):
    """The drafter's config, from a folder or the hub; a UserError when it can't be read."""
    from transformers import AutoConfig

    p = Path(path)
    if not p.exists() and not looks_like_hub_id(path):
        raise UserError(where, f"{path} does not exist",
                        "Give the drafter's folder or hub id, e.g. google/gemma-4-12B-it-assistant")
    if p.exists() and not (p / "config.json").is_file():
        raise UserError(where, f"{path} has no config.json", "Point at the drafter's model folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(where, f"can't read the drafter config of {path} ({str(e).splitlines()[0][:160]})",
                        "Point at a drafter folder, or check that the hub is reachable") from None


def load_drafter(path: str, target_cfg, *, where: str = "drafter.path", dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
    """The drafter at `path`, proven to fit `target_cfg`, in `dtype` on `device`, in eval mode."""
    from transformers import Gemma4UnifiedAssistantForCausalLM

    cfg = read_config(path, where)
    check_pair(cfg, target_cfg, where)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise UserError(where, f"{path} has no safetensors weights", "Expected model.safetensors next to config.json")
    drafter = Gemma4UnifiedAssistantForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return drafter.to(device).eval()


def save_drafter(drafter, out: str | Path, *, num_tokens: int, tokenizer_from: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `drafter` as an HF folder (config, safetensors, generation config drafting `num_tokens`
    per round), with the target's tokenizer files beside it when `tokenizer_from` is a local base
    (llama.cpp's converter reads the vocabulary from the drafter's folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dtype is not None and dtype != next(drafter.parameters()).dtype:
        import copy

        drafter = copy.deepcopy(drafter).to(dtype)
    drafter.generation_config.num_assistant_tokens = num_tokens
    drafter.generation_config.num_assistant_tokens_schedule = "constant"
    drafter.save_pretrained(out)
    if tokenizer_from and Path(tokenizer_from).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(out)
    return out


def saved_dtype(config) -> torch.dtype:
    """The dtype a drafter was saved in (its config's `dtype`; fp32 when it names none)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
