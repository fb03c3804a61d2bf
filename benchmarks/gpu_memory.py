"""Measured vs predicted GPU memory of QLoRA training on the real Gemma 4 12B shape.

    python benchmarks/gpu_memory.py [--recipe R] [--seq-lens 4096 16384] [--steps 3]
                                    [--grad-accum 2] [--config DIR|config.json] [--device cuda|cpu]

No download: the 12B is built from the bundled config with random weights, one layer at a
time straight into NF4 on the GPU (never the 24 GB bf16 model in host or GPU memory), then
the recipe's LoRA is attached with PEFT and a few real optimizer steps run through
`finetune.training`'s own step (`optimizer_step` with the sft objective), on samples holding one image
(280 soft tokens) and 10 s of audio (250 tokens) at each total length. Each run records
`torch.cuda.max_memory_allocated` / `max_memory_reserved` and the device's used memory next
to `finetune.plan()` for the same recipe, into `benchmarks/results/gpu_memory.json`.

Without CUDA it prints "needs CUDA" and exits 0 without writing. `--device cpu` is a dry
run of every step on the CPU (use a tiny `--config`, e.g. from `finetune tiny-model DIR`);
it prints the same record and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.families import family_for  # noqa: E402
from finetune.memory.estimate import AUDIO_TOKENS_PER_S  # noqa: E402
from finetune.memory.plan import plan  # noqa: E402
from finetune.memory.skeleton import load_config, model_class, not_quantized  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402

GIB = 2**30
IMAGE_TOKENS = 280
AUDIO_SECONDS = 10.0  # 250 tokens of 40 ms


def build_quantized(config, device: str, dtype: torch.dtype, double_quant: bool = True, seed: int = 0):
    """The model with random weights, NF4 linears, built module by module on `device`.

    Same choices as `finetune.model.load_base`: bitsandbytes NF4 for every Linear except the
    tied lm_head (the rule `finetune.memory` plans with), everything else in `dtype`.
    """
    import bitsandbytes as bnb

    family = family_for(config.model_type)
    cls = model_class(config, family)
    with torch.device("meta"):
        model = cls(config)
    skip, should_convert = not_quantized(model)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and should_convert(name, skip):
            model.set_submodule(name, bnb.nn.Linear4bit(
                mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
                compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                device="meta"))
    gen = torch.Generator(device=device).manual_seed(seed)
    for _, mod in list(model.named_modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if isinstance(mod, bnb.nn.Linear4bit) and pname == "weight":
                # one bf16 weight at a time, quantized on the device, then freed
                w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
                mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant,
                                               quant_storage=torch.uint8, module=mod).to(device)
                del w
                continue
            norm = isinstance(mod, nn.LayerNorm) or "RMSNorm" in type(mod).__name__
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if pname == "bias":
                t.zero_()
            elif norm:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=gen)
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, device)
    model.is_loaded_in_4bit = True  # PEFT dispatches its bnb LoRA layer on this flag
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def _materialize_buffers(model, device: str) -> None:
    """Buffers computed in __init__ (RoPE frequencies, scales) were made on meta: redo them."""
    for name, mod in list(model.named_modules()):
        metas = [b for b, t in mod.named_buffers(recurse=False) if t.is_meta]
        if not metas:
            continue
        if type(mod).__name__.endswith("RotaryEmbedding"):
            model.set_submodule(name, type(mod)(config=mod.config, device=device))
        elif metas == ["embed_scale"]:
            mod.embed_scale = torch.tensor(mod.scalar_embed_scale, device=device)
        elif metas == ["layer_scalar"]:
            mod.layer_scalar = torch.ones(1, device=device)
        else:
            raise RuntimeError(f"don't know how to build buffers {metas} of {name} ({type(mod).__name__})")
    left = [n for n, t in model.named_buffers() if t.is_meta] + [n for n, t in model.named_parameters()
                                                                  if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta: {left[:5]}")


def sample(config, seq_len: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """One row of `seq_len` tokens: text, an image block, text, an audio block, then an answer
    that carries the labels — the keys `data_tools.collate.collate` produces."""
    from data_tools.render import IGNORE

    g = torch.Generator().manual_seed(seed)
    text = config.get_text_config()
    specials = [getattr(config, a) for a in ("image_token_id", "boi_token_id", "eoi_token_id",
                                              "audio_token_id", "boa_token_id", "eoa_token_index",
                                              "video_token_id")]
    hi = min(min(specials), text.vocab_size)
    audio_tokens = int(AUDIO_SECONDS * AUDIO_TOKENS_PER_S)
    media = IMAGE_TOKENS + 2 + audio_tokens + 2
    if seq_len < media + 16:
        raise SystemExit(f"seq_len {seq_len} is too short for one image and one clip ({media} tokens)")
    n_text = seq_len - media
    words = torch.randint(3, hi, (n_text,), generator=g)
    a, b = n_text // 4, n_text // 2
    ids = torch.cat([words[:a], torch.tensor([config.boi_token_id]),
                     torch.full((IMAGE_TOKENS,), config.image_token_id), torch.tensor([config.eoi_token_id]),
                     words[a:b], torch.tensor([config.boa_token_id]),
                     torch.full((audio_tokens,), config.audio_token_id), torch.tensor([config.eoa_token_index]),
                     words[b:]])
    types = torch.zeros_like(ids)
    types[ids == config.image_token_id] = 1
    types[ids == config.audio_token_id] = 3
    labels = torch.full_like(ids, IGNORE)
    answer = min(1024, seq_len // 4)  # the answer at the end carries the loss
    labels[-answer:] = ids[-answer:]
    vision = config.vision_config
    patch_dim = (vision.patch_size * vision.pooling_kernel_size) ** 2 * 3
    side = 14  # a 14 × 20 grid of 48-px patches = 280 soft tokens
    pos = torch.stack(torch.meshgrid(torch.arange(IMAGE_TOKENS // side), torch.arange(side), indexing="ij"),
                      -1).reshape(-1, 2)[:, [1, 0]]
    batch = {
        "input_ids": ids[None], "labels": labels[None], "mm_token_type_ids": types[None],
        "attention_mask": torch.ones_like(ids)[None],
        "pixel_values": torch.rand(1, IMAGE_TOKENS, patch_dim, generator=g),
        "image_position_ids": pos[None],
        "input_features": torch.randn(1, audio_tokens, config.audio_config.audio_embed_dim, generator=g) * 0.1,
        "input_features_mask": torch.ones(1, audio_tokens, dtype=torch.bool),
    }
    from finetune.training.wrappers import to_device

    return to_device(batch, device, dtype)


def run_steps(model, recipe, micro: list[dict], steps: int, device: str) -> tuple[list[float], float]:
    """`steps` optimizer steps through the trainer's own step function."""
    from accelerate import Accelerator

    from finetune.objectives import build
    from finetune.training.optim import make_optimizer, make_scheduler
    from finetune.training.step import optimizer_step

    acc = Accelerator(cpu=device == "cpu")
    objective = build(recipe)
    optimizer = make_optimizer(model.parameters(), recipe.train, device)
    scheduler = make_scheduler(optimizer, recipe.train)
    losses, t0 = [], time.time()
    for _ in range(steps):
        loss, _, _ = optimizer_step(model, optimizer, scheduler, micro, acc, objective, recipe.train.max_grad_norm)
        losses.append(loss)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.time() - t0) / steps
    del optimizer, scheduler
    return losses, seconds


def _config_base(path: str | None, tmp: Path) -> str | None:
    """A folder holding config.json for `--config` (a folder or a json file)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        return str(p)
    (tmp / "config.json").write_text(p.read_text())
    return str(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes/gemma4-12b/mixed-image-audio-text.yaml"))
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (keeps runs short)")
    ap.add_argument("--config", help="model folder or config.json instead of the recipe's base")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--offload-seq-lens", type=int, nargs="*", default=[],
                    help="extra runs at these lengths with train.offload_activations=true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_memory.json"))
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA")
        return 0

    from finetune.model import attach_lora, enable_gradient_checkpointing

    tmp = Path(tempfile.mkdtemp(prefix="gpu-memory-"))
    base = _config_base(args.config, tmp)
    common = [f"data.image_tokens={IMAGE_TOKENS}", f"data.max_audio_seconds={AUDIO_SECONDS}",
              "train.batch_size=1", f"train.grad_accum={args.grad_accum}"]
    common += [f"model.base={base}"] if base else []
    recipe = load_recipe(args.recipe, common)
    config, source = load_config(recipe.model)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    family = family_for(config.model_type)

    t0 = time.time()
    model = build_quantized(config, args.device, dtype, recipe.model.double_quant)
    if recipe.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = attach_lora(model, recipe.lora, family)
    model.train()
    build_s = time.time() - t0
    recipe_path = Path(args.recipe).resolve()
    record = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__,
              "recipe": str(recipe_path.relative_to(ROOT) if recipe_path.is_relative_to(ROOT) else recipe_path),
              "overrides": common, "config": source, "build_seconds": round(build_s, 1),
              "step": "finetune.training.step.optimizer_step (sft objective: chunked CE per the recipe)", "runs": []}
    if args.device == "cuda":
        torch.cuda.synchronize()
        static_pred = plan(recipe, device="cuda")["breakdown_bytes"]
        weights = sum(static_pred[k] for k in ("linear_weights", "unquantized_weights", "lora_weights"))
        record["weights_after_build"] = {
            "measured_gib": round(torch.cuda.memory_allocated() / GIB, 3),
            "predicted_gib": round(weights / GIB, 3)}

    runs = [(s, False) for s in args.seq_lens] + [(s, True) for s in args.offload_seq_lens]
    for seq, offload in runs:
        r = load_recipe(args.recipe, common + [f"data.max_seq_len={seq}",
                                               f"train.offload_activations={str(offload).lower()}"])
        pred = plan(r, device=args.device, budget_gib=16.0)
        micro = [sample(config, seq, args.device, dtype, seed=i) for i in range(args.grad_accum)]
        run = {"seq_len": seq, "offload_activations": offload, "grad_accum": args.grad_accum, "steps": args.steps,
               "image_tokens": IMAGE_TOKENS, "audio_tokens": int(AUDIO_SECONDS * AUDIO_TOKENS_PER_S),
               "predicted": {k: pred[k] for k in ("peak_gib", "allocated_gib", "reserved_gib", "fits")}
               | {"breakdown": pred["breakdown"]}}
        if args.device == "cuda":
            for p in model.parameters():
                p.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            losses, seconds = run_steps(model, r, micro, args.steps, args.device)
            run.update(losses=[round(x, 4) for x in losses], step_seconds=round(seconds, 2), oom=False)
        except torch.cuda.OutOfMemoryError:
            run.update(oom=True)
        if args.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            m = {"max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                 "max_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
                 # reserved pool + CUDA context + anything else on the card, after the steps
                 "device_used_gib": (total - free) / GIB}
            run["measured"] = {k: round(v, 3) for k, v in m.items()}
            run["ratio_measured_over_predicted"] = {
                "allocated": round(m["max_allocated_gib"] / pred["allocated_gib"], 3),
                "reserved": round(m["max_reserved_gib"] / pred["reserved_gib"], 3),
                "device": round(m["device_used_gib"] / pred["peak_gib"], 3)}
        record["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
        del micro

    if args.device == "cuda":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}")
    else:
        print("cpu dry run: nothing written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
