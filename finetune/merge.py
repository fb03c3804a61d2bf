"""Merge an adapter into its base, or combine adapters into one — each result proven on a probe.

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

`merge_streaming` (`--low-memory`) does the merge itself tensor by tensor from the files,
never holding the model, and proves it with the same per-tensor check.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from finetune.adapters import (
    WEIGHTS_FILE,
    ParityError,
    base_of,
    check_base,
    delta,
    family_config,
    lora_pairs,
    max_rel_diff,
    model_class,
    open_adapter,
    prepare_out,
    read_adapter,
    write_report,
)
from finetune.errors import RecipeErrors, UserError
from finetune.schema import build_section, read_yaml
from finetune.schema import field_doc as _f

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


def _set_dtype(config, dtype: torch.dtype) -> None:
    """The saved dtype on the config and its text/vision/audio sub-configs (else these keep the
    fp32 of the merge and the folder says two things)."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype


def _refuse_quantized(base: str, cfg) -> None:
    """A pre-quantized checkpoint (4-bit, 8-bit, fp8…) has no full-precision weights to merge
    into; merging into quantized weights would re-round them and lose the update."""
    quant = getattr(cfg, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UserError(base, f"is a pre-quantized checkpoint ({method}); a merge needs the full-precision "
                        "weights", "Pass --base with the original bf16 model the adapter was trained from")


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
    _set_dtype(model.config, dtype)
    model.save_pretrained(out)
    # A fresh copy of the base's processor: the probe's left padding enabled on its tokenizer.
    AutoProcessor.from_pretrained(base).save_pretrained(out)
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


def _tensor_files(folder: str | Path) -> dict[str, Path] | None:
    """{tensor name: the safetensors file holding it} of a checkpoint folder, from its index or
    its single file's header (None: not a local safetensors folder)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    return None


def _checkpoint_keys(folder: str | Path) -> set[str] | None:
    """Tensor names a checkpoint folder stores (None: not local)."""
    files = _tensor_files(folder)
    return None if files is None else set(files)


def _compare_keys(base: str, out: Path) -> dict:
    want, got = _checkpoint_keys(base), _checkpoint_keys(out)
    if want is None:
        return {"checked": False, "why": "the base is not a local safetensors folder"}
    return {"checked": True, "same": want == got, "missing": sorted(want - got)[:5], "extra": sorted(got - want)[:5]}


def _finish(report: dict, out: Path, name: str, what: str) -> dict:
    write_report(out, name, report)
    print(f"{what}: max |logits(saved) - logits(base+adapter)| = {report['max_abs_diff']:.3g} "
          f"(merge {report['merge_diff']:.3g}, reload {report['reload_diff']:.3g}, "
          f"tolerance {report['tolerance']:.3g}); the adapter moves logits by up to {report['lora_effect']:.3g}")
    if "mismatched_tensors" in report:
        print(f"{what}: {report['tensors'] - len(report['mismatched_tensors'])} of {report['tensors']} tensors read "
              "back equal base + update rounded once to the dtype")
    print(f"report: {out / name}")
    if not report["ok"]:
        raise ParityError(f"{out}: the saved model does not reproduce base+adapter (see {out / name})")
    return report


# ---------------------------------------------------------------------------------------------
# merge


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
                  allow_pickle: bool = False, low_memory: bool | None = None) -> dict:
    """Merge `adapter` into its base on full-precision weights, save a HF folder in `dtype`, prove it.

    `low_memory`: merge tensor by tensor from the base's safetensors files (`merge_streaming`)
    instead of loading the whole model in fp32; None picks it when the fp32 model would not
    fit in the memory available now."""
    from peft import PeftModel

    if dtype not in DTYPES:
        raise UserError("--dtype", f"{dtype!r} is not a merge dtype", f"Use one of {', '.join(DTYPES)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    _refuse_quantized(base, cfg)
    if low_memory is None:
        low_memory = _does_not_fit(base)
    if low_memory:
        return merge_streaming(adapter, out, base=base, dtype=dtype, allow_pickle=allow_pickle)
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
    report.update(save_checked(merged, out, DTYPES[dtype], base, batch, ref, family,
                               lora_effect=report["lora_effect"]))
    report["checkpoint_keys"] = _compare_keys(base, out)
    report["ok"] = report["ok"] and report["checkpoint_keys"].get("same", True)
    try:  # the per-tensor proof needs the base's safetensors files (not a hub id, not .bin)
        keys = _weight_files(base)
        want = _file_targets(adapter, keys, family, cfg, pairs)
    except UserError as e:
        report["tensor_check"] = f"skipped: {e.what}"
    else:
        report.update(check_tensors(out, keys, want, config, pairs, DTYPES[dtype]))
        report["ok"] = report["ok"] and not report["mismatched_tensors"]
    return _finish(report, out, "merge_report.json", "merge")


# ---------------------------------------------------------------------------------------------
# merge, tensor by tensor

SHARD_BYTES = 2 * 2**30  # output shard size: with one fp32 tensor, the streaming merge's peak memory


def _weight_files(base: str) -> dict[str, Path]:
    """{tensor name: file} of the base, or a UserError: merging from files needs them on local disk."""
    files = _tensor_files(base)
    if files is None:
        raise UserError(base, "the low-memory merge reads the base's safetensors files from a local folder, and "
                        "this base has none", "Download the base first (`hf download ID --local-dir DIR`) and "
                        "pass --base DIR, or merge without --low-memory")
    return files


def full_merge_bytes(base: str) -> int | None:
    """What the in-memory merge holds at its peak: the fp32 model plus the bf16/fp32 copy being
    saved and reloaded (about twice the fp32 size). None when the base is not local safetensors."""
    from safetensors import safe_open

    try:
        files = _weight_files(base)
    except UserError:
        return None
    n = 0
    for f in dict.fromkeys(files.values()):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return 2 * 4 * n


def _runtime_names(family, cfg, keys: list[str]) -> dict[str, str]:
    """{checkpoint key: the model's parameter name for it}, through transformers' own load-time
    renaming of this model (the table PEFT also reads). A key that a converter reshapes (fused
    or split on load) maps to nothing: it has no 1:1 runtime tensor to merge into."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time renaming: the names are the same
        return {k: k for k in keys}
    with torch.device("meta"):
        model = model_class(family)(cfg)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out = {}
    for k in keys:
        name, converted = rename_source_key(k, renamings, converters)
        out[k] = None if converted else name
    return out


def _does_not_fit(base: str) -> bool:
    """Whether the in-memory fp32 merge of `base` needs more memory than is available now."""
    need, have = full_merge_bytes(base), _available_bytes()
    if need is None or need <= have:
        return False
    print(f"merge: the fp32 merge needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available: "
          "merging tensor by tensor (--low-memory)")
    return True


def _available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def _file_targets(adapter: Path, keys: dict[str, Path], family, cfg, pairs: dict) -> dict[str, str]:
    """{checkpoint key: LoRA module merged into it}, for the base's `keys` ({name: file}).

    LoRA tensors name runtime modules; the files may use older names (transformers renames on
    load, e.g. Gemma 4's embed_vision.embedding_projection), so targets are keyed by file name."""
    by_runtime = {r: k for k, r in _runtime_names(family, cfg, list(keys)).items()}
    want = {f"{m}.weight": m for m in pairs}
    missing = sorted(set(want) - set(by_runtime))
    if missing:
        raise UserError(str(adapter), f"the base's checkpoint has no tensor for the LoRA module "
                        f"{want[missing[0]]} (a tied or fused weight)", "Merge without --low-memory")
    return {by_runtime[r]: m for r, m in want.items()}


def check_tensors(out: Path, keys: dict[str, Path], want: dict[str, str], config: dict, pairs: dict,
                  dtype: torch.dtype) -> dict:
    """Read every tensor back from the saved folder `out` and hold it against the base's file:
    a merged weight must be (base + update in fp32) rounded to `dtype` (within one rounding),
    any other tensor the base's own, cast. One tensor in memory at a time.

    Independent of how deep or chaotic the network is (unlike logits), this pins every
    module: a missed, doubled or mis-scaled update fails here."""
    from safetensors import safe_open

    written = _tensor_files(out) or {}
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    worst_update, mismatched, base_file = 0.0, [], {}
    for key, src in sorted(keys.items(), key=lambda kv: str(kv[1])):  # file by file
        if src not in base_file:
            base_file.clear()  # one base file open at a time
            base_file[src] = safe_open(src, "pt")
        if key not in written:
            mismatched.append(key)
            continue
        with safe_open(written[key], "pt") as st:
            got = st.get_tensor(key)
        base_t = base_file[src].get_tensor(key)
        if key in want:
            exact = base_t.float() + delta(config, want[key], *pairs[want[key]])
            ok = got.dtype == dtype and bool(((got.float() - exact).abs() <= eps * exact.abs() + tiny).all())
            # How much of the update the rounding lost, as a share of the update's norm (0 in
            # fp32; in bf16 an update much smaller than its weight partly vanishes).
            upd = exact - base_t.float()
            lost = float(torch.linalg.vector_norm(got.float() - base_t.float() - upd))
            worst_update = max(worst_update, lost / max(float(torch.linalg.vector_norm(upd)), 1e-30))
        else:
            ok = torch.equal(got, base_t.to(dtype) if base_t.is_floating_point() else base_t)
        if not ok:
            mismatched.append(key)
    return {"tensors": len(keys), "mismatched_tensors": mismatched[:5], "update_rounding_rel_error": worst_update}


def merge_streaming(adapter: str | Path, out: str | Path, *, base: str | None = None, dtype: str = "bf16",
                    allow_pickle: bool = False, modules: list[str] | None = None) -> dict:
    """`finetune merge --low-memory`: W + B·A·scale computed in fp32 one tensor at a time, straight
    from the base's safetensors files into shards of at most SHARD_BYTES, so a 12B merges in
    about 3 GiB of RAM instead of ~70 (benchmarks/merge_memory.py).

    The proof is per tensor, read back from the written files: every merged weight equals
    (base + update) in fp32 rounded once to `dtype`, every other tensor equals the base's,
    the key names equal the base's; the report also says how much of each update survives
    the rounding. (The logits proof of the in-memory merge needs the whole model; tests hold
    the two paths equal on the tiny base.) `modules`: merge only these LoRA modules."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor

    if dtype not in DTYPES:
        raise UserError("--dtype", f"{dtype!r} is not a merge dtype", f"Use one of {', '.join(DTYPES)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    _refuse_quantized(base, cfg)
    keys = _weight_files(base)
    if config.get("modules_to_save"):
        raise UserError(str(adapter), f"has modules_to_save ({config['modules_to_save']}); the low-memory "
                        "merge writes LoRA updates only", "Merge without --low-memory")
    out = prepare_out(out, adapter, base)
    pairs = lora_pairs(state)
    if modules is not None:
        pairs = {m: pairs[m] for m in modules}
    target = DTYPES[dtype]

    want = _file_targets(adapter, keys, family, cfg, pairs)

    def merged(st, key: str) -> torch.Tensor:
        t = st.get_tensor(key)
        if key in want:
            return (t.float() + delta(config, want[key], *pairs[want[key]])).to(target)
        return t.to(target) if t.is_floating_point() else t

    # Write shards under temporary names; their count is known only at the end.
    shards: list[list[str]] = [[]]
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            save_file(buf, str(out / f"part-{len(shards) - 1}.tmp"), metadata={"format": "pt"})
            shards.append([])
        buf, size = {}, 0

    for f in dict.fromkeys(keys.values()):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                t = merged(st, key)
                if size and size + t.nbytes > SHARD_BYTES:
                    flush()
                buf[key] = t
                shards[-1].append(key)
                size += t.nbytes
    flush()
    shards.pop()  # the empty list opened by the last flush
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for i, name in enumerate(names):
        (out / f"part-{i}.tmp").rename(out / name)
    if len(names) > 1:
        total = sum((out / n).stat().st_size for n in names)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, ks in zip(names, shards) for k in ks}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    cfg = AutoConfig.from_pretrained(base)
    _set_dtype(cfg, target)
    cfg.save_pretrained(out)
    if (Path(base) / "generation_config.json").is_file():
        shutil.copy2(Path(base) / "generation_config.json", out / "generation_config.json")
    AutoProcessor.from_pretrained(base).save_pretrained(out)

    check = check_tensors(out, keys, want, config, pairs, target)
    report = {"adapter": str(adapter), "base": base, "out": str(out), "dtype": dtype, "mode": "low_memory",
              "lora_modules": len(pairs), "shards": len(names), **check,
              "checkpoint_keys": _compare_keys(base, out)}
    report["ok"] = not check["mismatched_tensors"] and report["checkpoint_keys"].get("same", True)
    write_report(out, "merge_report.json", report)
    print(f"merge (low memory): {len(pairs)} LoRA updates merged into {len(keys)} tensors, {len(names)} "
          f"shard(s); every tensor read back equals base + update rounded once to {dtype} "
          f"(largest share of an update lost to rounding: {check['update_rounding_rel_error']:.3g})")
    print(f"report: {out / 'merge_report.json'}")
    if not report["ok"]:
        raise ParityError(f"{out}: the written tensors do not equal base + update (see {out / 'merge_report.json'})")
    return report


def merge_modules(adapter: Path, modules: list[str], text_adapter: Path, out: Path, *, base: str,
                  allow_pickle: bool = False) -> dict:
    """Write `base` with the LoRA of `modules` merged into it (saved in the base's own dtype), and
    prove that it plus `text_adapter` (the rest of the LoRA) reproduces base + `adapter`."""
    from peft import PeftModel

    family, cfg = family_config(base)
    _refuse_quantized(base, cfg)
    dtype = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else getattr(torch, str(cfg.dtype or "float32"))
    if _does_not_fit(base):  # per-tensor proof only: the logits proof needs the whole model twice
        name = {v: k for k, v in DTYPES.items()}[dtype]
        return merge_streaming(adapter, out, base=base, dtype=name, allow_pickle=allow_pickle, modules=modules)
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
    return _finish(report, out, "merge_report.json", "merged projections")


# ---------------------------------------------------------------------------------------------
# combine

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
USES_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
USES_SVD_RANK = ("svd", "ties_svd")


@dataclass
class AdapterRef:
    path: str = _f(doc="adapter folder; a relative path resolves against the spec file's folder")
    weight: float = _f(1.0, "weight of this adapter (negative subtracts)")


@dataclass
class CombineSpec:
    method: Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"] = _f(
        doc="cat and svd blend the updates B·A; linear, ties, dare_* and magnitude_prune weight A and B apart")
    adapters: list[AdapterRef] = _f(doc="the adapters, each {path, weight}")
    output: str = _f(doc="folder for the combined adapter (relative to the spec file's folder)")
    density: float | None = _f(None, "share of values kept by ties/dare/magnitude_prune", lo=0.0, hi=1.0)
    svd_rank: int | None = _f(None, "rank of the svd/ties_svd result (default: the largest input rank)", lo=1)
    base: str | None = _f(None, "base model, when the adapters' own base_model_name_or_path is stale")


def read_spec(path: str | Path) -> CombineSpec:
    """The validated spec, or every problem in it at once (key paths prefixed by the file)."""
    path = Path(path)
    raw = read_yaml(path)
    errors: list[UserError] = []
    spec = build_section(CombineSpec, raw, "", errors)
    if spec is not None:
        spec.adapters = [a for a in spec.adapters if a is not None]  # bad items are already reported
        if not spec.adapters:
            errors.append(UserError("adapters", "is empty", "List at least one {path, weight}"))
        elif all(a.weight == 0 for a in spec.adapters):
            errors.append(UserError("adapters", "all weights are zero", "Give one adapter a nonzero weight"))
    # Rules across keys, read from the raw mapping so they are reported next to any other error.
    method, density = (raw.get("method"), raw.get("density")) if isinstance(raw, dict) else (None, None)
    if method in USES_DENSITY and density is None:
        errors.append(UserError("density", f"is required by {method}", "Add `density: 0.5` (share kept)"))
    if method in USES_DENSITY and density == 0:
        errors.append(UserError("density", "0 prunes every value", "Use a density in (0, 1]"))
    if method in METHODS and method not in USES_DENSITY and density is not None:
        errors.append(UserError("density", f"{method} does not prune",
                                f"Remove it; density applies to {', '.join(USES_DENSITY)}"))
    if method in METHODS and method not in USES_SVD_RANK and isinstance(raw, dict) and "svd_rank" in raw:
        errors.append(UserError("svd_rank", f"{method} does not use svd_rank", "Remove it"))
    if errors:
        raise RecipeErrors([UserError(f"{path}: {e.where}", e.what, e.fix) for e in errors])
    here = path.parent
    for a in spec.adapters:
        a.path = str(here / a.path)
    spec.output = str(here / spec.output)
    return spec


def _max_rank(config: dict) -> int:
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def _lora_host(family, cfg) -> torch.nn.Module:
    """The base's module tree with weightless linears. PEFT's weighted-adapter maths reads only
    the LoRA tensors, so a 12B base need not be loaded to combine its adapters."""
    with torch.device("meta"):
        model = model_class(family)(cfg)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            # A zero-stride CPU view owns one float but has the right shape, so PEFT puts the
            # LoRA tensors it creates next to it on the CPU (a meta weight would make them meta).
            mod.weight = torch.nn.Parameter(torch.zeros(()).expand(mod.out_features, mod.in_features),
                                            requires_grad=False)
    return model


def combine(spec_path: str | Path) -> dict:
    """`finetune combine SPEC.yaml`: PEFT's add_weighted_adapter on the adapters the spec lists."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import save_file

    spec = read_spec(spec_path)
    loaded = [(Path(a.path), a.weight, *read_adapter(a.path)) for a in spec.adapters]
    bases = {}
    for path, _, config, _ in loaded:
        if config.get("modules_to_save"):
            raise UserError(str(path), f"has modules_to_save ({config['modules_to_save']}); combine merges "
                            "LoRA tensors only", "Combine adapters trained without modules_to_save")
        bases.setdefault(base_of(path, config, spec.base), []).append(str(path))
    if len(bases) > 1:
        raise UserError(f"{spec_path}: adapters", f"the adapters name different bases: {bases}",
                        "Combine adapters of one base, or set `base:` if a path is merely stale")
    base = next(iter(bases))
    family, cfg = None, None
    for path, _, _, state in loaded:
        family, cfg = check_base(path, state, base)
    ranks = [_max_rank(config) for _, _, config, _ in loaded]
    if spec.method in EQUAL_RANKS and len(set(ranks)) > 1:
        raise UserError(f"{spec_path}: method", f"{spec.method} needs adapters of equal rank, these have "
                        f"r = {ranks}", f"Use cat (rank = sum of ranks = {sum(ranks)}) or svd "
                        f"(rank = svd_rank, default {max(ranks)}), which accept any ranks")
    out = prepare_out(spec.output, *(p for p, *_ in loaded))

    names = [f"a{i}" for i in range(len(loaded))]
    peft_model = None
    for name, (path, _, _, state) in zip(names, loaded):
        lora = LoraConfig.from_pretrained(str(path))
        lora.target_modules = set(lora_pairs(state))  # exact names: PEFT unions sets, not regexes
        lora.inference_mode = True
        if peft_model is None:
            peft_model = get_peft_model(_lora_host(family, cfg), lora, adapter_name=name)
        else:
            peft_model.add_adapter(name, lora)
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys[:3]  # shapes were checked above
    torch.manual_seed(0)  # dare_* drop values at random: the same spec gives the same adapter
    peft_model.add_weighted_adapter(names, [w for _, w, *_ in loaded], "combined", combination_type=spec.method,
                                    density=spec.density, svd_rank=spec.svd_rank)
    combined = {k: v.contiguous() for k, v in get_peft_model_state_dict(peft_model, adapter_name="combined").items()}
    new = peft_model.peft_config["combined"]
    # PEFT copies the first adapter's rsLoRA flag, but the combined tensors already carry each
    # source's scale and expect scale 1 (alpha = r): with the flag kept they'd be off by sqrt(r).
    new.use_rslora = False
    new.base_model_name_or_path = base
    new.target_modules = sorted({k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in combined})
    new.save_pretrained(str(out))
    save_file(combined, str(out / WEIGHTS_FILE), metadata={"format": "pt"})

    # How far the result is from the weighted sum of the updates: 0 for cat, the truncation
    # error for svd, and for linear/ties/dare a reminder that they are not blends of updates.
    new_config, new_state = read_adapter(out)
    sums: dict[str, torch.Tensor] = {}
    for _, weight, config, state in loaded:
        for m, (A, B) in lora_pairs(state).items():
            sums[m] = sums.get(m, 0) + weight * delta(config, m, A, B)
    distance = max(max_rel_diff(delta(new_config, m, A, B), sums[m]) for m, (A, B) in lora_pairs(new_state).items())
    report = {"method": spec.method, "adapters": [str(p) for p, *_ in loaded], "weights": [w for _, w, *_ in loaded],
              "ranks": ranks, "rank": new.r, "density": spec.density, "base": base, "out": str(out),
              "max_rel_distance_from_weighted_sum_of_updates": distance}
    write_report(out, "combine_report.json", report)
    print(f"combined {len(loaded)} adapters with {spec.method}: rank {new.r} -> {out}")
    if spec.method in EQUAL_RANKS:
        print(f"note: {spec.method} weights A and B separately, so the result is not the weighted sum of the "
              f"updates (relative distance {distance:.3g}); cat and svd blend the updates themselves")
    elif spec.method == "cat" and distance > 1e-5:
        raise ParityError(f"{out}: cat did not reproduce the weighted sum of updates ({distance:.3g})")
    return report
