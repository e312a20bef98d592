#!/usr/bin/env bash
# One NVIDIA GPU, bert-base at max_length 512, offline, one call of about six minutes (docs/performance.md):
#   1. seed recipe vs best-configured Trainer vs harness with eager steps vs harness (whole steps replayed as
#      CUDA graphs, train.cuda_graphs=auto), batch 8, the first 60 steps of each untimed (benchmarks/throughput.py);
#   2. harness variants x per-device batch: samples/s, tokens/s, MFU, compile time apart (benchmarks/gpu_bench.py).
#
#   bash benchmarks/gpu.sh                    # one table at the end (summary.txt); JSON and logs in $OUT (default .)
#   STEPS=100 BATCHES=8,128 VARIANTS=v0.1,default,compile_layers bash benchmarks/gpu.sh
#   VARIANTS=autocast,default bash benchmarks/gpu.sh  # the default on GPUs: bf16 weights + fp32 masters
#   SYSTEMS=seed,trainer,harness_v01,harness,harness_step_graphs_layers TP_WARMUP=60 bash benchmarks/gpu.sh
#       # part 1 with gpu_bench variants too (harness_VARIANT); TP_WARMUP steps of every system untimed (compilation,
#       # captures)
#
# Each run is a process of its own, stopped after HARNESS_BENCH_CHILD_TIMEOUT seconds (default 150: a compilation
# that takes longer is reported as failed, and the other rows still come back).
#
# Where Python packages cannot be installed, put wheels of the missing ones (e.g. datasets, dill,
# multiprocess, pyarrow) in .whl/ at the repository root: they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import datasets" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HARNESS_BENCH_CHILD_TIMEOUT=${HARNESS_BENCH_CHILD_TIMEOUT:-150}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-.}
ASSETS=${ASSETS:-/tmp/harness-gpu-assets}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks.gpu_bench --assets "$ASSETS" --examples "${EXAMPLES:-3000}" --build-only
python3 -m benchmarks.throughput --model "$ASSETS/bert-base-random" --data "$ASSETS/data" --samples "${SAMPLES:-1024}" \
    --batch 8 --rounds 1 --warmup "${TP_WARMUP:-60}" --systems "${SYSTEMS:-seed,trainer,harness_eager,harness}" --json "$OUT/throughput.json" | tee "$OUT/throughput.txt"
python3 -m benchmarks.gpu_bench --assets "$ASSETS" --steps "${STEPS:-60}" --warmup "${WARMUP:-30}" \
    --batches "${BATCHES:-8,128}" --variants "${VARIANTS:-eager,default,step_graphs_layers,unpadded}" --out "$OUT" | tee "$OUT/gpu_bench.txt"
echo
python3 -m benchmarks.gpu_bench --summary "$OUT" | tee "$OUT/summary.txt"
