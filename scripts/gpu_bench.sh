#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md, one stage per argument, results under $OUT
# (default ./gpu-results). Model: a config folder with random weights (--load-format dummy), e.g.
#   mkdir -p .models/llama-3-8b && cp ../shared/models/llama-3-8b/config.json .models/llama-3-8b/
#   MODEL=.models/llama-3-8b scripts/gpu_bench.sh tests one-batch grpc-hop parity serving hf-baseline
set -uo pipefail
MODEL=${MODEL:-.models/llama-3-8b}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rs=(python -m services.cli)
common=(--model-path "$MODEL" --load-format dummy --dtype bfloat16 --skip-tokenizer-init)

stage_tests() {
  timeout 300 python -m pytest -q -x -m "cuda or not cuda" -p no:cacheprovider \
    tests/test_kernels_extend_attention.py tests/test_kernels_decode_attention.py \
    tests/test_kernels_triton_elementwise.py tests/test_cuda_executor.py tests/test_model_vs_hf.py 2>&1 | tail -25
}

stage_one_batch() {
  timeout 300 "${rs[@]}" bench one-batch "${common[@]}" --batch-size 1 32 128 --input-len 128 --output-len 32 \
    --run-name cuda-graph --result-filename "$OUT/one_batch.jsonl" 2>&1 | grep -v '^{' | tail -30
}

stage_one_batch_eager() {
  timeout 300 "${rs[@]}" bench one-batch "${common[@]}" --batch-size 1 128 --input-len 128 --output-len 16 \
    --disable-cuda-graph --run-name eager --result-filename "$OUT/one_batch.jsonl" 2>&1 | grep -v '^{' | tail -10
}

stage_grpc_hop() {
  local port=31013
  "${rs[@]}" executor "${common[@]}" --executor-addr 127.0.0.1:$port --max-total-tokens 65536 > "$OUT/executor.log" 2>&1 &
  local pid=$!
  for _ in $(seq 240); do python - <<EOF 2>/dev/null && break
import socket; socket.create_connection(("127.0.0.1", $port), 1)
EOF
    sleep 1; done
  timeout 200 "${rs[@]}" bench one-batch --over-grpc --executor-addr 127.0.0.1:$port --batch-size 1 --input-len 128 \
    --output-len 64 --run-name grpc --result-filename "$OUT/one_batch.jsonl" 2>&1 | grep -v '^{' | tail -5
  kill $pid; wait $pid
}

stage_parity() {
  timeout 300 python scripts/check_hf_parity.py --model-path "$MODEL" --max-new-tokens 32 | tee "$OUT/parity.json"
}

for stage in "$@"; do
  echo "=== $stage"
  t0=$(date +%s)
  "stage_${stage//-/_}"
  echo "=== $stage took $(( $(date +%s) - t0 ))s"
done
