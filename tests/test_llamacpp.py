"""llama.cpp itself proves the GGUF LoRA (tier `llamacpp`: `bash scripts/setup_llamacpp.sh` first).

The tiny base goes through llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python
source archive: $LLAMACPP_SRC or .cache/llamacpp-src), our exporter writes the LoRA, and
llama.cpp's logits for base + LoRA are compared with transformers + PEFT on a text prompt
(llama.cpp and transformers differ by ~1e-2 on their own), and with the LoRA written by
llama.cpp's own convert_lora_to_gguf.py, which must give llama.cpp the same logits. That
converter ignores rsLoRA and alpha patterns in this version, so it is fed an equivalent
plain adapter: PEFT's own per-module scaling folded into B, alpha/r on top.
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

REPO = Path(__file__).resolve().parents[1]
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
    from finetune.tiny import write_tiny_model

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
    from finetune.families import GEMMA4_UNIFIED
    from finetune.lora import target_regex

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
