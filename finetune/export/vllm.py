"""vLLM and SGLang: a clean PEFT folder the server loads, and nothing it would silently drop.

Both servers load PEFT folders but apply LoRA to the language model's q/k/v/o/gate/up/down
only, reject modules_to_save, DoRA and LoRA biases, and cap the rank. So LoRA on the vision/audio
projections is merged into the base instead: by default into a linked model folder OUT/base
(`finetune.export.linked`: the base's own weight files, the projection tensors rewritten where
they live; megabytes on a copy-on-write file system), with `merge_projections` into a full
merged copy. The served pair, OUT/base + OUT, is proven on a text/image/audio probe. Two Gemma 4
details of the text adapter:
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

from finetune.errors import UserError
from finetune.export.linked import LINKS, check_linkable, check_linked, prove_linked, write_linked
from finetune.export.merge_low_memory import merge_targets, weight_files
from finetune.model.adapters import (
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


def _text_adapter(out: Path, config: dict, pairs: dict, text: list[str], cfg, serve_base: str) -> dict:
    """Write the normalised PEFT folder of the `text` modules into `out`, read it back and hold
    every served update against the source adapter's."""
    from safetensors.torch import save_file

    rank = max(pairs[m][0].shape[0] for m in text)
    # served module -> the source module whose update it carries
    served = {m: m for m in text}
    copied = []
    for m in text:
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
    diffs = {m: max_rel_diff(delta(written_config, m, *written_pairs[m]), delta(config, src, *pairs[src]))
             for m, src in served.items()}
    worst_module = max(diffs, key=diffs.get)
    worst = diffs[worst_module]
    return {"modules": len(served), "rank": rank, "v_proj_from_k_proj_layers": sorted(copied),
            "max_rel_update_diff": worst, "worst_module": worst_module,
            "tolerance": TOLERANCE.get(next(iter(pairs.values()))[1].dtype, 1e-2)}


def serve_command(server: str, model: str, adapter: Path | None, rank: int | None) -> str:
    """The line that serves `model` (+ the LoRA folder `adapter`) with `server`."""
    if server == "vllm":
        lora = f" --enable-lora --lora-modules {adapter.name}={adapter} --max-lora-rank {rank}" if adapter else ""
        return f"vllm serve {model}{lora}"
    lora = f" --enable-lora --lora-paths {adapter.name}={adapter} --max-lora-rank {rank}" if adapter else ""
    return f"python -m sglang.launch_server --model-path {model}{lora}"


def export_vllm(adapter: str | Path, out: str | Path, *, server: str = "vllm", merge_projections: bool = False,
                link: str = "hard", base: str | None = None, allow_pickle: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Write a PEFT folder `server` serves as trained (+ OUT/base when the adapter changes the
    vision/audio projections: linked, or a merged copy with `merge_projections`); see the module
    docstring. Returns the report, whose `serve` says what to load and the command."""
    log = log or (lambda _: None)
    if server not in SERVERS:
        raise UserError("--format", f"{server!r} is not a PEFT-folder server", f"Use one of {', '.join(SERVERS)}")
    if link not in LINKS:
        raise UserError("--link", f"{link!r} is not a link kind", f"Use one of {', '.join(LINKS)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_unservable(config, adapter, server)
    pairs = lora_pairs(state)
    parts = roles(family, pairs)
    if parts["other"]:
        raise UserError(str(adapter), f"LoRA on {', '.join(parts['other'][:3])}: {server} serves LoRA on the "
                        "language model's q/k/v/o/gate/up/down projections only", "Use --format merged")
    rank = max((pairs[m][0].shape[0] for m in parts["text"]), default=None)
    server_rank = max_lora_rank(rank) if rank else None
    if rank and server_rank is None:
        raise UserError(str(adapter), f"rank {rank} is above {server}'s largest --max-lora-rank (512)",
                        "Retrain with r <= 512, or use --format merged")
    linked = parts["media"] and not merge_projections
    if linked:  # before anything is written: the base's files must be on local disk
        keys = weight_files(base)
        want = merge_targets(adapter, keys, family, cfg, {m: pairs[m] for m in parts["media"]})
        check_linkable(Path(out), keys, want, link, base)
    out = prepare_out(out, adapter, base)
    serve_base = str(out / "base") if parts["media"] else base
    report = {"format": server, "adapter": str(adapter), "base": base, "out": str(out), "serve_base": serve_base}
    checks = ["config: LoRA only (no modules_to_save, DoRA, biases or trained tokens)",
              f"shapes: every LoRA tensor fits a module of {base}"]
    if parts["text"]:
        text = _text_adapter(out, config, pairs, parts["text"], cfg, serve_base)
        report.update(text, max_lora_rank=server_rank)
        checks += [
            "targets: only language-model q/k/v/o/gate/up/down are served as LoRA",
            f"rank {rank} <= --max-lora-rank {server_rank}",
            f"k_eq_v layers {text['v_proj_from_k_proj_layers']}: v_proj LoRA = k_proj LoRA (the server's v slot "
            "holds k_proj's weight)",
            f"update B·A·scale of every served module equals the source adapter's (max rel diff "
            f"{text['max_rel_update_diff']:.2g})"]
        if text["max_rel_update_diff"] > text["tolerance"]:
            write_report(out, "export_report.json", {**report, "checks": checks})
            raise ParityError(f"{out}: the exported update of {text['worst_module']} differs from the adapter's by "
                              f"{text['max_rel_update_diff']:.3g}")
    attach = out if parts["text"] else None
    if linked:
        report["linked_base"] = _linked_base(adapter, out, base, family, keys, want, config, pairs, attach, link, log)
        checks += _linked_checks(report["linked_base"], serve_base, len(parts["media"]))
    elif parts["media"]:
        from finetune.export.merge import merge_modules

        report["merge_projections"] = merge_modules(adapter, parts["media"], out, prepare_out(out / "base"),
                                                    base=base, allow_pickle=allow_pickle, log=log)
        merged = report["merge_projections"]
        checks.append(
            f"{serve_base} + this adapter reproduce base + source adapter on a text/image/audio probe "
            f"(max |dlogits| {merged['max_abs_diff']:.3g})" if "max_abs_diff" in merged else
            f"{serve_base}: every tensor read back equals the base's plus the projection updates "
            f"(low-memory merge; {merged['tensors']} tensors)")
    command = serve_command(server, serve_base, attach, server_rank)
    report.update(serve={"model": serve_base, "adapter": str(attach) if attach else None, "command": command},
                  serve_command=command, checks=checks)
    write_report(out, "export_report.json", report)
    if linked:  # (merge_modules raises by itself)
        account = report["linked_base"]
        if not account["tensor_check"]["ok"]:
            bad = account["tensor_check"]["mismatched_tensors"] or account["tensor_check"]["tensors_in_two_files"]
            raise ParityError(f"{out}/base: {', '.join(bad[:3]) or 'its index'} read back other than the base's "
                              f"+ update (see {out / 'export_report.json'})")
        if isinstance(account["logits"], dict) and not account["logits"]["ok"]:
            from finetune.export.proof import failure

            raise ParityError(failure(out, account["logits"], account["logits"]["furthest"], "export_report.json"))
    if parts["text"]:
        log(f"{server}: {report['modules']} LoRA modules, rank {rank}, update max rel diff "
            f"{report['max_rel_update_diff']:.2g} -> {out}")
    log(f"serve with: {command}")
    return report


def _linked_base(adapter: Path, out: Path, base: str, family, keys: dict, want: dict, config: dict, pairs: dict,
                 attach: Path | None, link: str, log: Callable[[str], None]) -> dict:
    """OUT/base as a linked model folder, read back tensor by tensor and proven on the probe."""
    from finetune.export.merge_low_memory import does_not_fit

    folder = out / "base"
    account = write_linked(folder, base, keys, want, config, pairs, link=link, log=log)
    account["tensor_check"] = check_linked(folder, base, keys, want, config, pairs)
    if does_not_fit(base, log=log):  # the logits proof holds the model three times in fp32
        account["logits"] = "skipped: the fp32 model would not fit in memory; the per-tensor check stands"
    else:
        account["logits"] = prove_linked(adapter, folder, base, family, keys, want, config, pairs, attach)
    logits = account["logits"]
    linked = sum(1 for f in account["files"] if f["how"].endswith("link"))
    log(f"linked model: {len(want)} projection tensors updated in {folder}; {account['bytes_written'] / 2**20:.2f} "
        f"MiB written ({100 * account['added_share_of_base']:.2f} % of the base's weights), {linked} of "
        f"{len(account['files'])} weight files linked"
        + (f"; probe logits vs base+adapter: {logits['max_abs_diff']:.3g} (adapter moves them by "
           f"{logits['lora_effect']:.3g})" if isinstance(logits, dict) else ""))
    return account


def _linked_checks(account: dict, serve_base: str, modules: int) -> list[str]:
    check = account["tensor_check"]
    lines = [f"{serve_base}: {modules} vision/audio LoRA modules merged into the weight files that hold them; every "
             f"other file is a {account['link']} link to the base's; no tensor in two files "
             f"({check['tensors']} tensors read back, mismatched: {check['mismatched_tensors'] or 'none'})"]
    logits = account["logits"]
    if isinstance(logits, dict):
        lines.append(f"{serve_base} + this adapter reproduce base + source adapter on a text/image/audio probe "
                     f"(max |dlogits| {logits['max_abs_diff']:.3g}, merge {logits['merge_diff']:.3g}, "
                     f"reload {logits['reload_diff']:.3g}; the adapter moves them by {logits['lora_effect']:.3g})")
    return lines
