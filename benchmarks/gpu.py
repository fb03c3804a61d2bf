"""The prepared GPU run: the real Gemma 4 12B shape, measured against the plan and against HF Trainer.

    make gpu-wheels                      # here: fills .whl/ (transformers, peft, bitsandbytes)
    bash benchmarks/gpu_run.sh           # there: installs .whl/ into /tmp/site, runs this
    python benchmarks/gpu.py --dry-run   # the same code path on the CPU at a tiny scale (tested)

No download: the 12B is built from the bundled config with random weights, one weight at a time
straight into NF4 on the GPU (host memory stays small; weights don't change memory or speed).
LoRA r=16 on attention + MLP + the vision/audio projections (the mixed recipe), chunked CE,
gradient checkpointing, real 8-bit AdamW steps through `finetune.training.step.optimizer_step`.

What it measures, into `--out` (gpu.json):
- `runs`: peak `max_memory_allocated`/`max_memory_reserved`, the card's used memory and
  tokens/s for one row holding an image (280 tokens), 10 s of audio and text, at 4096 tokens
  (the recipe's memory path) and 16384 (offload + MLP tiles), next to `finetune plan`'s
  prediction for the same settings; `ablations`: the same at 4096 with one trick switched off.
- `hf_baseline`: HF `Trainer` + PEFT on the same model at 4096 tokens (its default loss: full
  logits), memory and tokens/s.
- `throughput`: real tokens/s on the same mixed-length samples (image QA, audio, text chat, as
  in the mixed recipe) — ours packs them into 4096-token rows, the baseline takes one sample
  per step as a 16 GB card must.
- `profile`: the step's top CUDA kernels (torch.profiler), for the next optimisation.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools.collate import collate, collate_packed, pack_rows  # noqa: E402
from data_tools.render import IGNORE  # noqa: E402
from finetune.config.recipe import load_recipe, with_overrides  # noqa: E402
from finetune.plan.estimate import AUDIO_TOKENS_PER_S  # noqa: E402
from finetune.plan.skeleton import load_config, model_class, not_quantized  # noqa: E402

GIB = 2**30
RECIPE = ROOT / "recipes/gemma4-12b/mixed-image-audio-text.yaml"
IMAGE_TOKENS = 280
AUDIO_SECONDS = 10.0
FULL = {"seq": [4096, 16384], "mixed_samples": 48, "hf_steps": 2}
DRY = {"seq": [160, 320], "mixed_samples": 6, "hf_steps": 2}


# ---------------------------------------------------------------- the model


def build_quantized(config, device: str, dtype: torch.dtype, double_quant: bool = True, seed: int = 0):
    """The model with random weights, NF4 linears, built module by module on `device`.

    Same choices as `finetune.model.load.load_base`: bitsandbytes NF4 for every Linear except the
    tied lm_head (the rule `finetune plan` counts with), everything else in `dtype`."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        model = model_class(config, None)(config)
    skip, should_convert = not_quantized(model)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and should_convert(name, skip):
            model.set_submodule(name, bnb.nn.Linear4bit(
                mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
                compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8, device="meta"))
    gen = torch.Generator(device=device).manual_seed(seed)
    for _, mod in list(model.named_modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if isinstance(mod, bnb.nn.Linear4bit) and pname == "weight":
                # one bf16 weight at a time, quantized on the device, then freed
                w = torch.empty(p.shape, dtype=dtype, device=device).normal_(0, 0.02, generator=gen)
                mod.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                               compress_statistics=double_quant, quant_storage=torch.uint8,
                                               module=mod).to(device)
                del w
                continue
            t = torch.empty(p.shape, dtype=dtype, device=device)
            if pname == "bias":
                t.zero_()
            elif isinstance(mod, nn.LayerNorm) or "RMSNorm" in type(mod).__name__:
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
    left = [n for n, t in [*model.named_buffers(), *model.named_parameters()] if t.is_meta]
    if left:
        raise RuntimeError(f"still on meta: {left[:5]}")


# ---------------------------------------------------------------- samples


def make_sample(config, rng: random.Random, *, text: int, answer: int, image: bool, audio_s: float) -> dict:
    """One rendered sample as `data_tools` holds it: prompt text, [image], [audio], answer."""
    vocab_hi = min(getattr(config, a) for a in ("image_token_id", "boi_token_id", "audio_token_id"))
    ids, types, media = [], [], {}
    words = lambda n: [rng.randrange(3, vocab_hi) for _ in range(n)]  # noqa: E731
    ids += words(text)
    if image:
        ids += [config.boi_token_id] + [config.image_token_id] * IMAGE_TOKENS + [config.eoi_token_id]
        v = config.vision_config
        patch_dim = (v.patch_size * v.pooling_kernel_size) ** 2 * 3
        side = 14  # a 14 × 20 grid of 48-px patches = 280 soft tokens
        pos = np.stack(np.meshgrid(np.arange(side), np.arange(IMAGE_TOKENS // side), indexing="xy"), -1)
        media["pixel_values"] = [np.random.default_rng(rng.randrange(1 << 30)).integers(
            0, 256, (IMAGE_TOKENS, patch_dim), dtype=np.uint8)]
        media["image_position_ids"] = [pos.reshape(-1, 2).astype(np.int32)]
    if audio_s:
        frames = int(audio_s * AUDIO_TOKENS_PER_S)
        ids += [config.boa_token_id] + [config.audio_token_id] * frames + [config.eoa_token_index]
        media["input_features"] = [np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
            (frames, config.audio_config.audio_embed_dim), dtype=np.float32) * 0.1]
    prompt = len(ids)
    ids += words(answer)
    types = [1 if i == config.image_token_id else 3 if i == config.audio_token_id else 0 for i in ids]
    labels = [IGNORE] * prompt + ids[prompt:]
    return {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, **media}


def full_row(config, seq_len: int, seed: int = 0) -> dict:
    """`seq_len` tokens: an image, 10 s of audio, text, and an answer of a quarter (≤ 1024)."""
    media = IMAGE_TOKENS + 2 + int(AUDIO_SECONDS * AUDIO_TOKENS_PER_S) + 2
    answer = min(1024, seq_len // 4)
    return make_sample(config, random.Random(seed), text=seq_len - media - answer, answer=answer,
                       image=True, audio_s=AUDIO_SECONDS)


def mixed_samples(config, n: int, max_len: int, seed: int = 0) -> list[dict]:
    """The mixed recipe's kinds in its weights (0.4 image QA, 0.3 audio, 0.3 text chat), at
    lengths such data has; `max_len` scales the text (4096: ~720 tokens a sample on average)."""
    rng, out, k = random.Random(seed), [], max_len / 4096
    for _ in range(n):
        kind = rng.choices(["image", "audio", "text"], [0.4, 0.3, 0.3])[0]
        if kind == "image":
            s = make_sample(config, rng, text=int(rng.randint(20, 80) * k) + 1, answer=int(rng.randint(10, 60) * k) + 1,
                            image=True, audio_s=0)
        elif kind == "audio":
            s = make_sample(config, rng, text=int(20 * k) + 1, answer=int(rng.randint(20, 150) * k) + 1,
                            image=False, audio_s=rng.uniform(3, 30) * k)
        else:
            s = make_sample(config, rng, text=int(rng.randint(100, 1700) * k) + 1,
                            answer=int(rng.randint(100, 800) * k) + 1, image=False, audio_s=0)
        out.append(s)
    return out


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    from finetune.training.wrappers import to_device as move

    return move(batch, device, dtype)


# ---------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fresh(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(device: str) -> dict:
    if device != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
            # the reserved pool + CUDA context + anything else on the card
            "device_used_gib": round((total - free) / GIB, 3)}


def run_ours(model, recipe, family, batches: list[dict], device: str, dtype) -> dict:
    """Optimizer steps of one micro-batch each through the trainer's own step; the first is a
    warm-up (kernels, allocator) and is not timed."""
    from accelerate import Accelerator

    from finetune.model.memory_tricks import tile_mlp, untile_mlp
    from finetune.objectives import build
    from finetune.training.optim import make_optimizer, make_scheduler
    from finetune.training.step import optimizer_step

    untile_mlp(model)
    if recipe.train.mlp_tile_tokens:
        tile_mlp(model, recipe.train.mlp_tile_tokens, family.mlp_blocks)
    acc = Accelerator(cpu=device == "cpu")
    objective = build(recipe)
    optimizer = make_optimizer(model.parameters(), recipe.train, device)
    scheduler = make_scheduler(optimizer, recipe.train)
    _fresh(device)
    losses, times, tokens = [], [], 0
    for i, batch in enumerate(batches):
        b = to_device(batch, device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        loss, _, _ = optimizer_step(model, optimizer, scheduler, [b], acc, objective, recipe.train.max_grad_norm)
        _sync(device)
        losses.append(round(loss, 4))
        if i:
            times.append(time.perf_counter() - t0)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch and \
                not isinstance(batch["attention_mask"], dict) else int((batch["input_ids"] >= 0).sum())
    out = {"losses": losses, **_memory(device),
           "tokens_per_s": round(tokens / sum(times), 1) if times else None,
           "step_seconds": round(sum(times) / len(times), 3) if times else None}
    del optimizer, scheduler, objective
    for p in model.parameters():
        p.grad = None
    untile_mlp(model)
    _fresh(device)
    return out


def run_hf(model, samples: list[dict], pad_id: int, device: str, dtype, tmp: Path) -> dict:
    """HF `Trainer` + PEFT on the same model, one sample per step (its default loss: full logits)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i]

    def collator(rows):  # pixels and audio frames in the compute dtype: bnb's embedder can't cast
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                for k, v in collate(rows, pad_id).items()}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

    class Args(TrainingArguments):
        @property
        def place_model_on_device(self):  # the documented hook: the model is on its device already
            return False

    args = Args(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=1, max_steps=len(samples), learning_rate=1e-4,
        # No autocast (bf16=False): the model computes in bf16 with fp32 LoRA as ours does, and
        # accelerate's process-wide state already holds mixed_precision "no" from our runs.
        optim="adamw_bnb_8bit" if device == "cuda" else "adamw_torch", bf16=False,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_steps=10**6,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="sequential")
    _fresh(device)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator, callbacks=[Clock()])
    trainer.train()
    tokens = sum(len(s["input_ids"]) for s in samples[1:])
    out = {**_memory(device), "tokens_per_s": round(tokens / sum(times[1:]), 1),
           "step_seconds": round(sum(times[1:]) / len(times[1:]), 3)}
    del trainer
    for p in model.parameters():
        p.grad = None
    _fresh(device)
    return out


def profile_step(model, recipe, family, batch: dict, device: str, dtype, top: int = 25) -> list[dict]:
    """The top CUDA kernels (by total time) of one step of ours."""
    from torch.profiler import ProfilerActivity, profile

    if device != "cuda":
        return []
    run_ours(model, recipe, family, [batch], device, dtype)  # warm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_ours(model, recipe, family, [batch], device, dtype)
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]
    total = sum(e.device_time_total for e in prof.key_averages())
    return [{"kernel": e.key[:90], "ms": round(e.device_time_total / 1e3, 1),
             "share": round(e.device_time_total / max(total, 1), 3), "calls": e.count} for e in rows]


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same path on the CPU with a tiny model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    ap.add_argument("--skip", nargs="*", default=[], choices=["memory", "hf", "throughput", "profile", "16k"])
    ap.add_argument("--matrix", nargs="*", default=[], metavar="SEQ:TILE",
                    help="only memory runs at these lengths and MLP tile sizes (0 = none), to check the plan")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA (or --dry-run)")
        return 1
    scale = DRY if args.dry_run else FULL
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    common = [f"data.image_tokens={IMAGE_TOKENS}", f"data.max_audio_seconds={AUDIO_SECONDS}",
              "train.batch_size=1", "train.grad_accum=1"]
    if args.dry_run:
        from finetune.demo.tiny_model import write_tiny_model

        common += [f"model.base={write_tiny_model(tmp / 'tiny')}", "data.image_tokens=70",
                   f"train.mlp_tile_tokens={DRY['seq'][0] // 2}"]
    base = load_recipe(RECIPE, common)
    config, source = load_config(base.model)
    from finetune.model.families import family_for
    from finetune.model.load import enable_gradient_checkpointing
    from finetune.model.lora import attach_lora
    from finetune.plan.report import plan

    family = family_for(config.model_type)
    t0 = time.time()
    torch.manual_seed(0)
    model = build_quantized(config, device, dtype, base.model.double_quant)
    enable_gradient_checkpointing(model)
    model = attach_lora(model, base.lora, family)
    model.train()
    record = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "config": source,
              "recipe": str(RECIPE.relative_to(ROOT)), "overrides": common[:4],
              "build_seconds": round(time.time() - t0, 1), "runs": [], "ablations": []}
    import bitsandbytes
    import peft
    import transformers

    record["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__,
                          "bitsandbytes": bitsandbytes.__version__}
    short, long_ = scale["seq"]
    pad = config.get_text_config().pad_token_id or 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a crash or timeout later still leaves what was measured
        out.write_text(json.dumps(record, indent=1) + "\n")

    def guarded(fn, *a):
        """fn(*a), or {"error": ...} (an OOM or a failure in one stage must not lose the others)."""
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            for p in model.parameters():
                p.grad = None
            _fresh(device)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}

    def measure(seq: int, overrides: list[str], label: str) -> dict:
        recipe = with_overrides(base, [f"data.max_seq_len={seq}", *overrides])
        row = collate([full_row(config, seq)], pad)
        result = guarded(run_ours, model, recipe, family, [row, row], device, dtype)
        p = plan(recipe, device="cuda")
        entry = {"label": label, "seq_len": seq, "overrides": overrides, **result,
                 "planned_gib": p["peak_gib"], "planned_allocated_gib": p["allocated_gib"],
                 "planned_reserved_gib": p["reserved_gib"]}
        print(json.dumps(entry), flush=True)
        save()
        return entry

    if args.matrix:
        record["checks"] = []
        for seq, tile in (m.split(":") for m in args.matrix):
            record["checks"].append(measure(int(seq), [f"train.mlp_tile_tokens={tile}"], "plan check"))
            save()
        print(f"wrote {out}")
        return 0
    recipe_path = []  # the recipe's own settings (offload on, auto CE chunks, its MLP tiles)
    if "memory" not in args.skip:
        record["runs"].append(measure(short, recipe_path, "ours: recipe settings"))
    if "16k" not in args.skip and "memory" not in args.skip:  # the recipe's 2k tiles are for 4k; at 16k, 1k tiles
        record["runs"].append(measure(long_, [f"train.mlp_tile_tokens={long_ // 16}"], "ours: offload + 1k MLP tiles"))
    for label, ov in [("no MLP tiles", ["train.mlp_tile_tokens=0"]),
                      ("no activation offload", ["train.offload_activations=false"]),
                      ("CE chunks of 256", ["train.ce_chunk_size=256"])]:
        if "memory" not in args.skip:
            record["ablations"].append(measure(short, ov, label))
    if "hf" not in args.skip and "memory" not in args.skip:
        hf = guarded(run_hf, model, [full_row(config, short, seed=s) for s in range(scale["hf_steps"] + 1)],
                     pad, device, dtype, tmp)
        record["hf_baseline"] = {"seq_len": short, **hf}
        print(json.dumps(record["hf_baseline"]), flush=True)
        save()
    if "throughput" not in args.skip:
        samples = mixed_samples(config, scale["mixed_samples"], short)
        lengths = [len(s["input_ids"]) for s in samples]
        rows = pack_rows(lengths, list(range(len(samples))), short)
        text_cfg = config.get_text_config()
        packed = [collate_packed([[samples[i] for i in rows[0]]], pad, text_cfg.sliding_window,
                                 text_cfg.layer_types)]  # warm-up
        packed += [collate_packed([[samples[i] for i in row]], pad, text_cfg.sliding_window, text_cfg.layer_types)
                   for row in rows]
        tp = {"samples": len(samples), "real_tokens": sum(lengths), "packed_rows": len(rows)}
        record["throughput"] = tp
        for label, ov in [("ours", []), ("ours_no_tiles", ["train.mlp_tile_tokens=0"])]:
            recipe = with_overrides(base, [f"data.max_seq_len={short}", "train.packing=true", *ov])
            res = guarded(run_ours, model, recipe, family, packed, device, dtype)
            tp[label] = res.get("tokens_per_s", res.get("error"))
            save()
        if "hf" not in args.skip:
            res = guarded(run_hf, model, samples[:1] + samples, pad, device, dtype, tmp)
            tp["hf"] = res.get("tokens_per_s", res.get("error"))
            if all(isinstance(tp[k], float) for k in ("ours", "hf")):
                tp["ratio"] = round(tp["ours"] / tp["hf"], 3)
                tp["ratio_no_tiles"] = round(tp["ours_no_tiles"] / tp["hf"], 3)
        print(json.dumps(tp), flush=True)
        save()
    if "profile" not in args.skip:
        recipe = with_overrides(base, [f"data.max_seq_len={short}"])
        record["profile"] = guarded(profile_step, model, recipe, family, collate([full_row(config, short)], pad),
                                    device, dtype)
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
