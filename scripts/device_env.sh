# Sourced by the device scripts: the carried wheels installed into /tmp/site, the environment
# every GPU step runs with, $OUT created. Run from the repository root.
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 \
  CGSNAP_CACHE_DIR=/tmp/cgsnap-cache CGSNAP_TEST_ARTIFACTS="$OUT" \
  CGSNAP_SKIP_IMPORT_LINT=1
