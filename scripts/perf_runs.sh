#!/usr/bin/env bash
# Every measurement behind docs/performance.md (one JSON per run in results/perf/), then the doc. About 20 minutes on
# a 2-core CPU; run from the repository root on a quiet machine (each benchmark waits up to 2 min for load <= 1.5 and
# records the load it ran under). GPU: python benchmarks/gpu_bench.py on the GPU machine writes results/perf/gpu_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/perf W=--wait_quiet=120 B="python benchmarks/train_step.py --config=configs/perf.py"
python benchmarks/torch_peer.py --config=configs/perf.py $W --out=$OUT/cpu_torch_peer.json
python benchmarks/weight_grad.py --config=configs/perf.py $W --out=$OUT/cpu_weight_grad.json
for f in $(python -c "from scripts.report import fusion_names; print(*fusion_names())"); do  # the fusion registry
  $B:fusion=$f $W --out=$OUT/cpu_fusion_$f.json
done
for s in scan_layers=True:scan remat_policy=minimal:remat_minimal remat_policy=full:remat_full dtype=bfloat16:bf16 \
  attention_impl=reference:attention_reference; do
  $B --config.model.${s%%:*} $W --out=$OUT/cpu_switch_${s##*:}.json
done
C="--config.bench.steps=0 --config.bench.warmup=0"
for d in 12 24; do $B:depth=$d --config.model.scan_layers=True $C $W --out=$OUT/cpu_compile_depth${d}_scan.json; done
$B:depth=12 $C $W --out=$OUT/cpu_compile_depth12_unrolled.json
CACHE=$(mktemp -d)  # persistent compilation cache: a cold process fills it, a warm one loads the step from it
for c in cold warm; do $B --config.bench.compilation_cache_dir=$CACHE $C $W --out=$OUT/cpu_cache_$c.json; done
rm -rf "$CACHE"
python scripts/report.py
