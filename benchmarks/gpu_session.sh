#!/usr/bin/env bash
# The GPU checks and benchmarks, in one script for a lent GPU machine: run from the
# repository root with the stages wanted, e.g.
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh tests sanitize kernels recurrent
#
# Stages (each under its own time limit, each logging to $OUT/<stage>.log):
#   tests      the kernel parity tests and every CUDA test, Triton compiled for the GPU
#   sanitize   compute-sanitizer memcheck over one forward+backward of every kernel, and
#              racecheck over the attention kernels (the ones with shared-memory tiles)
#   tune       benchmarks.tune_attention: launch configurations of the attention kernels
#   kernels    benchmarks.bench_kernels (attention, cross-entropy, layer norm) bf16 and fp32
#   steps      benchmarks.step_costs: host against device time of each piece of a time step
#              (addmm, the Triton step kernels, the op dispatch) and of whole layers
#   recurrent  benchmarks.bench_recurrent LSTM/GRU B64 T128 H1024 vs cuDNN: float32 with TF32
#              off on both sides and on on both sides, and bf16; eager and with CUDA graphs
#              over the time loop (torch.compile "cudagraphs", whose perf hints, such as why
#              it skipped a graph, go to the log); 3 timing processes each, each compiling
#              its own graphs, hence the longer limits
#   models     benchmarks.bench_models: the GPT, Transformer and Seq2Seq training steps
#              against transformers' GPT-2 and torch.nn.Transformer, float32
# Results land in benchmarks/results/<gpu>/ and are packed into $OUT/results.tgz.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 CI=true
PY=${PYTHON:-python3}
RESULTS=benchmarks/results/$($PY -c "from benchmarks.harness import machine_slug; print(machine_slug('cuda'))")

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.log"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.log"
    tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    | tee -a "$OUT/summary.log"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/summary.log"

for s in "$@"; do
    case $s in
    tests_gpu)
        stage tests_gpu 90 $PY -m pytest -q -p no:cacheprovider -n 8 -m gpu parity_tests ;;
    tests)
        stage tests_kernels 150 $PY -m pytest -q -p no:cacheprovider -n 16 \
            parity_tests/test_kernels_attention.py parity_tests/test_kernels_cross_entropy.py \
            parity_tests/test_kernels_layer_norm.py parity_tests/test_kernels_lstm_step.py \
            parity_tests/test_kernels_gru_step.py parity_tests/test_kernels_dispatch.py
        stage tests_gpu 90 $PY -m pytest -q -p no:cacheprovider -n 8 -m gpu parity_tests ;;
    memcheck)
        stage memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
            $PY -m benchmarks.kernel_smoke ;;
    sanitize)
        stage memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
            $PY -m benchmarks.kernel_smoke
        stage racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 3 \
            $PY -m benchmarks.kernel_smoke --ops attention ;;
    tune)
        stage tune 120 $PY -m benchmarks.tune_attention --dtype bfloat16 --length 4096 ;;
    tune32)
        stage tune32 120 $PY -m benchmarks.tune_attention --dtype float32 --length 2048 ;;
    kernels32)
        stage kernels_fp32 100 $PY -m benchmarks.bench_kernels --device cuda \
            --dtypes float32 --lengths 2048 --out "$RESULTS" ;;
    kernels)
        stage kernels_bf16 150 $PY -m benchmarks.bench_kernels --device cuda \
            --dtypes bfloat16 --out "$RESULTS"
        # IEEE float32 tiles are slow (no tensor cores): one length is enough to say so
        stage kernels_fp32 100 $PY -m benchmarks.bench_kernels --device cuda \
            --dtypes float32 --lengths 2048 --out "$RESULTS" ;;
    steps)
        stage steps_H1024 60 $PY -m benchmarks.step_costs --batch 64 --hidden 1024 \
            --out "$RESULTS"
        stage steps_H512 60 $PY -m benchmarks.step_costs --batch 32 --hidden 512 --length 64 \
            --out "$RESULTS" ;;
    recurrent)
        for tf32 in off on; do
            TORCH_LOGS=perf_hints stage recurrent_fp32_tf32$tf32 240 $PY -m \
                benchmarks.bench_recurrent --device cuda --dtype float32 --tf32 $tf32 \
                --batch 64 --length 128 --hidden 1024 --no-reference --compile cudagraphs \
                --out "$RESULTS"
        done
        TORCH_LOGS=perf_hints stage recurrent_bf16 240 $PY -m benchmarks.bench_recurrent \
            --device cuda --dtype bfloat16 --batch 64 --length 128 --hidden 1024 \
            --no-reference --compile cudagraphs --out "$RESULTS" ;;
    models)
        stage models 300 $PY -m benchmarks.bench_models --device cuda --out "$RESULTS/models" ;;
    *) echo "unknown stage $s" ;;
    esac
done
tar czf "$OUT/results.tgz" "$RESULTS"
cat "$OUT/summary.log"
