"""The user's loading path on the GPU run: a random-weight 12B written as sharded bf16 safetensors
(the names `save_pretrained` writes for the model, an index, the config), then, in a fresh
process, the base loaded the way `finetune train` loads it (`finetune.model.load.load_base`:
`from_pretrained` quantizing to NF4 on load), LoRA attached and one training step.

    python benchmarks/gpu_load.py --load DIR --recipe R --out load.json [--dry-run]   # the child

Measured in the child: load + quantization seconds, host RAM peak (`ru_maxrss`, the process's
whole life), the GPU's peak while loading and the first step's seconds and peak. The checkpoint
is read back from the page cache (it was just written): a cold disk adds its read time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 2**30


def write_checkpoint(config, out: Path, device: str, shard_bytes: int, dtype=torch.bfloat16) -> dict:
    """Random weights under the model's own state-dict names, in shards of ~`shard_bytes`."""
    from safetensors.torch import save_file

    from finetune.plan.skeleton import model_class

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = model_class(config, None)(config)
    tied = {n for n in ("lm_head.weight",) if getattr(config, "tie_word_embeddings", False)}
    shapes = [(n, t.shape, t.dtype) for n, t in model.state_dict().items() if n not in tied]
    del model
    t0 = time.time()
    gen = torch.Generator(device=device).manual_seed(0)
    index, shard, size, files = {}, {}, 0, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        index.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape, kind in shapes:
        if not kind.is_floating_point:  # integer buffers (none persistent here) keep their dtype
            t = torch.zeros(shape, dtype=kind)
        elif name.endswith("norm.weight") or "layernorm" in name or name.endswith("layer_scalar"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen).cpu()
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    # the real names of the shards, with the count filled in
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in renamed.items():
        (out / old).rename(out / new)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in index.items()}}, indent=1))
    config.save_pretrained(out)
    return {"shards": len(files), "checkpoint_gib": round(total / GIB, 3), "write_seconds": round(time.time() - t0, 1)}


def measure_in_child(path: Path, recipe: Path, overrides: list[str], out: Path, dry_run: bool, timeout: int) -> dict:
    """Run this file's `--load` in a fresh process (its ru_maxrss is the load path's alone)."""
    cmd = [sys.executable, __file__, "--load", str(path), "--recipe", str(recipe), "--out", str(out),
           *(["--dry-run"] if dry_run else []), "--", *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-600:]}
    return json.loads(out.read_text())


def child(args) -> int:
    """Load as `finetune train` does, attach LoRA, one step; write what was measured."""
    from benchmarks.gpu_build import DRY_MEDIA, full_row
    from benchmarks.gpu_steps import run_ours
    from data_tools.collate import collate
    from finetune.config.recipe import load_recipe
    from finetune.model.families import family_for
    from finetune.model.load import enable_gradient_checkpointing, load_base
    from finetune.model.lora import attach_lora

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        torch.set_num_threads(1)
    recipe = load_recipe(args.recipe, [f"model.base={args.load}", *args.overrides])
    t0 = time.time()
    m = recipe.model
    model = load_base(m.base, quantization=m.quantization, dtype=m.dtype, device=device,
                      double_quant=m.double_quant, quant_storage=m.quant_storage)
    if device == "cuda":
        torch.cuda.synchronize()
    result = {"load_seconds": round(time.time() - t0, 1),
              "host_ram_after_load_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)}
    if device == "cuda":
        result["gpu_peak_during_load_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        result["gpu_reserved_during_load_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    family = family_for(model.config.model_type)
    enable_gradient_checkpointing(model)
    model = attach_lora(model, recipe.lora, family).train()
    config = model.get_base_model().config
    pad = config.get_text_config().pad_token_id or 0
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    t1 = time.time()
    row = full_row(config, recipe.data.max_seq_len, **(DRY_MEDIA if args.dry_run else {}))
    step = run_ours(model, recipe, family, [collate([row], pad)], device, dtype)
    result["first_step_seconds"] = round(time.time() - t1, 1)
    result["first_step"] = {k: v for k, v in step.items() if k not in ("tokens_per_s", "device_used_gib")}
    # the whole process's peak: loading, LoRA, the step (kilobytes on Linux)
    result["host_ram_peak_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load", required=True, help="the checkpoint folder written by write_checkpoint")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("overrides", nargs="*")
    return child(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
