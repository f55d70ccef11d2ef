#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md, one stage per argument, results under $OUT
# (default ./gpu-results). Model: a config folder with random weights (--load-format dummy), e.g.
#   mkdir -p .models/llama-3-8b && cp ../shared/models/llama-3-8b/config.json .models/llama-3-8b/
#   MODEL=.models/llama-3-8b scripts/gpu_bench.sh tests one-batch grpc-hop parity serving hf-baseline
# Several GPUs: comm parallel-tests tp-parity, and serving with SERVE_FLAGS="--tp 2" (SKIP_RATE_1=1
# leaves out the 1 req/s run).
# Vision (its own model, written if missing): scripts/gpu_bench.sh vision; LoRA: MODEL=... scripts/gpu_bench.sh
# lora-serving. On a CPU, the vision stage's wiring: VISION_TINY=1 VISION_MODEL=/tmp/ov-tiny VISION_DTYPE=float32
# VISION_SINGLE=2 VISION_PROMPTS=4 VISION_IN=16 VISION_OUT=4 scripts/gpu_bench.sh vision
set -uo pipefail
MODEL=${MODEL:-.models/llama-3-8b}
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
rs=(python -m radixserve.cli)
common=(--model-path "$MODEL" --load-format dummy --dtype bfloat16 --skip-tokenizer-init)

stage_tests() {
  timeout 300 python -m pytest -q -x -m "cuda or not cuda" -p no:cacheprovider \
    tests/kernels/test_kernels_extend_attention.py tests/kernels/test_kernels_decode_attention.py \
    tests/kernels/test_kernels_triton_elementwise.py tests/kernels/test_kernels_skinny_gemm.py tests/kernels/test_kernels_rotary_kv_store.py \
    tests/executor/test_cuda_executor.py tests/executor/test_executor_launch_ahead.py tests/executor/test_model_vs_hf.py 2>&1 | tail -25
}

stage_one_batch() {
  timeout 300 "${rs[@]}" bench one-batch "${common[@]}" --batch-size 1 32 128 --input-len 128 --output-len 32 \
    --run-name cuda-graph --result-filename "$OUT/one_batch.jsonl" 2>&1 | grep -v '^{' | tail -30
}

stage_one_batch_ahead() {  # each decode step launched before the previous one is collected, as the server does
  timeout 300 "${rs[@]}" bench one-batch "${common[@]}" --batch-size 1 128 --input-len 128 --output-len 32 \
    --launch-ahead --run-name launch-ahead --result-filename "$OUT/one_batch.jsonl" 2>&1 | grep -v '^{' | tail -20
}

stage_torch_compile() {  # --enable-torch-compile vs the same CUDA graphs without it, then its GPU test
  for run in cuda-graph: torch-compile:--enable-torch-compile; do
    timeout 540 "${rs[@]}" bench one-batch "${common[@]}" --batch-size 1 8 32 --input-len 128 --output-len 32 \
      --cuda-graph-max-bs 32 ${run#*:} --run-name "${run%%:*}" --result-filename "$OUT/one_batch_compile.jsonl" \
      2>&1 | grep -E 'torch.compile|captured|Decode|Error' | tail -8
  done
  timeout 300 python -m pytest -q -m cuda -p no:cacheprovider tests/executor/test_torch_compile.py 2>&1 | tail -5
}

stage_gemm() {
  timeout 300 python scripts/bench_skinny_gemm.py --out "$OUT/skinny_gemm.jsonl" 2>&1 | tail -40
}

stage_profile() {
  timeout 300 python scripts/profile_decode.py --model-path "$MODEL" --batch-size 1 > "$OUT/profile.json" 2>&1
  head -c 1200 "$OUT/profile.json"
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

wait_http() {  # port [pid]: up to 300 s, and no longer than the server process ($2) lives
  for _ in $(seq 300); do
    python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=5)" 2>/dev/null && return 0
    [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null && return 1
    sleep 1
  done
  return 1
}

serve_stack() {  # LOG [flags...]: the five services on fixed local ports, in the background (pid in $serve_pid)
  local log=$1; shift
  "${rs[@]}" serve "${common[@]}" --port 31000 --gateway-grpc-port 31010 --tokenizer-addr 127.0.0.1:31011 \
    --scheduler-addr 127.0.0.1:31012 --executor-addr 127.0.0.1:31013 --detokenizer-addr 127.0.0.1:31014 \
    ${SERVE_FLAGS:-} "$@" > "$log" 2>&1 &
  serve_pid=$!
}

stage_serving() {
  local port=31000
  serve_stack "$OUT/serve.log"
  local pid=$serve_pid
  wait_http $port $pid || { tail -30 "$OUT/serve.log"; kill $pid; return 1; }
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids
               --random-range-ratio 1.0 --output-file "$OUT/serving.jsonl")
  echo "--- ${RATE_INF_PROMPTS:-256} x 512 in / 256 out, rate inf"
  timeout 240 "${bench[@]}" --random-input-len 512 --random-output-len 256 --num-prompts ${RATE_INF_PROMPTS:-256} --request-rate inf \
    > "$OUT/rate_inf.txt" 2>&1 &
  local bench_pid=$!
  if [ -n "${PROFILE:-}" ]; then  # py-spy (carried) samples each process for 5 s mid-run
    sleep 10
    for name in gateway scheduler executor; do
      py-spy record -d 5 -r 100 --format raw -o "$OUT/spy-$name.txt" -p "$(pgrep -f "radixserve.cli $name" | head -1)" \
        > /dev/null 2>&1 &
    done
    py-spy record -d 5 -r 100 --format raw -o "$OUT/spy-client.txt" -p "$(pgrep -f "^python -m radixserve.cli bench serving" | head -1)" \
      > /dev/null 2>&1 &
  fi
  wait $bench_pid
  grep -v '^{' "$OUT/rate_inf.txt" | grep -v "requests:"
  if [ -z "${ONLY_RATE_INF:-}" ]; then
  if [ -z "${SKIP_RATE_1:-}" ]; then
  echo "--- 1 req/s, 32 x 512 in / 256 out"
  timeout 120 "${bench[@]}" --random-input-len 512 --random-output-len 256 --num-prompts 32 --request-rate 1 | grep -v '^{'
  fi
  echo "--- one at a time (bs1 ITL vs the in-process step), 4 x 128 in / 128 out"
  timeout 60 "${bench[@]}" --random-input-len 128 --random-output-len 128 --num-prompts 4 --max-concurrency 1 | grep -v '^{'
  fi
  kill $pid; wait $pid
}

stage_host_profile() {
  # Issue 16: the 256 x 512 in / 256 out rate-inf run twice on one server; during the second, each process's
  # CPU seconds (from /proc) and a py-spy sample (carried wheel) of PROFILE_S seconds starting PROFILE_AT s in.
  local port=31000
  serve_stack "$OUT/serve-profile.log"
  local pid=$serve_pid
  wait_http $port $pid || { tail -30 "$OUT/serve-profile.log"; kill $pid; return 1; }
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids
               --random-range-ratio 1.0 --random-input-len 512 --random-output-len 256 --num-prompts 256
               --request-rate inf --disable-tqdm --output-file "$OUT/host_profile.jsonl")
  echo "--- run 1 (warm)"
  timeout 200 "${bench[@]}" | grep -E "Output token throughput|Median TTFT|Median ITL|Benchmark duration"
  echo "--- run 2 (profiled)"
  "${bench[@]}" > "$OUT/host_profile_run2.txt" 2>&1 &
  local bench_pid=$!
  sleep "${PROFILE_AT:-3}"
  local names="gateway scheduler executor"
  declare -A pids t0
  for name in $names; do pids[$name]=$(pgrep -f "radixserve.cli $name" | head -1); done
  pids[client]=$bench_pid
  for name in ${!pids[@]}; do
    t0[$name]=$(awk '{print $14+$15}' /proc/${pids[$name]}/stat)
    py-spy record -d "${PROFILE_S:-4}" -r 200 --format raw -o "$OUT/spy-$name.txt" -p "${pids[$name]}" > /dev/null 2>&1 &
  done
  sleep "${PROFILE_S:-4}"
  local hz=$(getconf CLK_TCK)
  for name in ${!pids[@]}; do
    local t1=$(awk '{print $14+$15}' /proc/${pids[$name]}/stat)
    echo "cpu $name: $(( (t1 - ${t0[$name]}) * 100 / hz / ${PROFILE_S:-4} ))% of a core"
  done
  wait $bench_pid
  grep -E "Output token throughput|Median TTFT|Median ITL|Benchmark duration" "$OUT/host_profile_run2.txt"
  kill $pid; wait $pid
}

stage_bs1_vs_base() {
  # Issue 16: the bs1 launch-ahead step of this tree against another commit's tree (BASE_TREE, e.g. a
  # `git archive` of the pre-change commit), alternated twice in the same call. The base is installed
  # as a plain (non-editable) package in /tmp/base-site and put first on PYTHONPATH.
  local base=${BASE_TREE:?set BASE_TREE to the tree of the commit to compare with}
  python -m pip install -q --no-deps --no-build-isolation --target /tmp/base-site "$base" > /dev/null 2>&1 \
    || { echo "base install failed"; return 1; }
  local args=(bench one-batch "${common[@]}" --batch-size 1 --input-len 128 --output-len 64 --launch-ahead)
  for i in 1 2; do
    echo "--- base, run $i"
    PYTHONPATH=/tmp/base-site:${PYTHONPATH:-} timeout 200 python -m radixserve.cli "${args[@]}" --run-name base \
      --result-filename "$OUT/bs1_vs_base.jsonl" 2>&1 | grep -v '^{' | tail -3
    echo "--- this tree, run $i"
    timeout 200 "${rs[@]}" "${args[@]}" --run-name new --result-filename "$OUT/bs1_vs_base.jsonl" 2>&1 \
      | grep -v '^{' | tail -3
  done
}

stage_rate_inf() {
  # Issue 16's target: 256 x 512 in / 256 out at rate inf on a fresh server, this tree; with BASE_TREE set,
  # then the same on the base tree's install (/tmp/base-site, see bs1_vs_base), same machine.
  local port=31000 trees="new"
  [ -n "${BASE_TREE:-}" ] && trees="new base"
  for tree in $trees; do
    local path=${PYTHONPATH:-}
    if [ "$tree" = base ]; then
      [ -d /tmp/base-site ] || python -m pip install -q --no-deps --no-build-isolation --target /tmp/base-site \
        "$BASE_TREE" > /dev/null 2>&1 || { echo "base install failed"; return 1; }
      path=/tmp/base-site:$path
    fi
    PYTHONPATH=$path serve_stack "$OUT/serve-rate-inf-$tree.log"
    local pid=$serve_pid
    wait_http $port $pid || { tail -30 "$OUT/serve-rate-inf-$tree.log"; kill $pid; return 1; }
    echo "--- $tree"
    timeout 200 "${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids \
      --random-range-ratio 1.0 --random-input-len 512 --random-output-len 256 --num-prompts 256 --request-rate inf \
      --disable-tqdm --output-file "$OUT/rate_inf.jsonl" \
      | grep -E "Output token throughput|Median TTFT|P99 TTFT|Median ITL|Benchmark duration"
    kill $pid; wait $pid
  done
}

stage_quant_bs1() {
  # Issue 19: the bs1 launch-ahead decode step (128 in / 64 out) in bf16 and each weight quantization
  # (QUANTS, default "none fp8 awq gptq"), one fresh process each, same machine.
  for q in ${QUANTS:-none fp8 awq gptq}; do
    local flags=()
    [ "$q" != none ] && flags=(--quantization "$q")
    echo "--- $q"
    timeout 400 "${rs[@]}" bench one-batch "${common[@]}" "${flags[@]}" --batch-size 1 --input-len 128 \
      --output-len 64 --launch-ahead --run-name "quant-$q" --result-filename "$OUT/quant_bs1.jsonl" 2>&1 \
      | grep -v '^{' | tail -4
  done
}

stage_warm_start() {
  # Issue 15: the start phase by phase, and two back-to-back 256 x 512 in / 256 out rate-inf runs right after
  # "ready" (no warm-up request of the client's own). Runs (WARM_RUNS): cold-skip = an empty Triton cache and
  # --skip-server-warmup (first traffic compiles); cold = an empty cache, warm-up on; warm = a restart that
  # keeps the cache (what a restarted container sees).
  local port=31000
  local cache=${TRITON_CACHE_DIR:-${RADIXSERVE_CACHE:-$HOME/.cache/radixserve}/triton}
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids
               --random-range-ratio 1.0 --random-input-len 512 --random-output-len 256 --num-prompts 256
               --request-rate inf --warmup-requests 0 --disable-tqdm --output-file "$OUT/warm_start.jsonl")
  for run in ${WARM_RUNS:-cold-skip cold warm}; do
    case $run in cold*) rm -rf "$cache" ;; esac
    local extra=()
    [ "$run" = cold-skip ] && extra=(--skip-server-warmup)
    local t0=$(date +%s)
    serve_stack "$OUT/serve-$run.log" "${extra[@]}"
    local pid=$serve_pid
    wait_http $port $pid || { tail -30 "$OUT/serve-$run.log"; kill $pid; return 1; }
    echo "--- $run: ready $(( $(date +%s) - t0 ))s after the command"
    grep -h "startup:\|warm-up:\|captured" "$OUT/serve-$run.log" | sed 's/^.*INFO //'
    for i in 1 2; do
      echo "  run $i:"
      timeout 200 "${bench[@]}" | grep -E "Output token throughput|Median TTFT|Median ITL|Benchmark duration" | sed 's/^/    /'
    done
    kill $pid; wait $pid
  done
}

stage_vision() {
  # Issue 22: LLaVA-OneVision-7B's geometry with random weights (scripts/make_dummy_llava_onevision.py writes
  # VISION_MODEL if missing; VISION_TINY=1: its CPU-sized twin), one fresh server with its tokenizer, the
  # chat API: TTFT of one 1-image request at a time (VISION_SINGLE prompts, the median), then VISION_PROMPTS
  # requests at once (rate inf, output tok/s and TTFT), then the same two with no image (--image-count 0:
  # the same text), so the vision tower's share shows. ~128 text tokens in, VISION_OUT (128) out, 384x384
  # PNGs (VISION_RESOLUTION). Expected on an H100: about 3 minutes (start ~1-2 min, the four runs under
  # 1 min together).
  local port=31000 model=${VISION_MODEL:-.models/llava-ov-7b}
  [ -f "$model/config.json" ] || python scripts/make_dummy_llava_onevision.py --out "$model" ${VISION_TINY:+--tiny} \
    > /dev/null || { echo "could not write $model"; return 1; }
  local common=(--model-path "$model" --load-format dummy --dtype "${VISION_DTYPE:-bfloat16}")  # serve_stack's
  serve_stack "$OUT/serve-vision.log"
  local pid=$serve_pid
  wait_http $port $pid || { tail -30 "$OUT/serve-vision.log"; kill $pid; return 1; }
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend openai-chat --dataset image
               --image-resolution "${VISION_RESOLUTION:-384x384}" --random-input-len "${VISION_IN:-128}"
               --random-output-len "${VISION_OUT:-128}" --random-range-ratio 1.0 --flush-cache --disable-tqdm
               --output-file "$OUT/vision.jsonl")
  local keys="Successful requests|Server-counted input|Output token throughput|Median TTFT|P99 TTFT|Median ITL"
  for images in 1 0; do
    echo "--- $images image(s): one at a time, ${VISION_SINGLE:-4} requests"
    timeout 200 "${bench[@]}" --image-count $images --num-prompts "${VISION_SINGLE:-4}" --max-concurrency 1 \
      | grep -E "$keys"
    echo "--- $images image(s): ${VISION_PROMPTS:-64} at once"
    timeout 200 "${bench[@]}" --image-count $images --num-prompts "${VISION_PROMPTS:-64}" --request-rate inf \
      | grep -E "$keys"
  done
  kill $pid; wait $pid
}

stage_lora_serving() {
  # Issue 23: 256 x 512 in / 256 out at rate inf (LORA_PROMPTS) with 0 (no --enable-lora at all), 1, 4 and 16
  # distinct rank-16 adapters on all seven targets (scripts/make_dummy_lora.py, written once to LORA_DIR
  # outside $OUT), request i naming adapter i mod N; a fresh server each, with the flags SGLang users pass.
  # Expected on an H100: about 5-6 minutes (four starts of ~1 min, runs of ~20-30 s, adapters ~30 s).
  local port=31000 dir=${LORA_DIR:-/tmp/radixserve-loras}
  [ -f "$dir/lora_paths.txt" ] || python scripts/make_dummy_lora.py --model-path "$MODEL" --out "$dir" \
    --count 16 --rank 16 > /dev/null || { echo "could not write the adapters"; return 1; }
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids
               --random-range-ratio 1.0 --random-input-len 512 --random-output-len 256
               --num-prompts "${LORA_PROMPTS:-256}" --request-rate inf --disable-tqdm
               --output-file "$OUT/lora_serving.jsonl")
  for n in ${LORA_COUNTS:-0 1 4 16}; do
    local flags=() names=()
    if [ "$n" -gt 0 ]; then
      local pairs=($(tr ' ' '\n' < "$dir/lora_paths.txt" | head -n "$n"))
      names=(--lora-name "${pairs[@]%%=*}")
      flags=(--enable-lora --max-loras-per-batch 16 --max-lora-rank 16 --lora-paths "${pairs[@]}")
    fi
    serve_stack "$OUT/serve-lora-$n.log" "${flags[@]}"
    local pid=$serve_pid
    wait_http $port $pid || { tail -30 "$OUT/serve-lora-$n.log"; kill $pid; return 1; }
    echo "--- $n adapter(s)"
    timeout 200 "${bench[@]}" "${names[@]}" \
      | grep -E "Successful requests|Output token throughput|Median TTFT|P99 TTFT|Median ITL|P99 ITL"
    kill $pid; wait $pid
  done
}

stage_eagle() {
  # Issue 20: what an EAGLE3 head costs served: plain decoding, then EAGLE3 (a random head of the target's
  # geometry from scripts/make_dummy_eagle3.py, EAGLE_STEPS rounds; it accepts ~nothing, so the figures are
  # the price of drafting + verifying), one fresh server each, 128 in / 256 out at EAGLE_CONCURRENCY (1 32).
  local port=31000 head=${EAGLE_HEAD:-/tmp/radixserve-eagle3}
  [ -f "$head/config.json" ] || python scripts/make_dummy_eagle3.py --model-path "$MODEL" --out "$head" > /dev/null \
    || { echo "could not write the head"; return 1; }
  local bench=("${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids
               --random-range-ratio 1.0 --random-input-len 128 --random-output-len 256 --disable-tqdm
               --output-file "$OUT/eagle.jsonl")
  # EAGLE_TOPKS: one EAGLE3 server per topk (default 1: chains; above 1: trees of the default
  # num_steps * topk drafts).
  for run in plain ${EAGLE_TOPKS:-1}; do
    local flags=()
    [ $run != plain ] && flags=(--speculative-algorithm EAGLE3 --speculative-draft-model-path "$head"
                                --speculative-num-steps ${EAGLE_STEPS:-3} --speculative-eagle-topk $run)
    [ "$run" = 1 ] && flags+=(--speculative-num-draft-tokens $(( ${EAGLE_STEPS:-3} + 1 )))
    serve_stack "$OUT/serve-$run.log" "${flags[@]}"
    local pid=$serve_pid
    wait_http $port $pid || { tail -30 "$OUT/serve-$run.log"; kill $pid; return 1; }
    for c in ${EAGLE_CONCURRENCY:-1 32}; do
      echo "--- $([ $run = plain ] && echo plain || echo "eagle3 topk $run"), $c concurrent"
      timeout 150 "${bench[@]}" --num-prompts $(( c == 1 ? 8 : 4 * c )) --max-concurrency $c \
        | grep -E "Output token throughput|Median ITL|Median TPOT|Accept length"
    done
    kill $pid; wait $pid
  done
}

stage_ab_serving() {
  # This tree against BASE_TREE's install (see bs1_vs_base), served, alternated new/base twice: 128 in / 256 out
  # at each AB_CONCURRENCY (default "1 32"; 8 prompts one at a time, else 4 per slot), server flags AB_FLAGS,
  # every request's body extended by AB_BODY (bench serving --extra-request-body; default greedy).
  local port=31000 base=${BASE_TREE:?set BASE_TREE to the tree of the commit to compare with}
  [ -d /tmp/base-site ] || python -m pip install -q --no-deps --no-build-isolation --target /tmp/base-site "$base" \
    > /dev/null 2>&1 || { echo "base install failed"; return 1; }
  for tree in new base new base; do
    local path=${PYTHONPATH:-}
    [ $tree = base ] && path=/tmp/base-site:$path
    PYTHONPATH=$path serve_stack "$OUT/serve-ab-$tree.log" ${AB_FLAGS:-}
    local pid=$serve_pid
    wait_http $port $pid || { tail -30 "$OUT/serve-ab-$tree.log"; kill $pid; return 1; }
    for c in ${AB_CONCURRENCY:-1 32}; do
      echo "--- $tree, $c concurrent"
      timeout 150 "${rs[@]}" bench serving --base-url http://127.0.0.1:$port --backend radixserve --dataset random-ids \
        --random-range-ratio 1.0 --random-input-len 128 --random-output-len 256 --disable-tqdm \
        --num-prompts $(( c == 1 ? 8 : 4 * c )) --max-concurrency $c --extra-request-body "${AB_BODY:-{\}}" \
        --output-file "$OUT/ab_serving.jsonl" | grep -E "Output token throughput|Median ITL|Accept length"
    done
    kill $pid; wait $pid
  done
}

stage_hf_baseline() {
  timeout 300 "${rs[@]}" bench serving --backend hf-transformers --model-path "$MODEL" --load-format dummy \
    --dtype bfloat16 --dataset random-ids --random-input-len 512 --random-output-len 256 --random-range-ratio 1.0 \
    --num-prompts ${HF_PROMPTS:-256} --output-file "$OUT/serving.jsonl" | grep -v '^{'
}

stage_parity() {
  timeout 300 python scripts/check_hf_parity.py --model-path "$MODEL" --max-new-tokens 32 | tee "$OUT/parity.json"
}

stage_comm() {
  timeout 120 "${rs[@]}" check-comm --backend nccl --nproc "${NPROC:-2}" 2>&1 | tee "$OUT/check_comm.jsonl" | tail -8
}

stage_parallel_tests() {
  timeout 400 python -m pytest -q -m "(cuda or not cuda) and not e2e" -p no:cacheprovider tests/kernels/test_kernels_fused_moe.py \
    tests/executor/test_tensor_parallel.py tests/executor/test_moe_tensor_parallel.py 2>&1 | tail -15
}

stage_tp_parity() {
  timeout 500 python scripts/check_tp_parity.py --model-path "$MODEL" --tp "${TP:-2}" --extra "${TP_EXTRA:-}" \
    | tee -a "$OUT/tp_parity.jsonl" | python -c "import json,sys; r=json.loads(sys.stdin.read()); \
print({k: r[k] for k in ('model', 'tp', 'extra', 'passed', 'prompts')})"
}

for stage in "$@"; do
  echo "=== $stage"
  t0=$(date +%s)
  "stage_${stage//-/_}"
  echo "=== $stage took $(( $(date +%s) - t0 ))s"
done
