"""Reading (and loading onto a base) PEFT LoRA adapters, and the update every merge and export
is checked against.

An adapter is a PEFT folder: `adapter_config.json` + `adapter_model.safetensors`, tensors
named by runtime module (`base_model.model.<module>.lora_A.weight`, A is [r, in], B is
[out, r]). `delta()` is PEFT's update for one module, B @ A * scale, with the per-module
alpha/rank patterns and rsLoRA applied the way PEFT applies them; tests hold it against
PEFT's own `get_delta_weight`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from data_tools.locations import looks_like_hub_id
from finetune.errors import UserError
from finetune.model.families import Family, family_config
from finetune.model.load import quiet_loading

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PEFT's prefix in front of runtime module names


class ParityError(RuntimeError):
    """A written artifact does not reproduce the adapter: a bug in finetune (exit 1), not bad input."""


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json as a dict, tensors), or a UserError naming what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UserError(str(p), "adapter folder not found",
                        "Pass the folder that holds adapter_config.json, e.g. <output_dir>/adapter")
    if not p.is_dir():
        raise UserError(str(p), "is a file, not an adapter folder", "Pass the folder that holds adapter_config.json")
    cfg_path = p / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(str(p), "no adapter_config.json in this folder",
                        "Pass a PEFT adapter folder, e.g. <output_dir>/adapter")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(str(cfg_path), f"not valid JSON ({e})", "Restore the file from the training run") from None
    _check_config(config, cfg_path)

    weights, pickled = p / WEIGHTS_FILE, p / PICKLE_FILE
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state, source = load_file(weights), weights
        except (SafetensorError, OSError) as e:
            raise UserError(str(weights), f"corrupt or truncated safetensors file ({e})",
                            "Copy the adapter again or re-save it from the training checkpoint") from None
    elif pickled.is_file():
        if not allow_pickle:
            raise UserError(str(pickled), "pickle-only adapter: loading a .bin file can run code hidden in it",
                            "Re-save it as safetensors (save_pretrained(..., safe_serialization=True)), "
                            "or pass --allow-pickle if you trust where it came from")
        # weights_only refuses arbitrary objects even when the user allows .bin files.
        state, source = torch.load(pickled, map_location="cpu", weights_only=True), pickled
    else:
        raise UserError(str(p), "no adapter_model.safetensors in this folder",
                        "Copy the whole adapter folder, weights included")
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(str(source), f"tensor {key} holds NaN or inf (training diverged)",
                            "Use an earlier checkpoint or lower the learning rate")
    lora_pairs(state, where=str(source))  # pairs complete and ranks consistent
    return config, state


def _check_config(config: dict, where: Path) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise UserError(str(where), f"peft_type is {kind!r}; only LoRA adapters can be merged or exported",
                        "Train a LoRA adapter (lora: section of the recipe)")
    if config.get("use_dora"):
        raise UserError(str(where), "DoRA adapter: vLLM, SGLang and llama.cpp can't serve DoRA and finetune "
                        "does not merge it", "Retrain without use_dora, or merge it with PEFT's merge_and_unload")
    if config.get("target_parameters"):
        raise UserError(str(where), "adapter targets raw parameters (target_parameters)",
                        "Only LoRA on linear modules can be merged or exported")
    if config.get("fan_in_fan_out"):
        raise UserError(str(where), "fan_in_fan_out adapters (Conv1D bases) are not Gemma 4 adapters",
                        "Pass an adapter trained on a gemma4_unified base")


def module_of(key: str) -> str:
    """Runtime module name of a tensor key: strips PEFT's prefix and the .lora_X.weight tail."""
    key = key.removeprefix(PREFIX)
    return re.sub(r"\.lora_[AB](\.[^.]+)?\.weight$", "", key)


def lora_pairs(state: dict[str, torch.Tensor], *, where: str = "adapter") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{runtime module: (A [r, in], B [out, r])} for every LoRA module, in state-dict order."""
    a, b = {}, {}
    for key, t in state.items():
        if ".lora_A." in key:
            a[module_of(key)] = t
        elif ".lora_B." in key:
            b[module_of(key)] = t
    if a.keys() != b.keys():
        odd = sorted(a.keys() ^ b.keys())[0]
        raise UserError(where, f"LoRA module {odd} has only one of lora_A/lora_B", "The adapter file is incomplete")
    pairs = {}
    for m in a:
        if a[m].ndim != 2 or b[m].ndim != 2 or a[m].shape[0] != b[m].shape[1]:
            raise UserError(where, f"LoRA module {m}: lora_A {list(a[m].shape)} and lora_B {list(b[m].shape)} "
                            "do not form a rank-r pair", "The adapter file is damaged")
        pairs[m] = (a[m], b[m])
    return pairs


def scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha/r, or alpha/sqrt(r) with rsLoRA; alpha from alpha_pattern."""
    from peft.utils.other import get_pattern_key  # PEFT's own pattern matching, so the rules never drift

    patterns = config.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def delta(config: dict, module: str, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The weight update PEFT adds to `module`: B @ A * scale, in fp32."""
    return (B.float() @ A.float()) * scale(config, module, A.shape[0])


def base_of(adapter_path: str | Path, config: dict, base_override: str | None = None) -> str:
    """The base model to use: --base if given, else the one the adapter was trained on."""
    base = base_override or config.get("base_model_name_or_path")
    if not base:
        raise UserError(str(adapter_path), "the adapter does not name its base model",
                        "Pass --base with the folder or hub id it was trained on")
    if Path(base).exists() or looks_like_hub_id(base):
        return base
    named = "--base" if base_override else f"{adapter_path}/{CONFIG_FILE} (base_model_name_or_path)"
    raise UserError(base, f"base model folder not found (named by {named})",
                    "Pass --base with the base model folder or hub id")


def model_class(family: Family):
    import transformers

    return getattr(transformers, family.model_class)


def check_base(adapter_path: str | Path, state: dict[str, torch.Tensor], base: str):
    """(family, config) of `base` after proving every LoRA tensor fits a module of it."""
    family, cfg = family_config(base)
    # The skeleton on the meta device has the real module names and shapes and costs no memory.
    with torch.device("meta"):
        modules = dict(model_class(family)(cfg).named_modules())
    for module, (A, B) in lora_pairs(state, where=str(adapter_path)).items():
        target = modules.get(module)
        fix = "Pass --base with the model this adapter was trained on"
        if not isinstance(target, torch.nn.Linear):
            raise UserError(str(adapter_path), f"adapter for another base: {PREFIX}{module}.lora_A.weight targets "
                            f"{module}, which is not a linear layer of {base}", fix)
        if A.shape[1] != target.in_features:
            raise UserError(str(adapter_path), f"adapter for another base: {PREFIX}{module}.lora_A.weight has "
                            f"shape {list(A.shape)} but {module} of {base} takes {target.in_features} inputs", fix)
        if B.shape[0] != target.out_features:
            raise UserError(str(adapter_path), f"adapter for another base: {PREFIX}{module}.lora_B.weight has "
                            f"shape {list(B.shape)} but {module} of {base} gives {target.out_features} outputs", fix)
    return family, cfg


def open_adapter(path: str | Path, *, base: str | None = None, allow_pickle: bool = False):
    """(config, state, base, family, base config): the adapter read and proven to fit its base
    (or `base`), before anything large is loaded."""
    config, state = read_adapter(path, allow_pickle=allow_pickle)
    base = base_of(path, config, base)
    family, cfg = check_base(path, state, base)
    refuse_unexportable(path, state, cfg)
    return config, state, base, family, cfg


UNEXPORTABLE = ("vllm and sglang serve LoRA on linear layers only and would drop it; Gemma ties the token "
                "embedding to the output head, so merged, gguf and ollama would change both")


def refuse_unexportable(path: str | Path, state: dict[str, torch.Tensor], cfg) -> None:
    """LoRA no format carries exactly (on an embedding, or on an output head tied to one) is
    refused before anything is written, by every export (training refuses such targets too)."""
    odd = sorted({k.removeprefix(PREFIX).split(".lora_embedding_")[0] for k in state if ".lora_embedding_" in k})
    kind = "an embedding"
    if not odd and getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        odd, kind = sorted({m for m in lora_pairs(state, where=str(path)) if m.split(".")[-1] == "lm_head"}), \
            "the output head, tied to the token embedding"
    if odd:
        raise UserError(str(path), f"LoRA on {', '.join(odd)} ({kind}): no export carries it exactly ({UNEXPORTABLE})",
                        "Retrain with LoRA on linear layers only (lora.targets: attention, mlp, vision, audio)")


def load_adapter(model, adapter: str, *, is_trainable: bool = False, allow_pickle: bool = False):
    """base + adapter; every problem with the folder (missing, pickle, corrupt, NaN) is a UserError."""
    from peft import PeftModel

    read_adapter(adapter, allow_pickle=allow_pickle)
    try:
        with quiet_loading():
            return PeftModel.from_pretrained(model, adapter, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(adapter, f"does not fit this base ({str(e).splitlines()[0][:200]})",
                        "Use the base the adapter was trained on (see adapter_config.json)") from None


def roles(family: Family, modules) -> dict[str, list[str]]:
    """Split LoRA modules into text (attention/MLP), media (vision/audio projections) and other."""
    out: dict[str, list[str]] = {"text": [], "media": [], "other": []}
    for m in modules:
        if any(re.fullmatch(family.role_patterns[r], m) for r in ("attention", "mlp")):
            out["text"].append(m)
        elif any(re.fullmatch(family.role_patterns[r], m) for r in ("vision", "audio")):
            out["media"].append(m)
        else:
            out["other"].append(m)
    return out


def prepare_out(out: str | Path, *inputs: str | Path) -> Path:
    """An empty output folder that is none of the inputs (stale shards would poison a reload)."""
    out = Path(out)
    for src in inputs:
        if src and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UserError(str(out), "the output folder is one of the inputs", "Choose a new output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(str(out), "output folder exists and is not empty", "Choose a new folder or delete this one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|: one number that means the same for any tensor's scale."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30))


def write_report(out: Path, name: str, report: dict) -> None:
    (out / name).write_text(json.dumps(report, indent=2, default=str) + "\n")
