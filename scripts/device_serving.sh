#!/usr/bin/env bash
# The serving benchmark at full size over one or two device calls (path A cold in the first,
# the rest as far as the budget goes; a second call with the same machine goes on from
# $SERVING_DIR), then $EXTRA bench sections if time is left.
#   run(command="bash scripts/device_serving.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh
start=$(date +%s)
BUDGET=${BUDGET:-560}
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
SERVING_DIR=${SERVING_DIR:-/tmp/serving-work}
FILTER='^\s*triton_|AUTOTUNE|strides:|dtypes:|SingleProcess|Autotune|num_choices'
if [ ! -f "$SERVING_DIR/steps.json" ]; then
  timeout $(( $(left) - 10 )) python3 scripts/bench.py --out "$OUT/bench-cold.json" --only serving \
    ${BENCH_ARGS:-} --serving-dir "$SERVING_DIR" --serving-phase cold \
    --serving-budget $(( $(left) - 20 )) > "$OUT/bench-cold.log" 2>&1
  echo "cold exit $? after $(( $(date +%s) - start )) s"; grep -Ev "$FILTER" "$OUT/bench-cold.log" | tail -12
fi
if [ -f "$SERVING_DIR/steps.json" ] && [ "$(left)" -gt 120 ]; then
  timeout $(( $(left) - 10 )) python3 scripts/bench.py --out "$OUT/bench.json" --only serving \
    ${BENCH_ARGS:-} --serving-dir "$SERVING_DIR" --serving-phase rest \
    --serving-budget $(( $(left) - 20 )) > "$OUT/bench.log" 2>&1
  echo "rest exit $? after $(( $(date +%s) - start )) s"; grep -Ev "$FILTER" "$OUT/bench.log" | tail -60
fi
if [ -n "${EXTRA:-}" ] && [ "$(left)" -gt 60 ]; then
  timeout $(( $(left) - 10 )) python3 scripts/bench.py --out "$OUT/bench-extra.json" --only "$EXTRA" \
    ${EXTRA_ARGS:-} > "$OUT/bench-extra.log" 2>&1
  echo "extra exit $?"; tail -40 "$OUT/bench-extra.log"
fi
(cd "$OUT" && tar czf results.tgz --exclude='*.cgsnap' --exclude='*.safetensors' --exclude=results.tgz . 2>/dev/null; \
 find . -mindepth 1 ! -name results.tgz -exec rm -rf {} + 2>/dev/null)
ls -la "$OUT"
