#!/usr/bin/env bash
# The corpus of real producers alone (tests/gpu/test_gpu_corpus.py), in parallel, with its table.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/device_env.sh
export CGSNAP_RECORD=1
timeout ${CORPUS_TIMEOUT:-420} python3 -m pytest -q -n ${PYTEST_WORKERS:-8} -p no:cacheprovider \
  -rfE tests/gpu/test_gpu_corpus.py 2>&1 | tee "$OUT/corpus.log" | tail -40
python3 scripts/corpus_table.py "$OUT/corpus.jsonl" | tee "$OUT/corpus.md"
