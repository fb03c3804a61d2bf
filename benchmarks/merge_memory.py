"""Peak host memory of `finetune merge`: the in-memory fp32 merge vs `--low-memory`, in one run.

    python benchmarks/merge_memory.py [--hidden 1536] [--layers 12] [--shard-mib 256]

A gemma4_unified base larger than the tiny one (hidden, layers and MLP width scaled; random
weights, saved in bf16 like the released checkpoints) and a LoRA r=16 on attention + MLP
are written to a temporary folder. Each merge then runs in its own process, and the
process's peak resident memory (VmHWM) is recorded, next to a bare process that only
imports what a merge imports. Both merges must produce the same tensors, bit for bit.

The in-memory merge grows with the model (about 2× its fp32 size); the low-memory merge is
bounded by its output shard size plus one fp32 tensor. The JSON carries both peaks, the
fp32 size, the ratio, and what each would need for the 12B (11.96 B parameters; largest
merged tensor: an MLP projection, 3840 × 15360). Writes `benchmarks/results/merge_memory.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GIB = 2**30

PARAMS_12B = 11_959_730_176  # finetune plan's count on the meta-device 12B
LARGEST_MERGED_12B = 3840 * 15360  # an MLP projection


def write_base(out: Path, hidden: int, layers: int) -> int:
    """A scaled gemma4_unified base in bf16; returns its parameter count."""
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    from finetune.demo.tiny_model import build_processor, tiny_config_dict

    cfg = tiny_config_dict(num_layers=layers)
    cfg["text_config"].update(hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=hidden // 8, global_head_dim=hidden // 4)
    torch.manual_seed(0)
    model = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(**cfg)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="512MB")
    build_processor().save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from finetune.model.families import GEMMA4_UNIFIED
    from finetune.model.lora import target_regex

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                                                  target_modules=target_regex(["attention", "mlp"], GEMMA4_UNIFIED)))
    peft_model.save_pretrained(out)


CHILD = """
import sys, json, threading, time
sys.path.insert(0, {root!r})


def status(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field + ":")) * 1024 / 2**30


# Anonymous memory, sampled: what the merge itself holds. The resident peak (VmHWM) also counts
# pages of the mmapped safetensors files, which the kernel can drop at any time.
peak_anon = [0.0]


def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.002)


threading.Thread(target=sample, daemon=True).start()
import finetune.export.merge as merge
import finetune.export.merge_low_memory as merge_files
# What either merge imports, so "imports" is the floor both start from.
import peft, PIL.Image, safetensors.torch, transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, Gemma4UnifiedForConditionalGeneration
merge_files.SHARD_BYTES = {shard}
t = time.time()
if {mode!r} != "imports":
    merge.merge_adapter({adapter!r}, {out!r}, dtype="bf16", low_memory={mode!r} == "low")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent that forked us.
peak_anon[0] = max(peak_anon[0], status("RssAnon"))
print(json.dumps({{"peak_anon_gib": peak_anon[0], "peak_rss_gib": status("VmHWM"), "seconds": time.time() - t}}))
"""


def run_child(mode: str, adapter: Path, out: Path, shard: int) -> dict:
    code = CHILD.format(root=str(ROOT), shard=shard, mode=mode, adapter=str(adapter), out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} merge failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = load(a), load(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard-mib", type=int, default=256, help="output shard size of the low-memory merge")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_memory.json"))
    args = ap.parse_args(argv)
    shard = args.shard_mib * 2**20

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.time()
        params = write_base(tmp / "base", args.hidden, args.layers)
        write_adapter(tmp / "base", tmp / "adapter")
        print(f"base: {params / 1e6:.0f} M parameters ({params * 4 / GIB:.2f} GiB in fp32), "
              f"written in {time.time() - t0:.0f} s")
        imports = run_child("imports", tmp / "adapter", tmp / "none", shard)
        full = run_child("full", tmp / "adapter", tmp / "full", shard)
        low = run_child("low", tmp / "adapter", tmp / "low", shard)
        identical = same_tensors(tmp / "full", tmp / "low")
        for name, r in (("imports only", imports), ("in-memory merge", full), ("--low-memory", low)):
            print(f"{name:16s} peak anonymous {r['peak_anon_gib']:.2f} GiB, resident incl. mmapped files "
                  f"{r['peak_rss_gib']:.2f} GiB  ({r['seconds']:.0f} s)")
        print(f"same tensors: {identical}")

    fp32 = params * 4 / GIB
    grow_full = (full["peak_anon_gib"] - imports["peak_anon_gib"]) / fp32  # GiB per fp32 GiB
    low_over = low["peak_anon_gib"] - imports["peak_anon_gib"]
    result = {
        "params": params,
        "fp32_gib": round(fp32, 3),
        "peak_anon_gib": {k: round(r["peak_anon_gib"], 3) for k, r in
                          (("imports_only", imports), ("full", full), ("low_memory", low))},
        "peak_rss_gib": {k: round(r["peak_rss_gib"], 3) for k, r in
                         (("imports_only", imports), ("full", full), ("low_memory", low))},
        "seconds": {"full": round(full["seconds"], 1), "low_memory": round(low["seconds"], 1)},
        "ratio_full_over_low": round(full["peak_anon_gib"] / low["peak_anon_gib"], 2),
        "identical_tensors": identical,
        "shard_mib": args.shard_mib,
        # The full merge's growth per fp32 GiB applied to the 12B; the low-memory bound is the
        # default 2 GiB output shard (or the 2 GiB bf16 embedding alone) + the largest merged
        # tensor as bf16 source, fp32 copy, fp32 update and bf16 result (12 bytes an element).
        "12b_estimate_gib": {
            "full": round(imports["peak_anon_gib"] + grow_full * PARAMS_12B * 4 / GIB, 1),
            "low_memory_bound": round(imports["peak_anon_gib"] + 2 + LARGEST_MERGED_12B * 12 / GIB, 1),
        },
        "unit": "GiB; peak_anon: anonymous memory of the merging process (sampled every 2 ms), "
                "peak_rss: its resident peak including mmapped safetensors pages",
        "settings": {"hidden": args.hidden, "layers": args.layers, "lora": "r=16 attention+mlp",
                     "dtype": "bf16"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
    }
    result["low_memory_over_imports_gib"] = round(low_over, 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"in-memory {result['peak_anon_gib']['full']} GiB vs low-memory {result['peak_anon_gib']['low_memory']} GiB "
          f"({result['ratio_full_over_low']}x); 12B estimate: {result['12b_estimate_gib']}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
