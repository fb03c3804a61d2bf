"""A tiny MTP drafter for the tiny base, built like Gemma 4 12B's (`finetune tiny-model` writes it).

Shaped like `google/gemma-4-12B-it-assistant` relative to its target: a sliding and a full layer
(the real one has 3 + 1), narrower than its target (64 vs 128 here, 1024 vs 3840 there),
`backbone_hidden_size` = the target's hidden size, every layer reading the target's shared k/v
(`num_kv_shared_layers` = all its layers), tied output embedding. Seeded.

One deliberate choice: its tied embedding starts as the target's token embedding through a fixed
random projection (128 → 64, orthonormal columns, seeded) instead of noise. A drafter starts from
its target's vocabulary geometry (Google trains theirs against the target), and with it the demo
distils a usable "shipped" drafter on 2 CPU cores in seconds: predicting the token the tiny base
is about to repeat is then a matter of learning one projection, not one row per token.
"""

from __future__ import annotations

import json
from pathlib import Path

LAYERS, HIDDEN, INTERMEDIATE, HEADS = 2, 64, 128, 4
EMBED_KEY = "model.language_model.embed_tokens.weight"


def build_tiny_drafter(target_config, target_embedding, seed: int = 0):
    """The drafter for a tiny target (`target_embedding`: its [vocab, hidden] token embedding)."""
    import torch
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from finetune.drafter.model import drafter_config

    cfg = drafter_config(target_config, layers=LAYERS, hidden=HIDDEN, intermediate=INTERMEDIATE, heads=HEADS)
    torch.manual_seed(seed)
    drafter = Gemma4UnifiedAssistantForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    backbone = target_embedding.shape[1]
    projection = torch.linalg.qr(torch.randn(backbone, HIDDEN, generator=g))[0]  # orthonormal columns
    with torch.no_grad():
        drafter.model.embed_tokens.weight.copy_(target_embedding.float() @ projection)
    return drafter.eval()


def write_tiny_drafter(base: str | Path, out: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny drafter for the tiny base folder `base` (default: `base/drafter/`)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from finetune.drafter.model import save_drafter

    base = Path(base)
    out = Path(out) if out is not None else base / "drafter"
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        embedding = f.get_tensor(EMBED_KEY)
    drafter = build_tiny_drafter(AutoConfig.from_pretrained(base), embedding, seed)
    save_drafter(drafter, out, num_tokens=4, tokenizer_from=str(base))
    (out / "finetune_tiny.json").write_text(json.dumps({"seed": seed, "kind": "tiny gemma4_unified_assistant"}))
    return out
