"""What FSDP2 + QLoRA needs a GPU for, checked on one: NF4 weights stored as bf16, sharded by
`fully_shard` on CUDA (NCCL, bitsandbytes' CUDA kernels, bf16 compute), against the same run
without FSDP.

    python benchmarks/gpu_fsdp_check.py --out benchmarks/results/gpu_fsdp.json

The CPU tests (tests/training/test_fsdp.py) run FSDP2 + QLoRA on 2 gloo processes with bitsandbytes' CPU
kernels in fp32 and find it bit-identical to one process. What only a GPU shows: the CUDA
4-bit kernels reading weights that FSDP all-gathered (the quant state travels with the module,
not the parameter), bf16 compute under the sharded forward, NCCL collectives, and that the loss
is neither 0 nor NaN (accelerate#3983's symptom with uint8 storage). World size 1 here: the
same `fully_shard` path with one shard (the device tool lends one GPU).

Both runs train the tiny gemma4_unified base (finetune.demo) for a few steps: one plain
process, one `accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1`.
Written to `--out`: losses of both, the adapters' largest difference, and the run's own line
on what it sharded (bytes per process, the 4-bit weights among them). Exit 1 when a loss is 0 or not finite, or the runs
differ by more than bf16 allows (see `TOLERANCE`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
# bf16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 2e-3); with one shard the sharded run does
# the same arithmetic, so only non-deterministic kernels (atomics in attention's backward) can
# make the runs differ: a few bf16 roundings of a loss near 7, after STEPS steps.
TOLERANCE = 0.05


def _recipe(root: Path, base: Path, data: Path, name: str, batch_size: int) -> Path:
    import yaml

    raw = {"model": {"base": str(base), "quantization": "nf4", "quant_storage": "bf16", "dtype": "bf16"},
           "datasets": [{"path": str(p), "format": "messages"} for p in sorted(data.glob("train_*.jsonl"))],
           "data": {"max_seq_len": 256, "image_tokens": 70, "cache_dir": str(root / "cache")},
           "lora": {"r": 8, "alpha": 16, "targets": ["attention", "mlp", "vision", "audio"]},
           "train": {"output_dir": str(root / name), "batch_size": batch_size, "lr": 1e-3, "seed": 0, "warmup": 1,
                     "max_steps": STEPS}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_fsdp.json"))
    ap.add_argument("--processes", type=int, default=1, help="FSDP processes (1 on one GPU)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from finetune.demo.data import make_demo_data
    from finetune.demo.tiny_model import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_tiny_model(root / "base", seed=0)
        data = make_demo_data(root / "data", seed=0, n_image=8, n_audio=8, n_text_repeat=1, n_mixed=4,
                              n_eval_each=2)
        # the same global batch: 2 samples on each FSDP process, all of them on the plain one
        plain = _recipe(root, base, Path(data), "plain", 2 * args.processes)
        sharded = _recipe(root, base, Path(data), "fsdp", 2)
        _run([sys.executable, "-m", "finetune.cli", "train", str(plain)])
        log = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(args.processes),
                    "-m", "finetune.cli", "train", str(sharded)])
        a, b = _losses(root / "plain"), _losses(root / "fsdp")
        x = load_file(str(root / "plain" / "adapter" / "adapter_model.safetensors"))
        y = load_file(str(root / "fsdp" / "adapter" / "adapter_model.safetensors"))
        result = {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "processes": args.processes, "steps": STEPS,
            "losses_plain": a, "losses_fsdp": b,
            "max_loss_diff": max(abs(p - q) for p, q in zip(a, b)),
            "same_adapter_keys": x.keys() == y.keys(),
            "max_adapter_diff": max(float((x[k].float() - y[k].float()).abs().max()) for k in x),
            "gathered_message": "adapter gathered from" in log,
            "sharded": next((x for x in log.splitlines() if x.startswith("fsdp: ")), None),
        }
    bad = [v for v in a + b if v == 0 or not math.isfinite(v)]
    ok = not bad and result["same_adapter_keys"] and result["gathered_message"] and \
        result["max_loss_diff"] <= TOLERANCE and len(a) == len(b) == STEPS
    result["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
