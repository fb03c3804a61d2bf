#!/usr/bin/env bash
# The one GPU command. On a lent GPU machine (the device tool), from the repository root, with
# the ignored folder .whl/ carried (`make gpu-wheels` fills it here):
#     bash benchmarks/gpu_run.sh
# It installs the wheels into a private folder (the machine's torch is left alone), measures
# (benchmarks/gpu.py, ~4-5 min on an H200) and writes gpu.json to $OUT (the device tool's
# return folder) or, without $OUT, to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
ls .whl/*.whl >/dev/null || { echo "no wheels in .whl/: run 'make gpu-wheels' first"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
timeout 480 python3 benchmarks/gpu.py --out "$out/gpu.json" "$@"
