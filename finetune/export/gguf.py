"""llama.cpp: a LoRA GGUF written with the `gguf` package and read back before it is called done.

llama.cpp applies `lora_b @ (lora_a @ x) * alpha / r` with one file-wide alpha and r taken
from each tensor's shape; it has no rsLoRA flag and no per-module alpha. So the file's alpha
is the most common scale times rank, and any module whose PEFT scale differs (alpha
patterns, rsLoRA with mixed ranks) gets the ratio folded into its B. For a plain adapter
nothing is folded; an rsLoRA adapter of one rank gets alpha·sqrt(r), like llama.cpp's own
converter writes.

On `attention_k_eq_v` layers llama.cpp uses K as V (no attn_v tensor), and K already
carries the LoRA, as in transformers: nothing to add. The vision/audio projections live in
a separate mmproj GGUF that LoRA can't reach, so an adapter with them is refused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from finetune.adapters import (
    ParityError,
    delta,
    lora_pairs,
    max_rel_diff,
    open_adapter,
    prepare_out,
    roles,
    scale,
    write_report,
)
from finetune.errors import UserError
from finetune.export.vllm import refuse_unservable

GGUF_ARCH = {"gemma4_unified": "gemma4"}  # llama.cpp converts gemma4_unified text weights as gemma4
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Max relative difference of B·A·scale read back from the file vs PEFT's update, per outtype.
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


def _encode(x: np.ndarray, outtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor, and the type actually written."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if outtype == "f32":
        return x.astype(np.float32), None, "f32"
    if outtype == "f16":
        return x.astype(np.float16), None, "f16"
    if outtype == "bf16":
        return gguf.quants.quantize(x, Q.BF16), Q.BF16, "bf16"
    try:
        return gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0, "q8_0"
    except gguf.quants.QuantError:  # rows must be a multiple of 32 values: lora_b rows are r long
        return x.astype(np.float16), None, "f16"


def export_gguf(adapter: str | Path, out: str | Path, *, outtype: str = "f32", base: str | None = None,
                allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> dict:
    """Write OUT/adapter.gguf for llama.cpp (`--lora`), then prove it against the adapter."""
    import gguf

    log = log or (lambda _: None)
    if outtype not in OUTTYPES:
        raise UserError("--outtype", f"{outtype!r} is not a GGUF LoRA type", f"Use one of {', '.join(OUTTYPES)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_unservable(config, adapter, "llama.cpp")
    pairs = lora_pairs(state)
    parts = roles(family, pairs)
    if parts["media"]:
        raise UserError(str(adapter), f"LoRA on the vision/audio projections ({', '.join(parts['media'])}) can't "
                        "go into a llama.cpp LoRA: llama.cpp keeps them in a separate mmproj GGUF that LoRA "
                        "can't target", "Run `finetune merge ADAPTER MERGED` and convert MERGED with llama.cpp's "
                        "convert_hf_to_gguf.py (once plain, once with --mmproj for the projector file)")
    names = {m: family.gguf_name(m) for m in pairs}
    if None in names.values() or cfg.model_type not in GGUF_ARCH:
        missing = [m for m, n in names.items() if n is None] or [cfg.model_type]
        raise UserError(str(adapter), f"no llama.cpp tensor for {', '.join(missing[:3])}",
                        "Use --format merged and convert the merged model with llama.cpp's converter")
    out = prepare_out(out, adapter, base)
    path = out / "adapter.gguf"

    # The file's alpha is the most common scale·r, so most modules need no folding; as the
    # float32 llama.cpp reads, so the folds below are exact against what it computes.
    alphas = Counter(float(np.float32(scale(config, m, A.shape[0]) * A.shape[0])) for m, (A, _) in pairs.items())
    alpha = alphas.most_common(1)[0][0]
    writer = gguf.GGUFWriter(path, arch=GGUF_ARCH[cfg.model_type])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    written_types, folded = set(), []
    for m, (A, B) in pairs.items():
        r = A.shape[0]
        fold = scale(config, m, r) / (alpha / r)
        if abs(fold - 1) > 1e-6:  # below that it is float32 rounding of alpha, still applied
            folded.append(m)
        for suffix, x in (("lora_a", A.float()), ("lora_b", B.float() * fold)):
            data, raw_dtype, kind = _encode(x.numpy(), outtype)
            writer.add_tensor(f"{names[m]}.weight.{suffix}", data, raw_dtype=raw_dtype)
            written_types.add(kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    # Read the file back as llama.cpp would and rebuild every update from it.
    reader = gguf.GGUFReader(path)
    meta = {k: reader.fields[k].contents() for k in
            ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    want_meta = {"general.architecture": GGUF_ARCH[cfg.model_type], "general.type": "adapter",
                 "adapter.type": "lora"}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    expected = {f"{names[m]}.weight.{s}" for m in pairs for s in ("lora_a", "lora_b")}
    worst = 0.0
    for m, (A, B) in pairs.items():
        a, b = (tensors[f"{names[m]}.weight.{s}"] for s in ("lora_a", "lora_b"))
        got = (b.astype(np.float64) @ a.astype(np.float64)) * (meta["adapter.lora.alpha"] / a.shape[0])
        worst = max(worst, max_rel_diff(torch.from_numpy(got), delta(config, m, A, B).double()))
    ok = (all(meta[k] == v for k, v in want_meta.items()) and set(tensors) == expected
          and abs(meta["adapter.lora.alpha"] - alpha) <= 1e-6 * abs(alpha) and worst <= TOLERANCE[outtype])
    report = {
        "format": "gguf", "adapter": str(adapter), "base": base, "out": str(out), "file": str(path),
        "outtype": outtype, "tensor_types": sorted(written_types), "metadata": meta, "tensors": len(tensors),
        "folded_scale_into_b": folded, "max_rel_update_diff": worst, "tolerance": TOLERANCE[outtype],
        "checks": [
            "metadata: general.architecture, general.type=adapter, adapter.type=lora, adapter.lora.alpha",
            f"tensors: blk.N.<proj>.weight.lora_a/lora_b for all {len(pairs)} LoRA modules, nothing else",
            f"shapes: every LoRA tensor fits a module of {base}",
            f"update B·A·alpha/r read back from the file equals PEFT's B·A·scale (max rel diff {worst:.2g})",
        ],
        "use_with": f"llama-cli -m BASE.gguf --lora {path}  (BASE.gguf: {base} converted with llama.cpp's "
                    "convert_hf_to_gguf.py)",
    }
    write_report(out, "export_report.json", report)
    if not ok:
        raise ParityError(f"{path}: read-back check failed (see {out / 'export_report.json'})")
    log(f"gguf: {len(pairs)} LoRA modules ({outtype}), alpha {alpha:g}, update max rel diff {worst:.2g} -> {path}")
    return report
