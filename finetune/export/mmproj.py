"""llama.cpp's projector file (mmproj GGUF) for the encoder-free Gemma 4: the base's vision and
audio embedders with the adapter's projection updates merged in, named, laid out, typed and
described as llama.cpp's own converter writes them (`convert_hf_to_gguf.py --mmproj`,
conversion/gemma.py `Gemma4UnifiedVisionAudioModel`, conversion/base.py `MmprojModel`).

What the converter does that this writer repeats:
- names: patch_dense -> v.patch_embd, patch_ln1/2 -> v.patch_norm.1/2, pos_norm -> v.patch_norm.3,
  pos_embedding -> v.position_embd.weight, the vision and audio embedding projections ->
  mm.input_projection / mm.a.input_projection;
- layout: patch_dense's columns and patch_ln1 are permuted from the checkpoint's HWC order to the
  CHW order of ggml's im2col; pos_embedding [positions, 2, dim] becomes [2, positions, dim];
- types: 1-D tensors and the position table stay f32, patch_embd.weight is f16 only for f16
  files, everything else takes the outtype (q8_0 falls back to f16 where rows don't divide);
- metadata: general.architecture=clip, general.type=mmproj, the clip.vision.* / clip.audio.*
  keys with projector types gemma4uv / gemma4ua.
The llamacpp test tier holds a file written here against the converter's, tensor by tensor.
Tensors are read from the base's safetensors files one at a time (the 12B's are ~100 MB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from finetune.errors import UserError
from finetune.model.adapters import delta

ARCH = "clip"
# checkpoint key -> (llama.cpp tensor, layout change); per model type. Vision rows need a
# vision_config, audio rows an audio_config.
TENSORS = {
    "gemma4_unified": {
        "model.embed_audio.embedding_projection.weight": ("mm.a.input_projection.weight", None),
        "model.embed_vision.embedding_projection.weight": ("mm.input_projection.weight", None),
        "model.vision_embedder.patch_dense.bias": ("v.patch_embd.bias", None),
        "model.vision_embedder.patch_dense.weight": ("v.patch_embd.weight", "chw_columns"),
        "model.vision_embedder.patch_ln1.bias": ("v.patch_norm.1.bias", "chw"),
        "model.vision_embedder.patch_ln1.weight": ("v.patch_norm.1.weight", "chw"),
        "model.vision_embedder.patch_ln2.bias": ("v.patch_norm.2.bias", None),
        "model.vision_embedder.patch_ln2.weight": ("v.patch_norm.2.weight", None),
        "model.vision_embedder.pos_embedding": ("v.position_embd.weight", "swap01"),
        "model.vision_embedder.pos_norm.bias": ("v.patch_norm.3.bias", None),
        "model.vision_embedder.pos_norm.weight": ("v.patch_norm.3.weight", None),
    },
}
OUTTYPES = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}  # general.file_type (llama.cpp's LlamaFileType)


def supported(model_type: str) -> bool:
    return model_type in TENSORS


def _chw_order(cfg) -> torch.Tensor:
    """perm[i] = the checkpoint's (HWC) index of the value at CHW position i of a model patch."""
    v = cfg.vision_config
    p = getattr(v, "model_patch_size", None) or v.patch_size * v.pooling_kernel_size
    i = torch.arange(p * p * 3)
    ch, row, col = i // (p * p), (i % (p * p)) // p, i % p
    return row * p * 3 + col * 3 + ch


def to_gguf_layout(t: torch.Tensor, layout: str | None, cfg) -> torch.Tensor:
    if layout == "chw_columns":
        return t[:, _chw_order(cfg)]
    if layout == "chw":
        return t[_chw_order(cfg)]
    if layout == "swap01":
        return t.permute(1, 0, 2)
    return t


def from_gguf_layout(t: torch.Tensor, layout: str | None, cfg) -> torch.Tensor:
    """The inverse of `to_gguf_layout`: back to the checkpoint's layout."""
    out = t.clone()
    if layout == "chw_columns":
        out[:, _chw_order(cfg)] = t
    elif layout == "chw":
        out[_chw_order(cfg)] = t
    elif layout == "swap01":
        out = t.permute(1, 0, 2).contiguous()
    return out


def tensor_type(name: str, ndim: int, outtype: str) -> str:
    """The type llama.cpp's converter gives this tensor in a file of `outtype`."""
    if ndim <= 1 or name.endswith("_norm.weight") or name.startswith("v.position_embd"):
        return "f32"
    if name == "v.patch_embd.weight":
        return "f16" if outtype == "f16" else "f32"
    return outtype


def encode(x: np.ndarray, kind: str):
    """(data, raw_dtype, type written) for GGUFWriter.add_tensor; q8_0 falls back to f16 as the converter does."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if kind == "f32":
        return x.astype(np.float32), None, "f32"
    if kind == "f16":
        return x.astype(np.float16), None, "f16"
    if kind == "bf16":
        return gguf.quants.quantize(x.astype(np.float32), Q.BF16), Q.BF16, "bf16"
    try:
        return gguf.quants.quantize(x.astype(np.float32), Q.Q8_0), Q.Q8_0, "q8_0"
    except gguf.quants.QuantError:
        return x.astype(np.float16), None, "f16"


def _processor_config(base: Path) -> dict:
    """image_mean/image_std as the converter finds them: preprocessor_config.json, then
    processor_config.json with its image_processor section lifted to the top."""
    cfg = {}
    for name, section in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        path = base / name
        if path.is_file():
            loaded = json.loads(path.read_text())
            cfg.update({**loaded, **loaded.get(section, {})})
    return cfg


def metadata(base: Path, cfg, outtype: str) -> list[tuple[str, str, object]]:
    """(key, GGUF value kind, value) in the converter's order."""
    text, vision, audio = cfg.text_config, cfg.vision_config, cfg.audio_config
    rows = [("general.type", "string", "mmproj"), ("general.name", "string", base.name),
            ("general.file_type", "uint32", OUTTYPES[outtype])]
    if vision is not None:
        proc = _processor_config(base)
        rows += [("clip.has_vision_encoder", "bool", True), ("clip.vision.projection_dim", "uint32", text.hidden_size),
                 ("clip.vision.image_size", "uint32", 224),  # unused by gemma4uv; the converter's constant
                 ("clip.vision.patch_size", "uint32", vision.patch_size),
                 ("clip.vision.embedding_length", "uint32", vision.mm_embed_dim),
                 ("clip.vision.feed_forward_length", "uint32", 0), ("clip.vision.block_count", "uint32", 0),
                 ("clip.vision.attention.head_count", "uint32", 0),  # encoder-free: no transformer tower
                 ("clip.vision.image_mean", "f32_array", [float(x) for x in proc["image_mean"]]),
                 ("clip.vision.image_std", "f32_array", [float(x) for x in proc["image_std"]])]
    if audio is not None:
        rows += [("clip.has_audio_encoder", "bool", True), ("clip.audio.projection_dim", "uint32", text.hidden_size),
                 ("clip.audio.embedding_length", "uint32", audio.audio_embed_dim),
                 ("clip.audio.feed_forward_length", "uint32", 0), ("clip.audio.block_count", "uint32", 0),
                 ("clip.audio.attention.head_count", "uint32", 0)]
    if vision is not None:
        rows += [("clip.vision.projector_type", "string", "gemma4uv"),
                 ("clip.vision.attention.layer_norm_epsilon", "f32", getattr(vision, "layer_norm_eps", 1e-6))]
    if audio is not None:
        rows += [("clip.audio.projector_type", "string", "gemma4ua"),
                 ("clip.audio.num_mel_bins", "uint32", getattr(audio, "input_feat_size", 128)),
                 ("clip.audio.attention.layer_norm_epsilon", "f32", getattr(audio, "layer_norm_eps", 1e-6))]
    return rows + [("general.quantization_version", "uint32", 2)]


def rows(cfg) -> dict[str, tuple[str, str | None]]:
    """The checkpoint keys this model's projector holds (vision rows only with a vision config, ...)."""
    table = TENSORS[cfg.model_type]
    keep = {"vision": cfg.vision_config is not None, "audio": cfg.audio_config is not None}
    return {k: v for k, v in table.items() if keep["audio" if v[0].startswith("mm.a.") else "vision"]}


def write_mmproj(path: Path, base: str, cfg, keys: dict[str, Path], want: dict[str, str], config: dict,
                 pairs: dict, outtype: str) -> dict:
    """Write the projector to `path`: the base's tensors of `keys` ({checkpoint key: file}), with
    `want` ({checkpoint key: LoRA module}) updated in fp32 before the one rounding to the file's
    types. Returns {gguf name: (the values written, dequantized; the type written)} for the
    read-back check."""
    import gguf
    from safetensors import safe_open

    table = rows(cfg)
    missing = sorted(set(table) - set(keys)) or sorted(set(want) - set(table))
    if missing:
        raise UserError(base, f"the base's checkpoint has no projector tensor {missing[0]}, or it is not one "
                        "llama.cpp's projector holds", "Use --format merged and convert the merged model with "
                        "llama.cpp's convert_hf_to_gguf.py --mmproj")
    writer = gguf.GGUFWriter(path, arch=ARCH)
    adders = {"string": writer.add_string, "uint32": writer.add_uint32, "bool": writer.add_bool,
              "f32": writer.add_float32, "f32_array": writer.add_array}
    for key, kind, value in metadata(Path(base), cfg, outtype):
        adders[kind](key, value)
    expected = {}
    for key, (name, layout) in sorted(table.items()):
        with safe_open(keys[key], "pt") as st:
            t = st.get_tensor(key).float()
        if key in want:
            t = t + delta(config, want[key], *pairs[want[key]])
        x = to_gguf_layout(t, layout, cfg).contiguous().numpy()
        data, raw_dtype, kind = encode(x, tensor_type(name, x.ndim, outtype))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        values = gguf.quants.dequantize(data, raw_dtype) if raw_dtype is not None else data
        expected[name] = (values.astype(np.float32).reshape(x.shape), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def read_mmproj(path: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """(metadata, {name: values as float32}, {name: type}) of a projector file, as llama.cpp reads it."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    values = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
        [int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    return meta, values, types


def projector_weights(path: Path, cfg) -> dict[str, torch.Tensor]:
    """{checkpoint key: tensor} rebuilt from a projector file (layouts undone), to load back into the model."""
    _, values, _ = read_mmproj(path)
    by_name = {name: (key, layout) for key, (name, layout) in rows(cfg).items()}
    return {by_name[n][0]: from_gguf_layout(torch.from_numpy(v.copy()), by_name[n][1], cfg) for n, v in values.items()}


def check_mmproj(path: Path, base: str, cfg, expected: dict[str, tuple[np.ndarray, str]], outtype: str) -> dict:
    """Read the file back: metadata as written, every tensor present once with the type and exactly
    the values written."""
    meta, values, types = read_mmproj(path)
    want_meta = {k: v for k, _, v in metadata(Path(base), cfg, outtype)} | {"general.architecture": ARCH}
    bad_meta = sorted(k for k, v in want_meta.items()
                      if k not in meta or (meta[k] != v and not np.allclose(meta[k], v, rtol=1e-7)))
    bad = sorted(n for n, (v, _) in expected.items() if n not in values or values[n].shape != v.shape
                 or not np.array_equal(values[n], v))
    wrong_type = sorted(n for n, (_, kind) in expected.items() if types.get(n) != kind)
    return {"tensors": len(values), "mismatched_tensors": bad, "unexpected_types": wrong_type,
            "mismatched_metadata": bad_meta, "types": dict(sorted(types.items())),
            "ok": not bad and not bad_meta and not wrong_type and set(values) == set(expected)}
