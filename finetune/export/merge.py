"""Merge an adapter into its base in memory, and prove the saved folder on a probe's logits.

`merge_adapter` never merges into 4-bit weights (PEFT would re-quantize and the logits drift
by more than the LoRA moves them): the base is loaded in fp32, merged, rounded to the output
dtype and saved; then the saved folder is reloaded and its logits compared with base+adapter
on a probe holding text, an image and audio, so every path of the model is exercised.

Three numbers make the proof, all fp32 logits on the probe:
- merge_diff: merged in memory vs base+adapter (the merge itself; ~1e-6),
- reload_diff: the reloaded folder vs the in-memory merge rounded to the output dtype
  (saving, key names, tied embeddings; ~0),
- max_abs_diff: the reloaded folder vs base+adapter (what a user sees; for bf16 this includes
  the rounding of the weights, reported as rounding_diff),
next to lora_effect, how far the adapter moves the logits at all. Logits of a deep network
amplify fp32 reassociation, so merge_diff may also reach MERGE_SHARE of lora_effect; what
pins every module exactly is the fourth check, `check_tensors`: each tensor read back from
the saved files equals the base's file plus that module's update, rounded once.

`merge_streaming` (`--low-memory`, in `finetune.export.merge_low_memory`) does the merge itself tensor by
tensor from the files, never holding the model, and proves it with the same per-tensor check;
`merge_adapter` hands over to it when asked or when the fp32 model would not fit in memory.
Adapters are combined into one adapter in `finetune.export.combine`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.export.merge_low_memory import (
    check_tensors,
    compare_keys,
    does_not_fit,
    keep_generation_config,
    merge_dtype,
    merge_streaming,
    merge_targets,
    refuse_quantized,
    set_saved_dtype,
    weight_files,
)
from finetune.model.adapters import (
    ParityError,
    delta,
    lora_pairs,
    model_class,
    open_adapter,
    prepare_out,
    read_adapter,
    write_report,
)
from finetune.model.families import family_config
from finetune.model.load import DTYPES

TOLERANCE = 1e-4  # on fp32 logits, times max(1, max |logits|)
MERGE_SHARE = 1e-2  # merged vs base+adapter may also differ by this share of the LoRA effect


# ---------------------------------------------------------------------------------------------
# Probe and logits


def probe_batch(base: str):
    """(processor, batch): one user turn with a generated image, a 0.5 s sine and a question."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    yy, xx = np.mgrid[0:96, 0:96]
    image = Image.fromarray(np.stack([xx * 2, yy * 2, (xx + yy) % 256], -1).astype("uint8"))
    rate = processor.feature_extractor.sampling_rate
    t = np.arange(rate // 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype("float32")
    conversation = [{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "audio", "audio": tone},
        {"type": "text", "text": "What do you see and hear?"}]}]
    batch = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    return processor, dict(batch)


def load_base(base: str, family) -> torch.nn.Module:
    return model_class(family).from_pretrained(base, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict, attach: Path | None = None) -> torch.Tensor:
    """fp32 logits of `model`, with the adapter folder `attach` loaded on top when given."""
    from peft import PeftModel

    if attach is None:
        return model(**batch).logits.float()
    peft_model = PeftModel.from_pretrained(model, str(attach)).eval()
    try:
        return peft_model(**batch).logits.float()
    finally:
        peft_model.unload()  # puts the plain modules back into `model`


# ---------------------------------------------------------------------------------------------
# Save and prove


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def save_checked(model, out: Path, dtype: torch.dtype, base: str, batch: dict, ref: torch.Tensor,
                 family, *, lora_effect: float, attach: Path | None = None) -> dict:
    """Save a merged fp32 `model` as `dtype` and prove the folder; see the module docstring."""
    from transformers import AutoProcessor

    tol = TOLERANCE * max(1.0, float(ref.abs().max()))
    # Merged vs unmerged differ by fp32 reassociation only, but a deep network amplifies that
    # (a 12-layer random-weight model reaches 7e-3 of a 4.8 LoRA effect): allow a small share
    # of the effect. Each module's update is pinned exactly by `check_tensors`.
    merge_tol = max(tol, MERGE_SHARE * lora_effect)
    exact = logits(model, batch, attach)
    if dtype != torch.float32:
        # Round what the file will hold (parameters and persistent buffers), in place. Not
        # model.to(dtype): that also rounds non-persistent buffers (rotary tables) that a reload
        # recomputes in fp32.
        with torch.no_grad():
            for t in model.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.to(dtype))
        rounded = logits(model, batch, attach)
    else:
        rounded = exact
    model.to(dtype)
    set_saved_dtype(model.config, dtype)
    model.save_pretrained(out)
    # A fresh copy of the base's processor: the probe's left padding enabled on its tokenizer.
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    keep_generation_config(base, out)
    model.to("meta")  # frees the weights before the reload: a 12B in fp32 is 48 GB
    reloaded = model_class(family).from_pretrained(out, dtype=torch.float32).eval()
    again = logits(reloaded, batch, attach)
    report = {
        "tolerance": tol,
        "merge_tolerance": merge_tol,
        "merge_diff": _max_diff(exact, ref),
        "rounding_diff": _max_diff(rounded, ref),
        "reload_diff": _max_diff(again, rounded),
        "max_abs_diff": _max_diff(again, ref),
        "tied_embeddings": reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight,
    }
    report["ok"] = report["merge_diff"] <= merge_tol and report["reload_diff"] <= tol
    return report


def _finish(report: dict, out: Path, name: str, what: str, log: Callable[[str], None]) -> dict:
    """Write the report, log its summary, and raise if the proof failed."""
    write_report(out, name, report)
    # Each figure next to the bound it is held to, and what the saved dtype's rounding adds on top
    # (bf16 weights move logits by far more than the merge itself: that is not a failure).
    rounding = report["max_abs_diff"] - report["merge_diff"]
    log(f"{what}: {'ok' if report['ok'] else 'FAILED'}: merge {report['merge_diff']:.3g} (allowed "
        f"{report['merge_tolerance']:.3g}), reload {report['reload_diff']:.3g} (allowed {report['tolerance']:.3g}); "
        f"saved model vs base+adapter {report['max_abs_diff']:.3g}"
        + (f", of which rounding to {report.get('dtype', 'the dtype')} {rounding:.3g}" if rounding > 0 else "")
        + f"; the adapter moves logits by up to {report['lora_effect']:.3g}")
    if "mismatched_tensors" in report:
        log(f"{what}: {report['tensors'] - len(report['mismatched_tensors'])} of {report['tensors']} tensors read "
            "back equal base + update rounded once to the dtype")
    log(f"report: {out / name}")
    if not report["ok"]:
        odd = report.get("mismatched_tensors")
        raise ParityError(f"{out}: the saved model does not reproduce base+adapter"
                          + (f" ({', '.join(odd[:3])} differ)" if odd else "") + f" (see {out / name})")
    return report


# ---------------------------------------------------------------------------------------------
# Merge


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
                  allow_pickle: bool = False, low_memory: bool | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Merge `adapter` into its base on full-precision weights, save a HF folder in `dtype`, prove it.

    `low_memory`: merge tensor by tensor from the base's safetensors files (`merge_streaming`)
    instead of loading the whole model in fp32; None picks it when the fp32 model would not
    fit in the memory available now. `log` receives the summary lines (None: silent)."""
    from peft import PeftModel

    log = log or (lambda _: None)
    target = merge_dtype(dtype)
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_quantized(base, cfg)
    if low_memory is None:
        low_memory = does_not_fit(base, log=log)
    if low_memory:
        return merge_streaming(adapter, out, base=base, dtype=dtype, allow_pickle=allow_pickle, log=log)
    out = prepare_out(out, adapter, base)
    _, batch = probe_batch(base)

    pairs = lora_pairs(state)
    peft_model = PeftModel.from_pretrained(load_base(base, family), str(adapter)).eval()
    ref = logits(peft_model, batch)
    with peft_model.disable_adapter():
        plain = logits(peft_model, batch)
    merged = peft_model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN weights
    del peft_model
    report = {"adapter": str(adapter), "base": base, "out": str(out), "dtype": dtype,
              "probe_tokens": int(batch["input_ids"].shape[1]), "probe_parts": ["text", "image", "audio"],
              "lora_modules": len(pairs), "lora_effect": _max_diff(ref, plain)}
    report.update(save_checked(merged, out, target, base, batch, ref, family,
                               lora_effect=report["lora_effect"]))
    report["checkpoint_keys"] = compare_keys(base, out)
    report["ok"] = report["ok"] and report["checkpoint_keys"].get("same", True)
    try:  # the per-tensor proof needs the base's safetensors files (not a hub id, not .bin)
        keys = weight_files(base)
        want = merge_targets(adapter, keys, family, cfg, pairs)
    except UserError as e:
        report["tensor_check"] = f"skipped: {e.what}"
    else:
        report.update(check_tensors(out, keys, want, config, pairs, target))
        report["ok"] = report["ok"] and not report["mismatched_tensors"]
    return _finish(report, out, "merge_report.json", "merge", log)


def merge_modules(adapter: Path, modules: list[str], text_adapter: Path, out: Path, *, base: str,
                  allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Write `base` with the LoRA of `modules` merged into it (saved in the base's own dtype), and
    prove that it plus `text_adapter` (the rest of the LoRA) reproduces base + `adapter`. `log`
    receives the summary lines (None: silent)."""
    from peft import PeftModel

    log = log or (lambda _: None)
    family, cfg = family_config(base)
    refuse_quantized(base, cfg)
    dtype = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else getattr(torch, str(cfg.dtype or "float32"))
    if does_not_fit(base, log=log):  # per-tensor proof only: the logits proof needs the whole model twice
        name = {v: k for k, v in DTYPES.items()}[dtype]
        return merge_streaming(adapter, out, base=base, dtype=name, allow_pickle=allow_pickle, modules=modules,
                               log=log)
    config, state = read_adapter(adapter, allow_pickle=allow_pickle)
    pairs = lora_pairs(state)
    _, batch = probe_batch(base)
    peft_model = PeftModel.from_pretrained(load_base(base, family), str(adapter)).eval()
    ref = logits(peft_model, batch)
    with peft_model.disable_adapter():
        plain = logits(peft_model, batch)
    model = peft_model.unload()
    del peft_model
    with torch.no_grad():
        for m in modules:
            weight = model.get_submodule(m).weight
            weight += delta(config, m, *pairs[m]).to(weight.dtype)
    report = {"base": base, "out": str(out), "dtype": str(dtype).removeprefix("torch."), "merged_modules": modules,
              "lora_effect": _max_diff(ref, plain)}
    report.update(save_checked(model, out, dtype, base, batch, ref, family, lora_effect=report["lora_effect"],
                               attach=text_adapter))
    return _finish(report, out, "merge_report.json", "merged projections", log)
