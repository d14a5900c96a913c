#!/usr/bin/env bash
# The corpus of real producers alone (tests/gpu/test_gpu_corpus.py), in parallel, with its table.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 \
  CGSNAP_CACHE_DIR=/tmp/cgsnap-cache CGSNAP_TEST_ARTIFACTS="$OUT" CGSNAP_RECORD=1
timeout ${CORPUS_TIMEOUT:-420} python3 -m pytest -q -n ${PYTEST_WORKERS:-8} -p no:cacheprovider \
  -rfE tests/gpu/test_gpu_corpus.py 2>&1 | tee "$OUT/corpus.log" | tail -40
python3 scripts/corpus_table.py "$OUT/corpus.jsonl" | tee "$OUT/corpus.md"
