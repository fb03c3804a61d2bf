"""Load a base model (hub id or local folder) in NF4 / int8 / full precision, and its processor.

QLoRA on the single backbone: bitsandbytes quantizes the linear layers of the transformer
and the vision/audio projections; the 1 B-parameter embedding (tied lm_head) and the norms
stay in bf16 (we do not call `prepare_model_for_kbit_training`, which would upcast them
to fp32: 4 GB on the 12B).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from data_tools.locations import hub_reachable, in_hub_cache, looks_like_hub_id
from finetune.errors import UserError
from finetune.model.families import Family, family_config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(name: str, device: str) -> torch.dtype:
    """The dtype the model computes in. On the CPU always fp32: bf16 matmuls are slow and lossy
    there, and some ops refuse a mix (the vision embedder's LayerNorm under NF4 did)."""
    if name == "auto" or device == "cpu":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def quiet_loading():
    """Loading without transformers' progress bars, info lines and deprecation warnings: what
    the user needs to know about a load, finetune says itself."""
    import warnings

    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def check_base_path(base: str, allow_pickle: bool) -> None:
    p = Path(base)
    if not p.exists():
        if not looks_like_hub_id(base):
            raise UserError("model.base", f"{base} does not exist",
                            "Give a local model folder or a hub id like google/gemma-4-12B-it")
        if not in_hub_cache(base) and not hub_reachable():  # fail now, not after 30 s of retries
            raise UserError("model.base", f"{base} is not in this machine's hub cache and the hub can't be "
                            "reached", "Connect once to download it, or download it elsewhere and point "
                            "model.base at the folder")
        return  # a hub id: from_pretrained downloads it
    if not p.is_dir():
        raise UserError("model.base", f"{base} is a file, not a model folder",
                        "Point at the folder holding config.json")
    if not (p / "config.json").exists():
        raise UserError("model.base", f"{base} has no config.json", "Point at a transformers model folder")
    has_st = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt"))
    if not has_st and has_pickle and not allow_pickle:
        raise UserError("model.base", f"{base} holds only pickle weights (.bin/.pt)",
                        "Convert them to safetensors, or set model.allow_pickle: true if you trust them")
    if not has_st and not has_pickle:
        raise UserError("model.base", f"{base} has no weights", "Expected model.safetensors")


def base_family(base: str, trust_remote_code: bool = False) -> Family:
    return family_config(base, trust_remote_code=trust_remote_code, where="model.base")[0]


def load_processor(base: str, image_tokens: int | None = None, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    try:
        with quiet_loading():
            proc = AutoProcessor.from_pretrained(base, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError("model.base", f"cannot load the processor of {base} ({str(e).splitlines()[0]})",
                        "The folder needs tokenizer and processor files") from None
    if image_tokens is not None:
        proc.image_processor.max_soft_tokens = image_tokens
    return proc


def load_recipe_base(model_section, device: str | None = None):
    """`load_base` with a recipe's `model:` section (base, quantization, dtype, storage, trust)."""
    m = model_section
    return load_base(m.base, quantization=m.quantization, dtype=m.dtype, device=device,
                     double_quant=m.double_quant, quant_storage=m.quant_storage,
                     trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle)


def load_base(base: str, *, quantization: str = "none", dtype: str = "auto", device: str | None = None,
              double_quant: bool = True, quant_storage: str = "uint8", trust_remote_code: bool = False,
              allow_pickle: bool = False):
    """The base model, frozen, ready for LoRA. Never merges anything."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    check_base_path(base, allow_pickle)
    device = device or default_device()
    cdtype = compute_dtype(dtype, device)
    kwargs = {"trust_remote_code": trust_remote_code, "attn_implementation": "sdpa",
              "use_safetensors": not allow_pickle or None}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=cdtype,
            bnb_4bit_quant_storage=torch.bfloat16 if quant_storage == "bf16" else torch.uint8,
            # lm_head is tied to the embedding: quantizing it would untie and copy 1 B params.
            llm_int8_skip_modules=["lm_head"])
        kwargs["dtype"] = cdtype if cdtype != torch.float32 else torch.bfloat16
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True,
                                                           llm_int8_skip_modules=["lm_head"])
        kwargs["dtype"] = torch.bfloat16 if device == "cuda" else torch.float32
    else:
        kwargs["dtype"] = cdtype
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with quiet_loading():
        model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    if quantization != "none" and device == "cpu":
        # On CPU the unquantized parts compute in fp32 (bf16 matmuls are slow and lossy there).
        _cast_unquantized(model, cdtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def _cast_unquantized(model, dtype: torch.dtype) -> None:
    for p in model.parameters():
        # 4-bit weights stored as bf16 (`model.quant_storage: bf16`) are packed bytes, not numbers
        if p.dtype in (torch.bfloat16, torch.float16, torch.float32) and p.dtype != dtype \
                and type(p).__name__ != "Params4bit":
            p.data = p.data.to(dtype)


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing of each decoder layer; inputs need grads for LoRA to see them."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


@contextlib.contextmanager
def held_out_mode(model):
    """`model.eval()` for a pass on held-out data (eval loss, previews, generation), leaving
    nothing behind: the mode and every RNG state come back as they were, and bitsandbytes' 4-bit
    layers stay in the mode they had. Their eval mode only picks a kernel, and on a CPU with
    AVX512-BF16 it repacks the weight for that kernel for good, so every training step after the
    first eval would compute differently (a run resumed across an eval would not equal a straight
    one). Dropout, the only other mode-dependent layer here, is off during the pass."""
    import random

    import numpy as np

    was = model.training
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    model.eval()
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            m.train(was)
    try:
        yield model
    finally:
        model.train(was)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def unwrap(model, *, peft: bool = False):
    """The transformers model (or, with `peft`, the PEFT model) under every wrapper the loop puts
    around it: DDP/FSDP (`.module`), the loss wrapper (`.model` beside `.objective`), PEFT (LoRA
    layers are injected in place, so the transformers model trains with them)."""
    while True:
        if hasattr(model, "objective") and hasattr(model, "model"):
            model = model.model
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            break
    if not peft and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
