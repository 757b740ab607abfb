#!/usr/bin/env bash
# The Sort-of-CLEVR protocol of docs/results.md (issue 30), one results/ folder per run (scripts/run.py):
#   scripts/sort_of_clevr.sh sweep VARIANT...        400-step runs at each report.SWEEP_RATES rate, validation only
#                                                    -> results/sort_of_clevr_sweep/VARIANT_lrLR/ (not rn)
#   scripts/sort_of_clevr.sh run VARIANT SEED...     trained to the plateau at the sweep's best rate (rn: the
#                                                    paper's, in its config), then the test split once
#                                                    -> results/sort_of_clevr/VARIANT_seedSEED/
#   scripts/sort_of_clevr.sh all                     the whole protocol (report.sort_of_clevr_plan): each missing
#                                                    sweep, then each missing plateau run; started in 2 shells it
#                                                    runs 2 at a time (a run in progress elsewhere is skipped)
# A finished run is skipped; workdirs go to $WORKDIRS (default runs/); NICE=N runs under nice -n N.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scripts/sort_of_clevr.sh sweep VARIANT... | run VARIANT SEED... | all}; shift
W=${WORKDIRS:-runs} PY=${PYTHON:-python}
report() { $PY -c "import sys; sys.path.insert(0, 'scripts'); import report; $1"; }
go() {  # NAME CONFIG_ARGS...: one scripts/run.py row unless results/NAME holds one or another shell runs it
  [ -f "results/$1/summary.json" ] && { echo "skip $1 (done)"; return; }
  mkdir -p "$(dirname "$W/$1")" && mkdir "$W/$1.lock" 2>/dev/null || { echo "skip $1 (running elsewhere)"; return; }
  trap "rmdir '$W/$1.lock'" EXIT
  rm -rf "${W:?}/$1" && $PY scripts/run.py --name="$1" --workdir="$W/$1" --nice="${NICE:-0}" "${@:2}"
  rmdir "$W/$1.lock" && trap - EXIT
}
if [ "$mode" = sweep ]; then
  for v in "$@"; do
    [ "$v" = rn ] && { echo "rn is not swept: it trains at Santoro et al.'s rate (its config)" >&2; exit 2; }
    for lr in $(report "print(*report.SWEEP_RATES)"); do
      go "sort_of_clevr_sweep/${v}_lr$lr" --config="configs/sort_of_clevr.py:fusion=$v" --split=validation \
        --matmul_size=0 -- --config.optim.lr="$lr" --config.train.num_steps=400 \
        --config.train.eval_every_steps=200 --config.train.checkpoint_every_steps=200
    done
  done
elif [ "$mode" = run ]; then
  v=${1:?VARIANT}; shift
  lr=$(report "print('' if '$v' == 'rn' else report.sweep_choice().get('$v') or sys.exit(3))") || {
    echo "no complete sweep of $v (scripts/sort_of_clevr.sh sweep $v; skipped if running elsewhere)" >&2; exit 3; }
  for s in "$@"; do
    go "sort_of_clevr/${v}_seed$s" --config="configs/sort_of_clevr.py:fusion=$v" --seed="$s" -- \
      ${lr:+--config.optim.lr=$lr}
  done
elif [ "$mode" = all ]; then
  for pass in seed0 extra_seeds; do  # the plan grows once every attention variant has its seed-0 row
    report "print('\n'.join(f'{v} {s}' for v, s in report.sort_of_clevr_plan()))" | while read -r v s; do
      [ "$v" = rn ] || "$0" sweep "$v" < /dev/null || echo "$pass: sweep of $v failed (exit $?)" >&2
      "$0" run "$v" "$s" < /dev/null || echo "$pass: $v seed $s not run (exit $?); going on" >&2
    done
  done
  report "sys.exit(0 if any(s for _, s in report.sort_of_clevr_plan()) else 4)" ||
    echo "the extra seeds wait for every attention variant's seed-0 row: run $0 all again" >&2
else
  echo "unknown mode $mode (sweep | run | all)" >&2; exit 2
fi
