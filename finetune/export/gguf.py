"""llama.cpp: the language-model LoRA as a GGUF, the projector (mmproj) GGUF with the vision/audio
updates merged in, each read back before it is called done, and the pair proven on a probe.

llama.cpp applies `lora_b @ (lora_a @ x) * alpha / r` with one file-wide alpha and r taken
from each tensor's shape; it has no rsLoRA flag and no per-module alpha. So the file's alpha
is the most common scale times rank, and any module whose PEFT scale differs (alpha
patterns, rsLoRA with mixed ranks) gets the ratio folded into its B. For a plain adapter
nothing is folded; an rsLoRA adapter of one rank gets alpha·sqrt(r), like llama.cpp's own
converter writes.

On `attention_k_eq_v` layers llama.cpp uses K as V (no attn_v tensor), and K already
carries the LoRA, as in transformers: nothing to add. The vision/audio projections live in
the separate mmproj file that LoRA can't reach, so their updates are merged into the
mmproj this export writes (`finetune.export.mmproj`, llama.cpp's converter's layout); it is
written for every adapter, so `serve.command` always has the image and audio path.

The proof: the base with every update read back from adapter.gguf added and every projector
tensor read back from mmproj.gguf put in place runs a text/image/audio probe to base +
adapter's logits (`finetune.export.proof`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from finetune.errors import UserError
from finetune.export.merge_low_memory import does_not_fit, merge_targets, runtime_names, tensor_files
from finetune.export.mmproj import check_mmproj, encode, projector_weights, supported, write_mmproj
from finetune.export.proof import furthest
from finetune.export.vllm import refuse_unservable
from finetune.model.adapters import (
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

GGUF_ARCH = {"gemma4_unified": "gemma4"}  # llama.cpp converts gemma4_unified text weights as gemma4
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Max relative difference of B·A·scale read back from the file vs PEFT's update, per outtype.
TOLERANCE = {"f32": 1e-6, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}
# The probe through the exported files may differ from base + adapter by this share of the
# adapter's effect beyond the merge's own tolerance: the rounding of A, B and the projector to
# the outtype (f32 rounds nothing, so there the proof is as tight as the merge's). Measured on
# the tiny random base, which amplifies rounding far more than a trained model: f16 1.8 %,
# bf16 10.7 %, q8_0 11.7 % (the bf16 merged folder: ~10 %). The values themselves are pinned
# exactly by the read-back checks.
ROUNDING_SHARE = {"f32": 0.0, "f16": 0.05, "bf16": 0.25, "q8_0": 0.25}
PLACEHOLDER = "BASE.gguf"  # serve.model when no --base-gguf is given


def check_base_gguf(path: str, cfg) -> dict:
    """The served model must be a GGUF model of this base's shape, not safetensors or an adapter."""
    import gguf

    p = Path(path)
    if not p.exists():
        raise UserError(path, "base GGUF not found", "Pass the .gguf file of the base model with --base-gguf")
    if p.is_dir() or p.suffix in (".safetensors", ".bin"):
        raise UserError(path, "llama.cpp and Ollama can't load a Gemma 4 (gemma4_unified) model from safetensors; "
                        "the base is needed as a GGUF file", "Convert the base with llama.cpp's "
                        "convert_hf_to_gguf.py and pass the .gguf with --base-gguf")
    try:
        fields = gguf.GGUFReader(p).fields
    except (ValueError, OSError) as e:
        raise UserError(path, f"not a readable GGUF file ({e})", "Pass the .gguf of the base model") from None
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    kind = fields["general.type"].contents() if "general.type" in fields else "model"
    text = cfg.text_config
    want = {"general.architecture": GGUF_ARCH[cfg.model_type], "general.type": "model",
            f"{arch}.block_count": text.num_hidden_layers, f"{arch}.embedding_length": text.hidden_size}
    got = {"general.architecture": arch, "general.type": kind,
           f"{arch}.block_count": fields[f"{arch}.block_count"].contents() if f"{arch}.block_count" in fields else None,
           f"{arch}.embedding_length": (fields[f"{arch}.embedding_length"].contents()
                                        if f"{arch}.embedding_length" in fields else None)}
    bad = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if bad:
        raise UserError(path, "GGUF is not this adapter's base: " + ", ".join(
            f"{k} is {g!r}, expected {w!r}" for k, (g, w) in bad.items()), "Pass the GGUF converted from the base")
    return got


def write_lora(path: Path, arch: str, config: dict, pairs: dict, names: dict[str, str], outtype: str) -> dict:
    """Write the LoRA GGUF of `pairs` (module -> (A, B)) and read it back; returns the report part
    and `updates` ({module: B·A·alpha/r as llama.cpp computes it from the file})."""
    import gguf

    # The file's alpha is the most common scale·r, so most modules need no folding; as the
    # float32 llama.cpp reads, so the folds below are exact against what it computes.
    alphas = Counter(float(np.float32(scale(config, m, A.shape[0]) * A.shape[0])) for m, (A, _) in pairs.items())
    alpha = alphas.most_common(1)[0][0]
    writer = gguf.GGUFWriter(path, arch=arch)
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
            data, raw_dtype, kind = encode(x.numpy(), outtype)
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
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    expected = {f"{names[m]}.weight.{s}" for m in pairs for s in ("lora_a", "lora_b")}
    worst, worst_module, updates = 0.0, None, {}
    for m, (A, B) in pairs.items():
        a, b = (tensors[f"{names[m]}.weight.{s}"] for s in ("lora_a", "lora_b"))
        got = torch.from_numpy((b.astype(np.float64) @ a.astype(np.float64)) * (meta["adapter.lora.alpha"] / a.shape[0]))
        updates[m] = got.float()
        rel = max_rel_diff(got, delta(config, m, A, B).double())
        if worst_module is None or rel > worst:
            worst, worst_module = rel, m
    ok = (meta["general.architecture"] == arch and meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
          and set(tensors) == expected and abs(meta["adapter.lora.alpha"] - alpha) <= 1e-6 * abs(alpha)
          and worst <= TOLERANCE[outtype])
    return {"file": str(path), "tensor_types": sorted(written_types), "metadata": meta, "tensors": len(tensors),
            "folded_scale_into_b": folded, "max_rel_update_diff": worst, "worst_module": worst_module,
            "alpha": alpha, "ok": ok, "updates": updates}


def _prove(adapter: Path, base: str, family, cfg, config: dict, pairs: dict, updates: dict, mmproj: Path | None,
           outtype: str) -> dict:
    """The probe through the base + the updates read back from adapter.gguf + the projector read
    back from mmproj.gguf, vs base + adapter (see the module docstring)."""
    from finetune.export.proof import logits_with, max_diff, reference

    ref = reference(base, family, adapter)
    replace = {}
    if mmproj is not None:
        weights = projector_weights(mmproj, cfg)
        names = runtime_names(family, cfg, list(weights))
        replace = {names[k]: t for k, t in weights.items()}
    got = logits_with(base, family, ref.batch, add=updates, replace=replace)
    if outtype == "f32":
        exact = projector_only = got
    else:
        exact_updates = {m: delta(config, m, *p) for m, p in pairs.items()}
        exact = logits_with(base, family, ref.batch, add=exact_updates)
        # The same exact updates over the projector as written: what the LoRA's own rounding adds
        # is measured against this, apart from the base projector's rounding to the outtype
        # (llama.cpp users get that from the base's own mmproj too; its values are pinned by the
        # read-back checks). On the tiny random base the projector's q8_0 rounding alone moved the
        # probe by more than a quarter of a small adapter's effect.
        # (the projector's own LoRA updates are merged into the written projector: only the text
        # modules' exact updates are added here)
        text_updates = {m: d for m, d in exact_updates.items() if m in updates}
        projector_only = logits_with(base, family, ref.batch, add=text_updates, replace=replace) if replace else exact
    report = {**ref.report(), "merge_diff": max_diff(exact, ref.logits), "rounding_diff": max_diff(got, projector_only),
              "projector_rounding_diff": max_diff(projector_only, exact),
              "max_abs_diff": max_diff(got, ref.logits), "rounding_tolerance": ROUNDING_SHARE[outtype] * ref.lora_effect}
    report["ok"] = report["merge_diff"] <= ref.merge_tol and report["rounding_diff"] <= max(
        ref.tol, report["rounding_tolerance"])
    return report


def export_gguf(adapter: str | Path, out: str | Path, *, outtype: str = "f32", base: str | None = None,
                base_gguf: str | None = None, allow_pickle: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Write OUT/adapter.gguf (`--lora`) and OUT/mmproj.gguf (`--mmproj`) for llama.cpp, prove
    them, and say in `serve` how to run them on the base's GGUF (`base_gguf`, checked)."""
    log = log or (lambda _: None)
    if outtype not in OUTTYPES:
        raise UserError("--outtype", f"{outtype!r} is not a GGUF type", f"Use one of {', '.join(OUTTYPES)}")
    adapter = Path(adapter)
    config, state, base, family, cfg = open_adapter(adapter, base=base, allow_pickle=allow_pickle)
    refuse_unservable(config, adapter, "llama.cpp")
    pairs = lora_pairs(state)
    parts = roles(family, pairs)
    text = {m: pairs[m] for m in parts["text"]}
    names = {m: family.gguf_name(m) for m in text}
    if parts["other"] or None in names.values() or cfg.model_type not in GGUF_ARCH:
        missing = parts["other"] + [m for m, n in names.items() if n is None] or [cfg.model_type]
        raise UserError(str(adapter), f"no llama.cpp tensor for {', '.join(missing[:3])}",
                        "Use --format merged and convert the merged model with llama.cpp's converter")
    base_meta = check_base_gguf(base_gguf, cfg) if base_gguf else None
    keys = tensor_files(base) if supported(cfg.model_type) else None
    if parts["media"] and keys is None:
        raise UserError(base, "the projector file is written from the base's safetensors files, and this base has "
                        "none on local disk", "Download the base first (`hf download ID --local-dir DIR`) and pass "
                        "--base DIR")
    want = merge_targets(adapter, keys, family, cfg, {m: pairs[m] for m in parts["media"]}) if keys else {}
    out = prepare_out(out, adapter, base)
    report = {"format": "gguf", "adapter": str(adapter), "base": base, "out": str(out), "outtype": outtype,
              "base_gguf": base_meta, "checks": []}
    updates, ok = {}, True
    if text:
        lora = write_lora(out / "adapter.gguf", GGUF_ARCH[cfg.model_type], config, text, names, outtype)
        updates = lora.pop("updates")
        ok = lora.pop("ok")
        report.update(lora, tolerance=TOLERANCE[outtype])
        report["checks"] += [
            "metadata: general.architecture, general.type=adapter, adapter.type=lora, adapter.lora.alpha",
            f"tensors: blk.N.<proj>.weight.lora_a/lora_b for all {len(text)} language-model LoRA modules, nothing else",
            f"shapes: every LoRA tensor fits a module of {base}",
            f"update B·A·alpha/r read back from the file equals PEFT's B·A·scale (max rel diff "
            f"{lora['max_rel_update_diff']:.2g})"]
    mmproj = None
    if keys is not None:
        mmproj = out / "mmproj.gguf"
        written = write_mmproj(mmproj, base, cfg, keys, want, config, pairs, outtype)
        report["mmproj"] = {"file": str(mmproj), "merged_modules": sorted(want.values()),
                            **check_mmproj(mmproj, base, cfg, written, outtype)}
        # As read back, written values can still mean other weights (a layout, a name): each tensor
        # with its layout undone is held to base + update within the outtype's rounding.
        served = furthest(*_served_projector(mmproj, cfg, keys, want, config, pairs))  # {tensor, max_rel_diff}
        report["mmproj"]["as_served"] = {**served, "tolerance": TOLERANCE[outtype],
                                         "ok": served["max_rel_diff"] <= TOLERANCE[outtype]}
        report["mmproj"]["ok"] = report["mmproj"]["ok"] and report["mmproj"]["as_served"]["ok"]
        ok = ok and report["mmproj"]["ok"]
        report["checks"].append(
            f"mmproj: {report['mmproj']['tensors']} projector tensors with llama.cpp's converter's names, layout and "
            f"types; {len(want)} vision/audio LoRA updates merged in; read back exactly as written")
    else:
        report["mmproj"] = "not written: the base has no local safetensors files (its projector is unchanged)"
    if ok and not does_not_fit(base, log=log):
        report["logits"] = _prove(adapter, base, family, cfg, config, pairs, updates, mmproj, outtype)
        ok = report["logits"]["ok"]
        report["checks"].append(
            f"the base + every update read back from adapter.gguf + the projector read back from mmproj.gguf "
            f"reproduce base + adapter on a text/image/audio probe (max |dlogits| {report['logits']['max_abs_diff']:.3g}; "
            f"the adapter moves them by {report['logits']['lora_effect']:.3g})")
    model = base_gguf or PLACEHOLDER
    lora_file = out / "adapter.gguf" if text else None
    command = (f"llama-server -m {model}" + (f" --lora {lora_file}" if lora_file else "")
               + (f" --mmproj {mmproj}" if mmproj else ""))
    report["serve"] = {"model": model, "adapter": str(lora_file) if lora_file else None,
                       **({"mmproj": str(mmproj)} if mmproj else {}), "command": command}
    if not base_gguf:
        report["serve"]["model_from"] = (f"{PLACEHOLDER}: {base} converted with llama.cpp's convert_hf_to_gguf.py "
                                         "(or pass --base-gguf)")
    if not ok:  # the furthest of the text updates (read back above) and the projector tensors
        found = ([{"tensor": report["worst_module"], "max_rel_diff": report["max_rel_update_diff"]}] if text else [])
        if isinstance(report["mmproj"], dict):
            found.append({k: report["mmproj"]["as_served"][k] for k in ("tensor", "max_rel_diff")})
        report["furthest"] = max(found, key=lambda f: f["max_rel_diff"], default={"tensor": None, "max_rel_diff": None})
    write_report(out, "export_report.json", report)
    if not ok:
        raise ParityError(_failure(out, report))
    if text:
        log(f"gguf: {len(text)} LoRA modules ({outtype}), alpha {report['alpha']:g}, update max rel diff "
            f"{report['max_rel_update_diff']:.2g} -> {lora_file}")
    if mmproj:
        log(f"gguf: projector with {len(want)} vision/audio updates merged -> {mmproj}")
    if "logits" in report:
        log(f"gguf: probe logits through the exported files vs base+adapter: {report['logits']['max_abs_diff']:.3g} "
            f"(adapter moves them by {report['logits']['lora_effect']:.3g})")
    log(f"serve with: {command}")
    return report


def _served_projector(mmproj: Path, cfg, keys, want: dict, config: dict, pairs: dict) -> tuple[dict, dict]:
    """({checkpoint key: the projector tensor llama.cpp reads, layout undone}, {key: the base's
    tensor + its LoRA update}): what the file means next to what it should mean."""
    from safetensors import safe_open

    got, wanted = projector_weights(mmproj, cfg), {}
    for key in got:
        with safe_open(keys[key], "pt") as st:
            t = st.get_tensor(key).float()
        wanted[key] = t + delta(config, want[key], *pairs[want[key]]) if key in want else t
    return got, wanted


def _failure(out: Path, report: dict) -> str:
    from finetune.export.proof import failure

    if "logits" in report and not report["logits"]["ok"]:
        return failure(out, report["logits"], report["furthest"], "export_report.json")
    mm = report["mmproj"] if isinstance(report.get("mmproj"), dict) else {}
    if mm.get("mismatched_tensors"):
        what = f"mmproj.gguf reads back other values than were written for {', '.join(mm['mismatched_tensors'][:3])}"
    elif mm and not mm["as_served"]["ok"]:
        served = mm["as_served"]
        what = (f"mmproj.gguf holds {served['tensor']} as other weights than the base's + update (max rel diff "
                f"{served['max_rel_diff']:.3g}, allowed {served['tolerance']:.3g})")
    else:
        what = (f"a file reads back other than written; furthest from base + adapter: {report['furthest']['tensor']} "
                f"(max rel diff {report['furthest']['max_rel_diff']:.3g})")
    return f"{out}: {what} (see {out / 'export_report.json'})"
