"""Model families: which module plays which role, and how names map for export.

A family is data, not code paths: the loader, the LoRA presets, the trainable table and the
exporters read it. `gemma4_unified` is the first; another encoder-free or encoder-based
image/audio-text model plugs in with one more entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_tools.render import ChatFormat
from finetune.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str
    processor_class: str
    # Regexes (full match, runtime names) per LoRA preset role.
    role_patterns: dict[str, str]
    # Runtime name → which part of the model a parameter belongs to (for the table).
    part_patterns: tuple[tuple[str, str], ...]
    # Runtime LoRA module name → llama.cpp tensor base name, e.g. blk.3.attn_q
    gguf_names: tuple[tuple[str, str], ...]
    # The chat format's own tokens (turn end, model turn header, thinking channel, tool calls)
    chat: ChatFormat
    # Full names of the decoder layers' MLP blocks (what `train.mlp_tile_tokens` tiles)
    mlp_blocks: str = ""
    # Full names of the decoder layers' attention modules (what `train.tile_attention` tiles)
    attention_blocks: str = ""

    def part_of(self, name: str) -> str:
        for pattern, part in self.part_patterns:
            if re.search(pattern, name):
                return part
        return "text backbone"

    def gguf_name(self, module: str) -> str | None:
        for pattern, repl in self.gguf_names:
            m = re.fullmatch(pattern, module)
            if m:
                return m.expand(repl)
        return None


GEMMA4_UNIFIED = Family(
    model_type="gemma4_unified",
    model_class="Gemma4UnifiedForConditionalGeneration",
    processor_class="Gemma4UnifiedProcessor",
    role_patterns={
        "attention": r".*language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
        "mlp": r".*language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj",
        "vision": r".*embed_vision\.(patch_dense|multimodal_embedder\.embedding_projection)",
        "audio": r".*embed_audio\.embedding_projection",
    },
    part_patterns=(
        (r"embed_vision\.", "vision projection"),
        (r"embed_audio\.", "audio projection"),
        (r"embed_tokens|lm_head", "embeddings + head"),
    ),
    gguf_names=(
        (r".*language_model\.layers\.(\d+)\.self_attn\.q_proj", r"blk.\1.attn_q"),
        (r".*language_model\.layers\.(\d+)\.self_attn\.k_proj", r"blk.\1.attn_k"),
        (r".*language_model\.layers\.(\d+)\.self_attn\.v_proj", r"blk.\1.attn_v"),
        (r".*language_model\.layers\.(\d+)\.self_attn\.o_proj", r"blk.\1.attn_output"),
        (r".*language_model\.layers\.(\d+)\.mlp\.gate_proj", r"blk.\1.ffn_gate"),
        (r".*language_model\.layers\.(\d+)\.mlp\.up_proj", r"blk.\1.ffn_up"),
        (r".*language_model\.layers\.(\d+)\.mlp\.down_proj", r"blk.\1.ffn_down"),
    ),
    chat=ChatFormat(turn_end="<turn|>", model_turn="<|turn>model\n", channel_open="<|channel>",
                    channel_close="<channel|>", thought="thought\n", call_open="<|tool_call>",
                    call_close="<tool_call|>", call_stop="<|tool_response>", quote='<|"|>'),
    mlp_blocks=r".*language_model\.layers\.\d+\.mlp",
    attention_blocks=r".*language_model\.layers\.\d+\.self_attn",
)

FAMILIES = {GEMMA4_UNIFIED.model_type: GEMMA4_UNIFIED}


def family_for(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def family_config(base: str, *, trust_remote_code: bool = False, where: str | None = None):
    """(family, config) of a base model, or a UserError (at `where`, default the base) when its
    config can't be read or finetune has no family for it."""
    from transformers import AutoConfig

    from data_tools.locations import hub_reachable, in_hub_cache, is_hub_id

    where = where or base
    if is_hub_id(base) and not in_hub_cache(base) and not hub_reachable():  # fail now, not after retries
        raise UserError(where, f"{base} is not in this machine's hub cache and the hub can't be reached",
                        "Connect once to download it, or point at a local model folder")
    try:
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(where, f"can't read the config of {base} ({str(e).splitlines()[0]})",
                        "Point at a model folder that has config.json, or check that the hub is reachable") from None
    family = family_for(cfg.model_type)
    if family is None:
        raise UserError(where, f"model_type {cfg.model_type!r} is not a model family finetune knows",
                        "Use a gemma4_unified base")
    return family, cfg
