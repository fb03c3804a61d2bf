#!/usr/bin/env bash
# The GPU commands. On a lent GPU machine (the device tool), from the repository root, with the
# ignored folder .whl/ carried (`make gpu-wheels` fills it here; `python benchmarks/gpu.py
# --preflight` checks here that the tree and the wheels fit what the tool carries):
#     bash benchmarks/gpu_run.sh train      # ≤ 5 min on an H200: memory, speed, peers → $OUT/gpu-train.json
#     bash benchmarks/gpu_run.sh product    # ≤ 5 min: DPO, drafter, GRPO, load path → $OUT/gpu-product.json
#     bash benchmarks/gpu_run.sh long       # ≤ 4 min: 16k blocked ± attention tiles, 32k tiled → $OUT/gpu-long.json
#     bash benchmarks/gpu_run.sh fsdp       # ≤ 2 min: FSDP2 + QLoRA (bf16 storage) at world size 1 vs
#                                           # the same run without FSDP → $OUT/gpu_fsdp.json
# Each installs the wheels into a private folder (the machine's torch is left alone) and leaves
# its JSON in $OUT (the device tool's return folder) or, without $OUT, in benchmarks/results/.
# Back here: python benchmarks/gpu.py --merge gpu-train.json gpu-product.json gpu-long.json
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-train}"; shift || true
case "$part" in train|product|long|fsdp) ;; *) echo "usage: $0 train|product|long|fsdp [gpu.py options]"; exit 2 ;; esac
out="${OUT:-benchmarks/results}"
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run 'make gpu-wheels' first"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
if [ "$part" = fsdp ]; then
  timeout 150 python3 benchmarks/gpu_fsdp_check.py --out "$out/gpu_fsdp.json"
else
  timeout 290 python3 benchmarks/gpu.py --part "$part" --out "$out/gpu-$part.json" "$@"
fi
