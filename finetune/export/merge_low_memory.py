"""Merging from the base's safetensors files: the low-memory merge and the per-tensor proof.

A merge that never holds the model: the base's checkpoint files (index or single file) are
read tensor by tensor, each LoRA module's target found through transformers' own load-time
renaming of checkpoint keys to runtime names, W + B·A·scale computed in fp32 and written into
shards (`merge_streaming`, a.k.a. `--low-memory`). `check_tensors` reads a written folder back
and holds every tensor against the base's file plus its update, rounded once: the proof of
this merge, and the fourth check of the in-memory one (`finetune.export.merge`), which also uses
`does_not_fit` to pick this path by itself when the fp32 model would not fit in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from finetune.errors import UserError
from finetune.model.adapters import (
    ParityError,
    delta,
    lora_pairs,
    model_class,
    open_adapter,
    prepare_out,
    write_report,
)
from finetune.model.load import DTYPES

SHARD_BYTES = 2 * 2**30  # output shard size: with one fp32 tensor, the streaming merge's peak memory


# ---------------------------------------------------------------------------------------------
# The base checkpoint


def refuse_quantized(base: str, cfg) -> None:
    """A pre-quantized checkpoint (4-bit, 8-bit, fp8…) has no full-precision weights to merge
    into; merging into quantized weights would re-round them and lose the update."""
    quant = getattr(cfg, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UserError(base, f"is a pre-quantized checkpoint ({method}); a merge needs the full-precision "
                        "weights", "Pass --base with the original bf16 model the adapter was trained from")


def tensor_files(folder: str | Path) -> dict[str, Path] | None:
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
    files = tensor_files(folder)
    return None if files is None else set(files)


def compare_keys(base: str, out: Path) -> dict:
    """Whether the saved folder `out` stores the same tensor names as `base` (a few of each
    difference listed); unchecked when the base is not a local safetensors folder."""
    want, got = _checkpoint_keys(base), _checkpoint_keys(out)
    if want is None:
        return {"checked": False, "why": "the base is not a local safetensors folder"}
    return {"checked": True, "same": want == got, "missing": sorted(want - got)[:5], "extra": sorted(got - want)[:5]}


def keep_generation_config(base: str | Path, out: Path) -> None:
    """Every exported model keeps the base's own generation_config.json (sampling defaults, stop
    tokens): a copy of the file, not what transformers would regenerate from the config."""
    src = Path(base) / "generation_config.json"
    if src.is_file():
        shutil.copy2(src, out / "generation_config.json")


def weight_files(base: str) -> dict[str, Path]:
    """{tensor name: file} of the base, or a UserError: merging from files needs them on local disk."""
    files = tensor_files(base)
    if files is None:
        raise UserError(base, "the low-memory merge reads the base's safetensors files from a local folder, and "
                        "this base has none", "Download the base first (`hf download ID --local-dir DIR`) and "
                        "pass --base DIR, or merge without --low-memory")
    return files


def runtime_names(family, cfg, keys: list[str]) -> dict[str, str | None]:
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


def merge_targets(adapter: Path, keys: dict[str, Path], family, cfg, pairs: dict) -> dict[str, str]:
    """{checkpoint key: LoRA module merged into it}, for the base's `keys` ({name: file}).

    LoRA tensors name runtime modules; the files may use older names (transformers renames on
    load, e.g. Gemma 4's embed_vision.embedding_projection), so targets are keyed by file name."""
    by_runtime = {r: k for k, r in runtime_names(family, cfg, list(keys)).items()}
    want = {f"{m}.weight": m for m in pairs}
    missing = sorted(set(want) - set(by_runtime))
    if missing:
        raise UserError(str(adapter), f"the base's checkpoint has no tensor for the LoRA module "
                        f"{want[missing[0]]} (a tied or fused weight)", "Merge without --low-memory")
    return {by_runtime[r]: m for r, m in want.items()}


# ---------------------------------------------------------------------------------------------
# Memory: whether the in-memory merge fits


def full_merge_bytes(base: str) -> int | None:
    """What the in-memory merge holds at its peak: the fp32 model plus the bf16/fp32 copy being
    saved and reloaded (about twice the fp32 size). None when the base is not local safetensors."""
    from safetensors import safe_open

    try:
        files = weight_files(base)
    except UserError:
        return None
    n = 0
    for f in dict.fromkeys(files.values()):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return 2 * 4 * n


def available_bytes() -> int:
    """Host memory available now (psutil); tests stand in a small number to force --low-memory."""
    import psutil

    return psutil.virtual_memory().available


def does_not_fit(base: str, *, log: Callable[[str], None] | None = None) -> bool:
    """Whether the in-memory fp32 merge of `base` needs more memory than is available now (the
    decision is logged when it does not fit)."""
    need, have = full_merge_bytes(base), available_bytes()
    if need is None or need <= have:
        return False
    if log:
        log(f"merge: the fp32 merge needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available: "
            "merging tensor by tensor (--low-memory)")
    return True


# ---------------------------------------------------------------------------------------------
# Merge, tensor by tensor, and the per-tensor proof


def merge_dtype(name: str) -> torch.dtype:
    """The torch dtype a merge saves in, by its --dtype name (bf16, fp16, fp32)."""
    if name not in DTYPES:
        raise UserError("--dtype", f"{name!r} is not a merge dtype", f"Use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def set_saved_dtype(config, dtype: torch.dtype) -> None:
    """The saved dtype on the config and its text/vision/audio sub-configs (else these keep the
    fp32 of the merge and the folder says two things)."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype


def check_tensors(out: Path, keys: dict[str, Path], want: dict[str, str], config: dict, pairs: dict,
                  dtype: torch.dtype) -> dict:
    """Read every tensor back from the saved folder `out` and hold it against the base's file:
    a merged weight must be (base + update in fp32) rounded to `dtype` (within one rounding),
    any other tensor the base's own, cast. One tensor in memory at a time.

    Independent of how deep or chaotic the network is (unlike logits), this pins every
    module: a missed, doubled or mis-scaled update fails here."""
    from safetensors import safe_open

    written = tensor_files(out) or {}
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
                    allow_pickle: bool = False, modules: list[str] | None = None,
                    log: Callable[[str], None] | None = None) -> dict:
    """`finetune merge --low-memory`: W + B·A·scale computed in fp32 one tensor at a time, straight
    from the base's safetensors files into shards of at most SHARD_BYTES, so a 12B merges in
    about 3 GiB of RAM instead of ~70 (benchmarks/merge_memory.py).

    The proof is per tensor, read back from the written files: every merged weight equals
    (base + update) in fp32 rounded once to `dtype`, every other tensor equals the base's,
    the key names equal the base's; the report also says how much of each update survives
    the rounding. (The logits proof of the in-memory merge needs the whole model; tests hold
    the two paths equal on the tiny base.) `modules`: merge only these LoRA modules. `log`
    receives the summary lines (None: silent)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor

    log = log or (lambda _: None)
    target = merge_dtype(dtype)
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_quantized(base, cfg)
    keys = weight_files(base)
    if config.get("modules_to_save"):
        raise UserError(str(adapter), f"has modules_to_save ({config['modules_to_save']}); the low-memory "
                        "merge writes LoRA updates only", "Merge without --low-memory")
    out = prepare_out(out, adapter, base)
    pairs = lora_pairs(state)
    if modules is not None:
        pairs = {m: pairs[m] for m in modules}

    want = merge_targets(adapter, keys, family, cfg, pairs)

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
    set_saved_dtype(cfg, target)
    cfg.save_pretrained(out)
    keep_generation_config(base, out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)

    check = check_tensors(out, keys, want, config, pairs, target)
    report = {"adapter": str(adapter), "base": base, "out": str(out), "dtype": dtype, "mode": "low_memory",
              "lora_modules": len(pairs), "shards": len(names), **check,
              "checkpoint_keys": compare_keys(base, out)}
    report["ok"] = not check["mismatched_tensors"] and report["checkpoint_keys"].get("same", True)
    write_report(out, "merge_report.json", report)
    log(f"merge (low memory): {len(pairs)} LoRA updates merged into {len(keys)} tensors, {len(names)} "
        f"shard(s); every tensor read back equals base + update rounded once to {dtype} "
        f"(largest share of an update lost to rounding: {check['update_rounding_rel_error']:.3g})")
    log(f"report: {out / 'merge_report.json'}")
    if not report["ok"]:
        raise ParityError(f"{out}: the written tensors do not equal base + update (see {out / 'merge_report.json'})")
    return report
