"""The prepared GPU run: the real Gemma 4 12B shape, measured against the plan and against its peers.

    make gpu-wheels                          # here: fills .whl/ (transformers, peft, bitsandbytes, trl…)
    python benchmarks/gpu.py --preflight     # here: what the device tool carries fits its 64 MiB
    bash benchmarks/gpu_run.sh train         # there, ≤ 5 min: memory, speed, peers → gpu-train.json
    bash benchmarks/gpu_run.sh product       # there, ≤ 5 min: DPO, drafter, GRPO, load path → gpu-product.json
    python benchmarks/gpu.py --merge A.json B.json   # here: both into benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run       # the same code paths on the CPU at a tiny scale (tested)

No download: the 12B is built from the bundled config with random weights straight into NF4 on
the GPU (benchmarks/gpu_build.py); the user's own path, a sharded bf16 checkpoint quantized on
load, is timed in `load_path` (benchmarks/gpu_load.py). LoRA r=16 on attention + MLP + the
vision/audio projections (the mixed recipe), chunked CE, gradient checkpointing, 8-bit AdamW
steps through `finetune.training.step.optimizer_step`.

Part `train` (into `--out`):
- `runs`: peak `max_memory_allocated`/`max_memory_reserved`, the card's used memory and tokens/s
  for one row holding an image (280 tokens), 10 s of audio and text, at 4096 tokens and 16384,
  with `train.attention=blocked` (no repeated k/v), next to `finetune plan`'s prediction;
  `ablations`: the same at 4096 with one setting changed (stock sdpa, sdpa_gqa, no MLP tiles,
  offload copies overlapped on a side stream with prefetch).
- `hf_baseline`: HF `Trainer` + PEFT on one full 4096-token row (its default loss: full logits).
- `peers` and `throughput`: real tokens/s on the same mixed samples: ours packed into 4096-token
  rows; HF Trainer one sample a step and on rows the user pre-packed; TRL `SFTTrainer`
  `padding_free` (text samples: its collator carries no media) against ours on the same text;
  unsloth: why it is not in the run.
- `profile`: the step's top CUDA kernels.
Part `product`: `objectives` (DPO 2 × 2,048, the drafter-alignment step, a GRPO step when that
objective exists) and `load_path`. Part `long`: 16k rows with the blocked attention with and
without `train.tile_attention`, and 32k tiled, next to the plan.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_build as build  # noqa: E402
from benchmarks.gpu_steps import _fresh, profile_step, run_ours  # noqa: E402
from data_tools.collate import collate, collate_packed, pack_rows  # noqa: E402
from finetune.config.recipe import load_recipe, with_overrides  # noqa: E402
from finetune.plan.skeleton import load_config  # noqa: E402

RECIPE = ROOT / "recipes/gemma4-12b/mixed-image-audio-text.yaml"
FULL = {"seq": [4096, 16384], "mixed_samples": 32, "text_samples": 24, "hf_steps": 2, "dpo_seq": 2048, "prompt": 1024,
        "grpo_new_tokens": 256, "shard_bytes": 4 * 2**30}
DRY = {"seq": [160, 320], "mixed_samples": 6, "text_samples": 8, "hf_steps": 2, "dpo_seq": 160, "prompt": 96,
       "grpo_new_tokens": 16, "shard_bytes": 2**20}
ATTENTION = ["train.attention=blocked"]  # the new path: what `runs` measure
TRAVEL_LIMIT = 64 * 2**20  # what the device tool carries: the tree + the ignored paths named
PARTS = ("train", "product", "long")
TILED = [*ATTENTION, "train.tile_attention=true"]  # the long-context path (masks never whole, attention tiles)


def preflight() -> int:
    """The tree + .whl/ under the device tool's 64 MiB (a check of this machine, not of the product)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    tree = sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())
    wheels = sum(w.stat().st_size for w in (ROOT / ".whl").glob("*.whl"))
    print(f"tree {tree / 2**20:.1f} MiB + wheels {wheels / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB")
    if not wheels:
        print("no wheels in .whl/: run 'make gpu-wheels' first")
        return 2
    return 0 if tree + wheels < TRAVEL_LIMIT else 1


def merge(parts: list[str], out: Path) -> int:
    """The parts' JSON into one gpu.json (later parts add their sections)."""
    record: dict = {}
    for p in parts:
        record.update(json.loads(Path(p).read_text()))
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


class Run:
    """The model and the recipe base every measurement of one part shares, and the JSON it fills."""

    def __init__(self, args):
        self.device = "cpu" if args.dry_run else "cuda"
        self.scale = DRY if args.dry_run else FULL
        self.dtype = torch.float32 if args.dry_run else torch.bfloat16
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        self.common = [f"data.image_tokens={build.IMAGE_TOKENS}", f"data.max_audio_seconds={build.AUDIO_SECONDS}",
                       "train.batch_size=1", "train.grad_accum=1"]
        self.processor_from = None
        self.media = build.DRY_MEDIA if args.dry_run else {}
        if args.dry_run:
            torch.set_num_threads(1)  # tiny ops on a shared CPU: threads spin against each other
            from finetune.demo.tiny_model import write_tiny_model

            self.processor_from = str(write_tiny_model(self.tmp / "tiny"))
            self.common += [f"model.base={self.processor_from}", f"data.image_tokens={build.DRY_MEDIA['image_tokens']}",
                            f"data.max_audio_seconds={build.DRY_MEDIA['audio_s']}",
                            f"train.mlp_tile_tokens={DRY['seq'][0] // 2}", "train.attention_block_rows=64"]
        self.base = load_recipe(RECIPE, self.common)
        self.config, source = load_config(self.base.model)
        from finetune.model.families import family_for
        from finetune.model.load import enable_gradient_checkpointing
        from finetune.model.lora import attach_lora

        self.family = family_for(self.config.model_type)
        t0 = time.time()
        torch.manual_seed(0)
        model = build.build_quantized(self.config, self.device, self.dtype, self.base.model.double_quant)
        enable_gradient_checkpointing(model)
        self.model = attach_lora(model, self.base.lora, self.family).train()
        import bitsandbytes
        import peft
        import transformers

        self.record = {
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "config": source,
            "recipe": str(RECIPE.relative_to(ROOT)), "overrides": self.common[:4],
            "versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                         "bitsandbytes": bitsandbytes.__version__},
            "build_seconds": round(time.time() - t0, 1)}
        try:
            import trl

            self.record["versions"]["trl"] = trl.__version__
        except ImportError as e:  # an optional peer: its absence is recorded, not fatal
            self.record["versions"]["trl"] = f"not importable: {e}"
        self.pad = self.config.get_text_config().pad_token_id or 0
        self.out = Path(args.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:  # after every stage: a crash or timeout later still leaves what was measured
        self.out.write_text(json.dumps(self.record, indent=1) + "\n")

    def guarded(self, fn, *a, **kw) -> dict:
        """fn(*a), or {"error": ...} (an OOM or a failure in one stage must not lose the others)."""
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - recorded, and the run goes on
            for p in self.model.parameters() if self.model is not None else []:
                p.grad = None
            _fresh(self.device)
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}

    def measure(self, seq: int, overrides: list[str], label: str) -> dict:
        from finetune.plan.report import plan

        recipe = with_overrides(self.base, [f"data.max_seq_len={seq}", *overrides])
        row = collate([build.full_row(self.config, seq, **self.media)], self.pad)
        result = self.guarded(run_ours, self.model, recipe, self.family, [row, row], self.device, self.dtype)
        p = plan(recipe, device="cuda")
        entry = {"label": label, "seq_len": seq, "overrides": overrides, **result, "planned_gib": p["peak_gib"],
                 "planned_allocated_gib": p["allocated_gib"], "planned_reserved_gib": p["reserved_gib"]}
        print(json.dumps(entry), flush=True)
        self.save()
        return entry

    def packed(self, samples: list[dict], seq: int) -> tuple[list[dict], list[list[int]]]:
        """Our packed rows of `samples` (a warm-up row first) and the groups they hold."""
        rows = pack_rows([len(s["input_ids"]) for s in samples], list(range(len(samples))), seq)
        text = self.config.get_text_config()
        batches = [collate_packed([[samples[i] for i in row]], self.pad, text.sliding_window, text.layer_types)
                   for row in [rows[0], *rows]]
        return batches, rows


def part_train(run: Run, skip: list[str]) -> None:
    short, long_ = run.scale["seq"]
    rec, m = run.record, run.model
    rec["runs"], rec["ablations"] = [], []
    rec["runs"].append(run.measure(short, ATTENTION, "ours: recipe settings, blocked attention"))
    if "16k" not in skip:  # the recipe's 2k tiles are for 4k; at 16k, 1k tiles
        rec["runs"].append(run.measure(long_, [*ATTENTION, f"train.mlp_tile_tokens={long_ // 16}"],
                                       "ours: offload + 1k MLP tiles, blocked attention"))
    for label, ov in [("stock sdpa attention (the first run's)", ["train.attention=sdpa"]),
                      ("sdpa_gqa attention", ["train.attention=sdpa_gqa"]),
                      ("blocked attention, no MLP tiles", [*ATTENTION, "train.mlp_tile_tokens=0"]),
                      ("blocked attention, offload with prefetch", [*ATTENTION, "train.offload_prefetch=true"])]:
        rec["ablations"].append(run.measure(short, ov, label))
    hf_rows = [build.full_row(run.config, short, seed=s, **run.media) for s in range(run.scale["hf_steps"] + 1)]
    from benchmarks.gpu_peers import UNSLOTH, run_hf, run_trl

    rec["hf_baseline"] = {"seq_len": short, **run.guarded(run_hf, m, hf_rows, run.pad, run.device, run.dtype, run.tmp),
                          "how": "transformers Trainer + PEFT, one full row a step, gradient checkpointing, "
                                 "adamw_bnb_8bit, the model's own loss (full logits), no autocast"}
    run.save()
    # mixed data: ours packed against each peer
    samples = build.mixed_samples(run.config, run.scale["mixed_samples"], short, **run.media)
    batches, rows = run.packed(samples, short)
    tp = {"samples": len(samples), "real_tokens": sum(len(s["input_ids"]) for s in samples), "packed_rows": len(rows)}
    rec["throughput"] = tp
    recipe = with_overrides(run.base, [f"data.max_seq_len={short}", "train.packing=true", *ATTENTION])
    res = run.guarded(run_ours, m, recipe, run.family, batches, run.device, run.dtype)
    tp["ours"] = res.get("tokens_per_s", res.get("error"))
    run.save()
    peers = rec["peers"] = {"unsloth": UNSLOTH}
    one = run.guarded(run_hf, m, samples[:1] + samples, run.pad, run.device, run.dtype, run.tmp)
    peers["hf_trainer_one_sample"] = one
    prepacked = [build.concat_samples([samples[i] for i in row], run.pad, short) for row in [rows[0], *rows]]
    real = [sum(len(samples[i]["input_ids"]) for i in row) for row in [rows[0], *rows]]
    peers["hf_trainer_prepacked_rows"] = run.guarded(run_hf, m, prepacked, run.pad, run.device, run.dtype, run.tmp,
                                                     real_tokens=real)
    run.save()
    text = build.text_samples(run.config, run.scale["text_samples"], short)
    trl = run.guarded(run_trl, m, text, run.pad, short, run.device, run.tmp)
    if "skipped" not in trl and "error" not in trl:
        text_batches, _ = run.packed(text, short)
        recipe = with_overrides(run.base, [f"data.max_seq_len={short}", "train.packing=true", *ATTENTION])
        trl["ours_same_text"] = run.guarded(run_ours, m, recipe, run.family, text_batches, run.device,
                                            run.dtype).get("tokens_per_s")
    peers["trl_sft_padding_free"] = trl
    for name, peer in [("hf", one), ("hf_prepacked", peers["hf_trainer_prepacked_rows"])]:
        if isinstance(tp.get("ours"), float) and isinstance(peer.get("tokens_per_s"), float):
            tp[f"ratio_vs_{name}"] = round(tp["ours"] / peer["tokens_per_s"], 3)
    print(json.dumps({"throughput": tp, "peers": peers}), flush=True)
    run.save()
    if "profile" not in skip:
        recipe = with_overrides(run.base, [f"data.max_seq_len={short}", *ATTENTION])
        rec["profile"] = run.guarded(profile_step, m, recipe, run.family,
                                     collate([build.full_row(run.config, short, **run.media)], run.pad), run.device,
                                     run.dtype)
    run.save()


def part_long(run: Run, skip: list[str]) -> None:
    """Long rows on one GPU: at 16k the blocked attention with and without its tiles, then 32k
    tiled (planned 17.07 GiB with the recipe's settings: what 2 × 16 GB hold under FSDP2 once the
    weights are split), each next to the plan."""
    long_ = run.scale["seq"][1]
    tiles = f"train.mlp_tile_tokens={long_ // 8}"
    rec = run.record
    rec["long"] = [run.measure(long_, [*ATTENTION, tiles], "16k: blocked attention (lazy masks)"),
                   run.measure(long_, [*TILED, tiles], "16k: blocked attention + attention tiles")]
    run.save()
    if "32k" not in skip:
        rec["long"].append(run.measure(2 * long_, [*TILED, tiles], "32k: blocked attention + attention tiles"))
    run.save()


def part_product(run: Run, skip: list[str]) -> None:
    from benchmarks import gpu_load, gpu_product

    rec, s = run.record, run.scale
    common = [*run.common, *ATTENTION]
    objectives = rec["objectives"] = {}
    objectives["dpo"] = run.guarded(gpu_product.dpo_step, run.model, run.family, run.config, common, s["dpo_seq"],
                                    run.device, run.dtype, run.media)
    run.save()
    if run.processor_from is None:  # a processor for the drafter's stop ids (text prompts only)
        from finetune.demo.tiny_model import write_tiny_model

        run.processor_from = str(write_tiny_model(run.tmp / "processor"))
    objectives["drafter"] = run.guarded(gpu_product.drafter_step, run.model, run.family, run.config, common,
                                        run.processor_from, run.tmp, run.device, run.dtype, s["prompt"])
    run.save()
    objectives["grpo"] = run.guarded(gpu_product.grpo_step, run.model, run.family, run.config, common,
                                     run.processor_from, run.device, run.dtype, s["prompt"], s["grpo_new_tokens"])
    run.save()
    if "load" in skip:
        return
    run.model = None  # the card to the child that loads the checkpoint (its peaks are its own)
    _fresh(run.device)
    ckpt = run.tmp / "checkpoint"
    written = run.guarded(gpu_load.write_checkpoint, run.config, ckpt, run.device, s["shard_bytes"])
    rec["load_path"] = written
    run.save()
    if "error" not in written:
        overrides = [*common, f"data.max_seq_len={s['seq'][0]}"]
        res = run.guarded(gpu_load.measure_in_child, ckpt, RECIPE, overrides, run.tmp / "load.json",
                          run.device == "cpu", 200)
        rec["load_path"].update(res)
    run.save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same paths on the CPU with a tiny model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu.json"))
    ap.add_argument("--part", nargs="*", default=list(PARTS), choices=PARTS)
    ap.add_argument("--skip", nargs="*", default=[], choices=["16k", "32k", "profile", "load"])
    ap.add_argument("--preflight", action="store_true", help="check what the device tool carries, then stop")
    ap.add_argument("--merge", nargs="*", metavar="PART_JSON", help="merge parts' JSON into --out, then stop")
    args = ap.parse_args(argv)
    if args.preflight:
        return preflight()
    if args.merge:
        return merge(args.merge, Path(args.out))
    if not args.dry_run and not torch.cuda.is_available():
        print("needs CUDA (or --dry-run)")
        return 1
    run = Run(args)
    if "train" in args.part:
        part_train(run, args.skip)
    if "long" in args.part:  # before product, which hands the model over to its own steps
        part_long(run, args.skip)
    if "product" in args.part:
        part_product(run, args.skip)
    run.save()
    print(f"wrote {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
