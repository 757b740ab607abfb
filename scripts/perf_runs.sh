#!/usr/bin/env bash
# Every measurement behind docs/performance.md, one command per JSON file in results/perf/, then the table.
# Run from the repository root on a quiet machine: the script first waits up to 20 minutes for the 1-minute load
# average to drop to 1.5, each benchmark waits up to another 2 minutes, and every JSON records the load it ran under.
# About 20 minutes of benchmarks on a 2-core CPU.
#   bash scripts/perf_runs.sh            # all CPU runs, then python scripts/perf_table.py
#   python benchmarks/gpu_bench.py       # on a GPU machine; its JSON files go to results/perf/ too
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/perf
W=--wait_quiet=120
mkdir -p "$OUT"
python -c "from vtfusion_jax import speed; print('quiet wait:', speed.wait_for_quiet(max_wait_s=1200))"

# Ours vs PyTorch eager and torch.compile, alternating, shared size (co_attention, D=256, 4+4 layers, batch 32).
# (On a second host, keep the first host's file: --out=$OUT/cpu_torch_peer_<host>.json; the doc shows both.)
python benchmarks/torch_peer.py --config=configs/perf.py $W --out=$OUT/cpu_torch_peer.json

# The step's dots replayed one by one in XLA and in torch: the part of the step-time ratio the GEMM kernels explain.
# (The doc pairs it with the torch-peer run of the same CPU; on a second host: --out=$OUT/cpu_matmul_shapes_<host>.json.)
python benchmarks/matmul_shapes.py --config=configs/perf.py $W --out=$OUT/cpu_matmul_shapes.json

# The step's Dense GEMMs vs the rest, inside the step (ours and torch eager, each also with the Dense matmuls stubbed
# out): their in-step GFLOP/s and the ceiling of our step with every Dense GEMM at the measured peak.
python benchmarks/step_ceiling.py --config=configs/perf.py $W --out=$OUT/cpu_step_ceiling.json

# The Dense kernel gradient x^T @ dy on CPU: as XLA's Eigen A^T B dot vs with its operand transposed first (linear.py).
python benchmarks/weight_grad.py --config=configs/perf.py $W --out=$OUT/cpu_weight_grad.json

# Where the time goes: one core, per XLA thunk beside torch eager's per-op profile.
python benchmarks/profile_step.py --config=configs/perf.py $W --out=$OUT/cpu_profile.json

# Every fusion variant at the shared size (float32, unrolled, no remat).
for f in co_attention merged cross gated_cross bottleneck query concat rn; do
  python benchmarks/train_step.py --config=configs/perf.py:fusion=$f $W --out=$OUT/cpu_fusion_$f.json
done

# Speed switches on the co_attention model (baseline: cpu_fusion_co_attention.json).
python benchmarks/train_step.py --config=configs/perf.py --config.model.scan_layers=True $W --out=$OUT/cpu_switch_scan.json
python benchmarks/train_step.py --config=configs/perf.py --config.model.remat_policy=minimal $W --out=$OUT/cpu_switch_remat_minimal.json
python benchmarks/train_step.py --config=configs/perf.py --config.model.remat_policy=full $W --out=$OUT/cpu_switch_remat_full.json
python benchmarks/train_step.py --config=configs/perf.py --config.model.dtype=bfloat16 $W --out=$OUT/cpu_switch_bf16.json
python benchmarks/train_step.py --config=configs/perf.py --config.model.attention_impl=reference $W --out=$OUT/cpu_switch_attention_reference.json

# Compile time: 12 and 24 layers per tower (image, text, fusion), scanned; unrolled 12 for contrast.
for d in 12 24; do
  python benchmarks/train_step.py --config=configs/perf.py:depth=$d --config.model.scan_layers=True \
    --config.bench.steps=0 --config.bench.warmup=0 $W --out=$OUT/cpu_compile_depth${d}_scan.json
done
python benchmarks/train_step.py --config=configs/perf.py:depth=12 --config.bench.steps=0 --config.bench.warmup=0 \
  $W --out=$OUT/cpu_compile_depth12_unrolled.json

# Persistent compilation cache: a cold run fills it, a second process loads the step from it.
CACHE=/tmp/vtfusion_perf_compile_cache
rm -rf "$CACHE"
for c in cold warm; do
  python benchmarks/train_step.py --config=configs/perf.py --config.bench.compilation_cache_dir=$CACHE \
    --config.bench.steps=0 --config.bench.warmup=0 $W --out=$OUT/cpu_cache_$c.json
done
rm -rf "$CACHE"

# The GPU script's CPU smoke (the GPU figures come from a GPU machine).
python benchmarks/gpu_bench.py --tiny --out_dir=/tmp/gpu_bench_smoke

python scripts/perf_table.py
