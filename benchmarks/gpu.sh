#!/usr/bin/env bash
# bert-base at max_length 512, bf16, one NVIDIA GPU: tokens/s and MFU of harness, with and without
# torch.compile (benchmarks/gpu_bench.py). Offline: builds its model and data; about 4 minutes on an H100.
#
#   bash benchmarks/gpu.sh                    # results table on stdout, JSON in $OUT (default .)
#
# Where Python packages cannot be installed, put wheels of the missing ones (e.g. datasets, dill,
# multiprocess, pyarrow) in .whl/ at the repository root: they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 benchmarks/gpu_bench.py "$@"
