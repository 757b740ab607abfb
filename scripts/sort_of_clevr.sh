#!/usr/bin/env bash
# The Sort-of-CLEVR protocol of docs/results.md (issue 30), one results/ folder per run (scripts/run.py):
#   scripts/sort_of_clevr.sh sweep VARIANT...        400-step runs at 3 constant rates, validation only
#                                                    -> results/sort_of_clevr_sweep/VARIANT_lrLR/ (not rn)
#   scripts/sort_of_clevr.sh run VARIANT SEED...     trained to the plateau at the sweep's best rate (rn: the
#                                                    paper's, in its config), then the test split once
#                                                    -> results/sort_of_clevr/VARIANT_seedSEED/
# A finished run is skipped; workdirs go to $WORKDIRS (default runs/); NICE=N runs under nice -n N.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/sort_of_clevr.sh sweep VARIANT... | run VARIANT SEED...}; shift
W=${WORKDIRS:-runs} PY=${PYTHON:-python}
go() {  # NAME CONFIG_ARGS...: one scripts/run.py row unless results/NAME already holds one
  [ -f "results/$1/summary.json" ] && { echo "skip $1 (done)"; return; }
  rm -rf "$W/$1" && $PY scripts/run.py --name="$1" --workdir="$W/$1" --nice="${NICE:-0}" "${@:2}"
}
if [ "$mode" = sweep ]; then
  for v in "$@"; do
    [ "$v" = rn ] && { echo "rn is not swept: it trains at Santoro et al.'s rate (its config)" >&2; exit 2; }
    for lr in 3e-4 1e-3 3e-3; do
      go "sort_of_clevr_sweep/${v}_lr$lr" --config="configs/sort_of_clevr.py:fusion=$v" --split=validation \
        --matmul_size=0 -- --config.optim.lr="$lr" --config.train.num_steps=400 \
        --config.train.eval_every_steps=200 --config.train.checkpoint_every_steps=200
    done
  done
elif [ "$mode" = run ]; then
  v=${1:?VARIANT}; shift
  lr=$($PY -c "import sys; sys.path.insert(0, 'scripts'); import report
print('' if '$v' == 'rn' else report.sweep_choice().get('$v') or sys.exit('no sweep of $v: $0 sweep $v'))")
  for s in "$@"; do
    go "sort_of_clevr/${v}_seed$s" --config="configs/sort_of_clevr.py:fusion=$v" --seed="$s" -- \
      ${lr:+--config.optim.lr=$lr}
  done
else
  echo "unknown mode $mode (sweep | run)" >&2; exit 2
fi
