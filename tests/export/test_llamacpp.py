"""llama.cpp itself proves the GGUF LoRA and the projector (tier `llamacpp`: `bash scripts/setup_llamacpp.sh` first).

The tiny base goes through llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python
source archive: $LLAMACPP_SRC or .cache/llamacpp-src), our exporter writes the LoRA, and
llama.cpp's logits for base + LoRA are compared with transformers + PEFT on a text prompt
(llama.cpp and transformers differ by ~1e-2 on their own), and with the LoRA written by
llama.cpp's own convert_lora_to_gguf.py, which must give llama.cpp the same logits. That
converter ignores rsLoRA and alpha patterns in this version, so it is fed an equivalent
plain adapter: PEFT's own per-module scaling folded into B, alpha/r on top.

The projector: our mmproj.gguf equals what llama.cpp's converter writes (`--mmproj`) from the
merged model, tensor by tensor and key by key; and llama.cpp's multimodal library (mtmd, through
llama-cpp-python) turns an image and an audio clip into the embeddings transformers + PEFT
computes with the adapter. (A whole multimodal decode is not compared: llama.cpp's decoder on
embedding input — the path mtmd feeds media through — already differs from transformers on
this tiny model for plain text embeddings, while token input agrees to ~2e-3.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.llamacpp
llama_cpp = pytest.importorskip("llama_cpp")

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox jumps over the lazy dog. What is this? Answer with one word."


def _script(name: str) -> Path:
    """One of llama.cpp's converters, from the unpacked source archive (never a copy in this repo)."""
    root = Path(os.environ.get("LLAMACPP_SRC") or REPO / ".cache" / "llamacpp-src")
    found = [p for p in (root / name, root / "vendor/llama.cpp" / name,
                         *sorted(root.glob(f"*/vendor/llama.cpp/{name}"))) if p.is_file()]
    if not found:
        pytest.skip(f"llama.cpp's {name} not under {root}: run scripts/setup_llamacpp.sh")
    return found[-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF base folder, the same base as a GGUF made by llama.cpp's converter)."""
    from finetune.demo.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("llamacpp")
    base = write_tiny_model(root / "base", seed=0)
    gguf_path = root / "base.gguf"
    subprocess.run([sys.executable, str(_script("convert_hf_to_gguf.py")), str(base), "--outfile", str(gguf_path), "--outtype", "f32"],
                   check=True, capture_output=True)
    return base, gguf_path


def _plain_equivalent(peft, adapter: Path, out: Path, alpha: int = 16) -> Path:
    """`adapter` rewritten so that llama.cpp's scale alpha/r gives PEFT's scaling of every module."""
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(adapter / "adapter_model.safetensors")
    for name, module in peft.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            state[f"{name}.lora_B.weight"] *= module.scaling["default"] * module.r["default"] / alpha
    out.mkdir()
    save_file(state, out / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": False, "lora_alpha": alpha,
                                                         "alpha_pattern": {}}))
    return out


def _llamacpp_logits(model: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    # f32 KV cache (type 0): the default f16 cache rounds K/V and blurs the comparison by ~1e-3.
    llm = llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, logits_all=True,
                          n_ctx=128, n_threads=2, type_k=0, type_v=0, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@pytest.mark.parametrize("lora", [{}, {"use_rslora": True, "rank_pattern": {"down_proj": 4}}],
                         ids=["plain", "rslora-mixed-ranks"])
def test_llamacpp_runs_our_gguf_lora(tiny, tmp_path, lora):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from finetune.export.gguf import export_gguf
    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.lora import target_regex

    base, base_gguf = tiny
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    torch.manual_seed(0)  # A is drawn by PEFT from the global generator
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                            target_modules=target_regex(["attention", "mlp"], GEMMA4_UNIFIED),
                                            **lora))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    peft.save_pretrained(tmp_path / "adapter")
    export_gguf(tmp_path / "adapter", tmp_path / "gguf", outtype="f32")

    ids = AutoTokenizer.from_pretrained(base)(PROMPT).input_ids
    fresh = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_base = fresh(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        hf_lora = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))(
            input_ids=torch.tensor([ids])).logits[0].double().numpy()
    cpp_base = _llamacpp_logits(base_gguf, ids)
    cpp_lora = _llamacpp_logits(base_gguf, ids, tmp_path / "gguf" / "adapter.gguf")

    effect = np.abs(hf_lora - hf_base).max()
    base_diff = np.abs(cpp_base - hf_base).max()
    lora_diff = np.abs(cpp_lora - hf_lora).max()
    print(f"llama.cpp vs transformers over {len(ids)} tokens: base {base_diff:.3g}, base+LoRA {lora_diff:.3g}; "
          f"the LoRA moves logits by {effect:.3g}")
    assert effect > 0.5  # the comparisons below would be vacuous otherwise
    assert base_diff < 1e-2 and lora_diff < 0.01 * effect

    theirs = tmp_path / "theirs.gguf"
    plain = _plain_equivalent(peft, tmp_path / "adapter", tmp_path / "plain")
    subprocess.run([sys.executable, str(_script("convert_lora_to_gguf.py")), str(plain), "--base", str(base),
                    "--outfile", str(theirs), "--outtype", "f32"], check=True, capture_output=True)
    same = np.abs(_llamacpp_logits(base_gguf, ids, theirs) - cpp_lora).max()
    print(f"llama.cpp with our LoRA vs with its own converter's: {same:.3g}")
    # Plain: the same tensors, so the same logits. Folded scales move B·A by ~5e-8 (relative),
    # which ggml's f16 GELU table turns into ~3e-4 here: llama.cpp's own noise, not ours.
    assert same <= (1e-6 if not lora else 1e-3)


# --- the projector -----------------------------------------------------------------------------

IMAGE_SIZE = (480, 336)  # 10 x 7 patches of 48 px = 70 tokens: the tiny processor's budget and llama.cpp's minimum


@pytest.fixture(scope="module")
def projector_case(tmp_path_factory):
    """(textured base, its text GGUF by llama.cpp's converter, the demo recipe's adapter on it)."""
    import yaml

    from finetune.demo.tiny_model import write_tiny_model
    from tests.export import test_export_whole as whole

    root = tmp_path_factory.mktemp("projector")
    base = whole.textured_base(write_tiny_model(root / "tiny", seed=0), root / "base")
    gguf_path = root / "base.gguf"
    subprocess.run([sys.executable, str(_script("convert_hf_to_gguf.py")), str(base), "--outfile", str(gguf_path),
                    "--outtype", "f32"], check=True, capture_output=True)
    lora = yaml.safe_load((REPO / "recipes" / "demo.yaml").read_text())["lora"]
    adapter = whole.make_adapter(base, root / "adapter", lora["targets"], lora["r"], lora["alpha"], seed=1)
    return base, gguf_path, adapter


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_our_mmproj_equals_llamacpps_converter(projector_case, tmp_path, outtype):
    import gguf

    from finetune.export.gguf import export_gguf
    from finetune.export.merge import merge_adapter

    base, _, adapter = projector_case
    export_gguf(adapter, tmp_path / "ours", outtype=outtype)
    merge_adapter(adapter, tmp_path / "merged", dtype="fp32", low_memory=True)  # base + update in fp32, like ours
    theirs = tmp_path / "theirs.gguf"
    subprocess.run([sys.executable, str(_script("convert_hf_to_gguf.py")), str(tmp_path / "merged"), "--mmproj",
                    "--outtype", outtype, "--outfile", str(theirs)], check=True, capture_output=True)
    a, b = gguf.GGUFReader(tmp_path / "ours" / "mmproj.gguf"), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb) and len(ta) == 11
    for name in ta:
        x, y = ta[name], tb[name]
        assert (x.tensor_type, list(x.shape)) == (y.tensor_type, list(y.shape)), name
        assert np.array_equal(np.asarray(x.data), np.asarray(y.data)), name  # the same bytes
    # Every key but the ones naming the source folder (general.name, size label, basename).
    named = {"general.name", "general.size_label", "general.basename"}
    fa = {k: f.contents() for k, f in a.fields.items() if not k.startswith("GGUF.") and k not in named}
    fb = {k: f.contents() for k, f in b.fields.items() if not k.startswith("GGUF.") and k not in named}
    assert fa.keys() == fb.keys() and all(fa[k] == pytest.approx(fb[k]) for k in fa)


def _mtmd_embeddings(model: Path, mmproj: Path, image: np.ndarray, audio: np.ndarray) -> dict[str, np.ndarray]:
    """{"image": [tokens, dim], "audio": [...]}: what llama.cpp's mtmd makes of the media with this projector."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=2, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, "llama.cpp refused the projector file"
    try:
        pixels = image.tobytes()
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 2)(
            mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)),
            mtmd.mtmd_bitmap_init_from_audio(len(audio), audio.ctypes.data_as(ctypes.POINTER(ctypes.c_float))))
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker * 2, text_len=2 * len(marker), add_special=False, parse_special=True)
        chunks = mtmd.mtmd_input_chunks_init()
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 2) == 0
        dim = llama_cpp.llama_model_n_embd(llm._model.model)
        out = {}
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            kind = {mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE: "image", mtmd.MTMD_INPUT_CHUNK_TYPE_AUDIO: "audio"}.get(
                mtmd.mtmd_input_chunk_get_type(chunk))
            if kind:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                out[kind] = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * dim,)).reshape(n, dim).copy()
        mtmd.mtmd_input_chunks_free(chunks)
        return out
    finally:
        mtmd.mtmd_free(ctx)


def test_llamacpp_projects_image_and_audio_like_transformers_with_the_adapter(projector_case, tmp_path):
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from finetune.export.gguf import export_gguf

    base, base_gguf, adapter = projector_case
    export_gguf(adapter, tmp_path / "g", outtype="f32")
    w, h = IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + 2 * yy) % 256], -1).astype("uint8")
    t = np.arange(8000) / 16000
    audio = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype("float32")
    cpp = _mtmd_embeddings(base_gguf, tmp_path / "g" / "mmproj.gguf", image, audio)

    processor = AutoProcessor.from_pretrained(base)
    pixels = processor.image_processor(Image.fromarray(image), return_tensors="pt")
    frames = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt")
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                                      str(adapter)).eval()
    inner = model.base_model.model.model

    def features():
        return {"image": inner.get_image_features(pixels["pixel_values"],
                                                  pixels["image_position_ids"]).pooler_output[0].numpy(),
                "audio": inner.get_audio_features(frames["input_features"]).pooler_output[0].numpy()}

    with torch.no_grad():
        hf = features()
        with model.disable_adapter():
            plain = features()
    for kind in ("image", "audio"):
        diff, effect = np.abs(cpp[kind] - hf[kind]).max(), np.abs(hf[kind] - plain[kind]).max()
        print(f"llama.cpp vs transformers+PEFT, {kind} embeddings {cpp[kind].shape}: {diff:.3g}; "
              f"the adapter moves them by {effect:.3g}")
        assert cpp[kind].shape == hf[kind].shape and effect > 0.1 and diff < 1e-4
