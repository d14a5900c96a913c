#!/usr/bin/env bash
# One call: the allocator-block probe, the serving and CuPy GPU tests, the serving benchmark.
#   run(command="bash scripts/device_final.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh
start=$(date +%s)
timeout 90 python3 scripts/probes/blocks_probe.py gpt2-4L multi-stream > "$OUT/blocks_probe.log" 2>&1
echo "probe exit $? after $(( $(date +%s) - start )) s"
CGSNAP_RECORD=1 timeout 230 python3 -m pytest -q -n 3 -p no:cacheprovider --timeout 220 -rfEs \
  tests/gpu/test_gpu_serving.py "tests/gpu/test_gpu_corpus.py::test_corpus_case[cupy_fft_kernels]" \
  > "$OUT/pytest.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s"; tail -8 "$OUT/pytest.log"
left=$(( ${BUDGET:-560} - ($(date +%s) - start) ))
if [ "$left" -gt 90 ]; then
  timeout $(( left - 10 )) python3 scripts/bench.py --out "$OUT/bench.json" --only serving \
    ${BENCH_ARGS:-} --serving-budget $(( left - 25 )) > "$OUT/bench.log" 2>&1
  echo "bench exit $?"; grep -v "^\s*triton_\|AUTOTUNE\|strides:\|dtypes:\|SingleProcess\|Autotune\|num_choices" "$OUT/bench.log" | tail -45
fi
(cd "$OUT" && tar czf results.tgz --exclude='*.cgsnap' --exclude='*.safetensors' --exclude=results.tgz . 2>/dev/null; \
 find . -mindepth 1 ! -name results.tgz ! -name blocks_probe.log -exec rm -rf {} + 2>/dev/null)
head -c 6000 "$OUT/blocks_probe.log"
