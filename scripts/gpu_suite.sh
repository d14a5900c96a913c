#!/usr/bin/env bash
# The whole GPU suite, the demo and (with BENCH=1) the benchmarks, in one call on a GPU machine.
# On the lent device (no package registry) carry the wheels fetched by scripts/fetch_wheels.sh:
#   run(command="bash scripts/gpu_suite.sh", carry=[".whl"])
# Prints pass/fail counts last; logs go to $OUT (or ./gpu-out) when set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# The recorder starts at `import cgsnap` in every test process, before any kernel loads.
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 CGSNAP_CACHE_DIR=/tmp/cgsnap-cache \
  CGSNAP_TEST_ARTIFACTS="$OUT" CGSNAP_RECORD=1 CGSNAP_SKIP_IMPORT_LINT=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# Tests run in parallel processes (pytest-xdist, on the device image) sharing the GPU.
WORKERS=${PYTEST_WORKERS:-8}
XDIST=""
python3 -c "import xdist" 2>/dev/null && [ "$WORKERS" != 0 ] && XDIST="-n $WORKERS --dist loadgroup"
python3 -m pytest -q $XDIST --junitxml="$OUT/junit.xml" -p no:cacheprovider -rfEs ${PYTEST_ARGS:-tests} 2>&1 | tee "$OUT/pytest.log"
suite=${PIPESTATUS[0]}
python3 -m cgsnap demo --keep "$OUT" 2>&1 | tee "$OUT/demo.log"
demo=${PIPESTATUS[0]}
bench=0
if [ "${BENCH:-0}" = 1 ]; then
  python3 scripts/bench.py --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  bench=${PIPESTATUS[0]}
fi
echo "=== summary ==="
grep -E "^[0-9]+ (passed|failed)|passed|failed" "$OUT/pytest.log" | tail -1
echo "pytest exit $suite, demo exit $demo, bench exit $bench"
exit $(( suite || demo || bench ))
