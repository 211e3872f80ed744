#!/usr/bin/env bash
# Every check that needs a GPU, in two parts that each fit one call of a lent GPU machine (under 10 minutes):
#
#   bash benchmarks/gpu_checks.sh steps   # the full meta-step (benchmarks/meta_step.py: 32 tasks, K = 16, 5 CG steps,
#                                         # Adam; 5-way 1-shot and 20-way 5-shot; loop / vmap x exact / Gauss-Newton)
#                                         # and benchmarks/fig2b.py --device cuda --quick; about 4 minutes
#   bash benchmarks/gpu_checks.sh train   # iMAML-GD on Omniglot 5-way 1-shot for 8 minutes of training (SIGTERM
#                                         # saves the checkpoint), then 600 meta-test episodes: accuracy +- 95% CI
#   bash benchmarks/gpu_checks.sh compiled  # the same meta-step with the meta-batch in one compiled CUDA graph
#                                         # (meta_step.py --paths vmap compiled; bl.compiled_hypergradient(...).batched
#                                         # with mode="reduce-overhead"); compiling takes minutes, so it is capped at
#                                         # 7 minutes and runs only after the two parts above
#
# Results: one archive and one log per part in $OUT (the device tool's output folder; default
# benchmarks/results/gpu). The train part needs the two Omniglot archives and, to skip decoding them, the
# preprocessed cache in $GPU_DATA (default .gpu, a folder to list in .git/info/exclude and to carry):
#
#   mkdir -p .gpu && cp ../shared/data/omniglot/images_*.zip ~/.cache/bilevel/omniglot_28x28.pt .gpu/
#
# SMOKE=1 runs both parts on the CPU with tiny settings, to check the script itself (about 3 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
OUT=${OUT:-benchmarks/results/gpu}
GPU_DATA=${GPU_DATA:-.gpu}
PY=${PYTHON:-python3}
DEVICE=cuda
[ "${SMOKE:-0}" = 1 ] && DEVICE=cpu
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$OUT"
work=$(mktemp -d)

case "$part" in
steps)
  {
    $PY -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    if [ "$DEVICE" = cpu ]; then
      $PY benchmarks/meta_step.py --device cpu --meta-batch 2 --settings 5w1s --paths loop_gn vmap_gn --warmup 1 \
        --repeats 1 --out "$work"
    else
      $PY benchmarks/meta_step.py --device cuda --out "$work"
    fi
    $PY benchmarks/fig2b.py --device "$DEVICE" --quick --out "$work"
  } 2>&1 | tee "$OUT/steps.log"
  status=${PIPESTATUS[0]}
  tar czf "$OUT/steps.tgz" -C "$work" .
  ;;
compiled)
  cap=7m
  [ "$DEVICE" = cpu ] && cap=9m
  {
    $PY -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    if [ "$DEVICE" = cpu ]; then
      timeout "$cap" $PY benchmarks/meta_step.py --device cpu --meta-batch 2 --settings 5w1s --paths vmap compiled \
        --warmup 1 --repeats 1 --out "$work"
    else
      timeout "$cap" $PY benchmarks/meta_step.py --device cuda --paths vmap compiled --out "$work"
    fi
    echo "meta_step.py exited with status $? (124: stopped at the ${cap} cap)"
  } 2>&1 | tee "$OUT/compiled.log"
  status=${PIPESTATUS[0]}
  tar czf "$OUT/compiled.tgz" -C "$work" .
  ;;
train)
  run="$work/run"
  minutes=8
  steps=100000
  [ "$DEVICE" = cpu ] && minutes=0.3 && steps=50
  {
    $PY -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    # SIGTERM after the budget: the step under way finishes, a checkpoint is written, the command exits 130
    timeout --preserve-status -s TERM "${minutes}m" $PY -m applications.imaml train --config omniglot-5w1s-gd --device "$DEVICE" \
      --data-dir "$GPU_DATA" --cache-dir "$GPU_DATA" --out "$run" --steps "$steps" --checkpoint-every 200 --quiet
    echo "train exited with status $? after the ${minutes}-minute budget (130: stopped by the budget, checkpoint saved)"
    $PY -m applications.imaml evaluate --out "$run" --episodes "$([ "$DEVICE" = cpu ] && echo 20 || echo 600)" --quiet
  } 2>&1 | tee "$OUT/train.log"
  status=${PIPESTATUS[0]}
  rm -f "$run/checkpoint.pt"  # the parameters are not needed back; the metrics, curve and summaries are
  tar czf "$OUT/train.tgz" -C "$work" .
  ;;
*)
  echo "usage: bash benchmarks/gpu_checks.sh steps|train|compiled  (SMOKE=1 for a CPU check of the script)" >&2
  exit 2
  ;;
esac
rm -rf "$work"
exit "$status"
