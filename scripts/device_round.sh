#!/usr/bin/env bash
# One batched call on the lent GPU machine: the whole suite (parallel), the demo, then the
# benchmark sections named in $BENCH_ONLY (if any), within $BUDGET seconds overall. Logs and
# JSON results are packed into $OUT/results.tgz (the device returns at most 8 files).
#   run(command="bash scripts/device_round.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-560}
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
SUITE_TIMEOUT=${SUITE_TIMEOUT:-400} timeout "${SUITE_TIMEOUT:-400}" bash scripts/gpu_suite.sh > "$OUT/suite.out" 2>&1
echo "suite exit $? after $(( $(date +%s) - start )) s"
tail -5 "$OUT/suite.out"
if [ -n "${BENCH_ONLY:-}" ] && [ "$(left)" -gt 30 ]; then
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CGSNAP_CACHE_DIR=/tmp/cgsnap-cache CGSNAP_TEST_ARTIFACTS="$OUT"
  timeout $(( $(left) - 15 )) python3 scripts/bench.py --out "$OUT/bench.json" --only "$BENCH_ONLY" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  tail -40 "$OUT/bench.log"
fi
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -60
[ -f "$OUT/corpus.jsonl" ] && python3 scripts/corpus_table.py "$OUT/corpus.jsonl" > "$OUT/corpus.md" && cat "$OUT/corpus.md"
(cd "$OUT" && tar czf results.tgz --exclude='*.cgsnap' --exclude=results.tgz . 2>/dev/null; \
 find . -mindepth 1 ! -name results.tgz ! -name suite.out -exec rm -rf {} + 2>/dev/null)
ls -la "$OUT"
