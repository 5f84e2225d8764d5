#!/usr/bin/env bash
# The one GPU call of a session (DESIGN.md, GPU protocol). Runs from the repo root on the device
# machine: installs offline, runs the GPU test subset (compiled kernels, bf16 included), then the
# kernel and model benchmarks with every competitor in the same process. Each step has its own
# time limit so one failure or hang does not cost the rest; results are re-bundled after every
# step into $OUT/gpu_results.tar.gz (the device tool returns at most 8 files), so a run cut short
# still brings back what it finished. Budget: about 7 minutes on one H100/H200.
set -u
OUT=${OUT:-$PWD/benchmarks/results/gpu_latest}
R=$(mktemp -d /tmp/fastbert_gpu.XXXX)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}
T_TESTS=${T_TESTS:-150} T_ATTN=${T_ATTN:-60} T_FUSED=${T_FUSED:-60} T_MLM=${T_MLM:-50} T_MODEL=${T_MODEL:-100}

bundle() { tar czf "$OUT/gpu_results.tar.gz" -C "$R" . 2>/dev/null; cp "$R/summary.txt" "$OUT/summary.txt" 2>/dev/null; }
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$R/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$R/$name.log"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$R/summary.txt"
  bundle
}

{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
  $PY -c "import transformers; print('transformers', transformers.__version__)"
} > "$R/env.txt" 2>&1
cat "$R/env.txt"; cp "$R/env.txt" "$R/summary.txt"

$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$R/install.log" 2>&1 \
  || { echo "editable install failed; using PYTHONPATH shim" | tee -a "$R/summary.txt"; }
$PY -c "import fastbert.kernels" 2>/dev/null || echo "fastbert.kernels not importable" | tee -a "$R/summary.txt"

# (1) GPU tests: the kernel suites with device=cuda (compiled kernels, bf16 tests marked gpu), the
#     whole model on the kernels; AOT compile tests are CPU-side guards and skipped here.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step tests "$T_TESTS" env FASTBERT_TEST_GPU=1 $PY -m pytest -q -m "not slow" -k "not aot" $XDIST -p no:cacheprovider \
  --timeout 150 --junitxml="$R/tests.xml" \
  tests/test_attention.py tests/test_gelu.py tests/test_layer_norm.py tests/test_embedding.py tests/test_fused_ops.py \
  tests/test_mlm_loss.py tests/test_model_kernels.py tests/test_convergence.py

# (2) kernel benchmarks, each beside its competitors and the ceilings measured in the same run
step bench_attention "$T_ATTN" env OUT="$R" $PY -m benchmarks.bench_attention --quick
step bench_fused "$T_FUSED" env OUT="$R" $PY -m benchmarks.bench_fused --quick
step bench_mlm_loss "$T_MLM" env OUT="$R" $PY -m benchmarks.bench_mlm_loss --quick
# (3) the BERT-base training step against transformers eager / SDPA
step bench_model "$T_MODEL" env OUT="$R" $PY -m benchmarks.bench_model --gpu --quick
step profile_step "${T_PROFILE:-45}" env OUT="$R" $PY -m benchmarks.profile_step
# (4) the main job on the GPU: a short zero-argument-style pretraining run (loop, kernels, checkpoint)
step pretrain_smoke "${T_PRETRAIN:-45}" fastbert pretrain --steps 40 --out "$R/pretrain_run" --no-progress
rm -rf "$R/pretrain_run/checkpoints" "$R/pretrain_run/model.safetensors"

echo "=== summary"; cat "$R/summary.txt"
for f in "$R"/*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
bundle
