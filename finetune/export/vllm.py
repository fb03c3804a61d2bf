"""vLLM and SGLang: a clean PEFT folder the server loads, and nothing it would silently drop.

Both servers load PEFT folders but apply LoRA to the language model's q/k/v/o/gate/up/down
only, reject modules_to_save, DoRA and LoRA biases, and cap the rank. Two Gemma 4 details:
- On `attention_k_eq_v` layers the checkpoint has no v_proj; both servers load k_proj's
  weight into the v slot of their fused qkv_proj, so V = W_k x there. In transformers
  V = k_proj(x) *with* the LoRA, so the export writes a v_proj LoRA equal to k_proj's on
  those layers; without it the server's V would miss the update.
- The folder is normalised: one rank (smaller ranks zero-padded, which is exact), alpha = r
  and each module's scale (alpha patterns, rsLoRA) folded into B, so no server has to get
  PEFT's pattern or rsLoRA rules right.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.adapters import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    ParityError,
    delta,
    lora_pairs,
    max_rel_diff,
    open_adapter,
    prepare_out,
    read_adapter,
    roles,
    scale,
    write_report,
)
from finetune.errors import UserError

SERVERS = ("vllm", "sglang")
VALID_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices
TOLERANCE = {torch.float32: 1e-6}  # max relative difference of B·A·scale; 1e-2 for half tensors


def refuse_unservable(config: dict, where: Path, server: str) -> None:
    """What a LoRA-only server can't carry: full module copies, biases, new token rows."""
    if config.get("modules_to_save"):
        raise UserError(str(where), f"modules_to_save {config['modules_to_save']}: {server} can't serve full "
                        "copies of trained modules next to LoRA", "Use --format merged, or retrain without them")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UserError(str(where), f"the adapter trains biases (bias={config.get('bias')!r}, lora_bias="
                        f"{config.get('lora_bias')}), which {server} can't load", "Use --format merged")
    if config.get("trainable_token_indices"):
        raise UserError(str(where), f"trained token embeddings (trainable_token_indices): {server} can't load them",
                        "Use --format merged")


def max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None: above them all)."""
    return next((r for r in VALID_RANKS if r >= rank), None)


def k_eq_v_layers(cfg) -> set[int]:
    """Layers whose values come from k_proj, decided from the config the way the servers decide."""
    text = cfg.text_config
    if not getattr(text, "attention_k_eq_v", False):
        return set()
    return {i for i, kind in enumerate(text.layer_types) if kind == "full_attention"}


def export_vllm(adapter: str | Path, out: str | Path, *, server: str = "vllm", merge_projections: bool = False,
                base: str | None = None, allow_pickle: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Write a PEFT folder `server` serves as trained; see the module docstring."""
    from safetensors.torch import save_file

    log = log or (lambda _: None)
    if server not in SERVERS:
        raise UserError("--format", f"{server!r} is not a PEFT-folder server", f"Use one of {', '.join(SERVERS)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_unservable(config, adapter, server)
    pairs = lora_pairs(state)
    parts = roles(family, pairs)
    if parts["other"]:
        raise UserError(str(adapter), f"LoRA on {', '.join(parts['other'][:3])}: {server} serves LoRA on the "
                        "language model's q/k/v/o/gate/up/down projections only", "Use --format merged")
    if parts["media"] and not merge_projections:
        raise UserError(str(adapter), f"{len(parts['media'])} LoRA modules sit on the vision/audio projections "
                        f"({', '.join(parts['media'])}); {server} applies LoRA to the language model only, so "
                        "exporting would silently drop what they learned",
                        "Pass --merge-projections to write a base with those updates merged plus the text "
                        "adapter, or use --format merged")
    if not parts["text"]:
        raise UserError(str(adapter), "the adapter has no language-model LoRA for a server to apply",
                        "Use --format merged")
    rank = max(pairs[m][0].shape[0] for m in parts["text"])
    server_rank = max_lora_rank(rank)
    if server_rank is None:
        raise UserError(str(adapter), f"rank {rank} is above {server}'s largest --max-lora-rank (512)",
                        "Retrain with r <= 512, or use --format merged")
    out = prepare_out(out, adapter, base)
    serve_base = str(out / "base") if parts["media"] else base

    # served module -> the source module whose update it carries
    served = {m: m for m in parts["text"]}
    copied = []
    for m in parts["text"]:
        layer = re.search(r"layers\.(\d+)\.self_attn\.k_proj$", m)
        if layer and int(layer.group(1)) in k_eq_v_layers(cfg):
            served[m.replace(".k_proj", ".v_proj")] = m
            copied.append(int(layer.group(1)))
    tensors = {}
    for m, src in served.items():
        A, B = pairs[src]
        r = A.shape[0]
        A_out = A.new_zeros(rank, A.shape[1])
        B_out = torch.zeros(B.shape[0], rank)
        A_out[:r] = A
        B_out[:, :r] = B.float() * scale(config, src, r)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = A_out.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = B_out.to(B.dtype).contiguous()
    new_config = {**config, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
                  "alpha_pattern": {}, "target_modules": sorted({m.rsplit(".", 1)[1] for m in served}),
                  "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                  "base_model_name_or_path": serve_base, "inference_mode": True}
    (out / CONFIG_FILE).write_text(json.dumps(new_config, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    # Read back what a server reads and hold every update against the source adapter's.
    written_config, written = read_adapter(out)
    written_pairs = lora_pairs(written)
    worst = max(max_rel_diff(delta(written_config, m, *written_pairs[m]), delta(config, src, *pairs[src]))
                for m, src in served.items())
    tol = TOLERANCE.get(next(iter(pairs.values()))[1].dtype, 1e-2)
    name = out.name
    if server == "vllm":
        command = f"vllm serve {serve_base} --enable-lora --lora-modules {name}={out} --max-lora-rank {server_rank}"
    else:
        command = (f"python -m sglang.launch_server --model-path {serve_base} --enable-lora "
                   f"--lora-paths {name}={out} --max-lora-rank {server_rank}")
    report = {
        "format": server, "adapter": str(adapter), "base": base, "out": str(out), "serve_base": serve_base,
        "modules": len(served), "rank": rank, "max_lora_rank": server_rank,
        "v_proj_from_k_proj_layers": sorted(copied), "max_rel_update_diff": worst, "tolerance": tol,
        "serve_command": command,
        "checks": [
            "config: LoRA only (no modules_to_save, DoRA, biases or trained tokens)",
            f"shapes: every LoRA tensor fits a module of {base}",
            "targets: only language-model q/k/v/o/gate/up/down are served"
            + (f"; {len(parts['media'])} vision/audio modules merged into {serve_base}" if parts["media"] else ""),
            f"rank {rank} <= --max-lora-rank {server_rank}",
            f"k_eq_v layers {sorted(copied)}: v_proj LoRA = k_proj LoRA (the server's v slot holds k_proj's weight)",
            f"update B·A·scale of every served module equals the source adapter's (max rel diff {worst:.2g})",
        ],
    }
    if worst > tol:
        write_report(out, "export_report.json", report)
        raise ParityError(f"{out}: exported updates differ from the adapter's by {worst:.3g}")
    if parts["media"]:
        from finetune.merge import merge_modules

        report["merge_projections"] = merge_modules(adapter, parts["media"], out, prepare_out(out / "base"),
                                                    base=base, allow_pickle=allow_pickle, log=log)
        merged = report["merge_projections"]
        report["checks"].append(
            f"{serve_base} + this adapter reproduce base + source adapter on a text/image/audio probe "
            f"(max |dlogits| {merged['max_abs_diff']:.3g})" if "max_abs_diff" in merged else
            f"{serve_base}: every tensor read back equals the base's plus the projection updates "
            f"(low-memory merge; {merged['tensors']} tensors)")
    write_report(out, "export_report.json", report)
    log(f"{server}: {len(served)} LoRA modules, rank {rank}, update max rel diff {worst:.2g} -> {out}")
    log(f"serve with: {command}")
    return report
