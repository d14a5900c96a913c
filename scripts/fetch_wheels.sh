#!/usr/bin/env bash
# Fetch the wheels that the lent GPU machine lacks (it has no package registry) into .whl/,
# for its python3 (CPython 3.12, x86-64). scripts/gpu_suite.sh installs them there with
# `pip install --no-index --target /tmp/site .whl/*.whl`. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in msgpack==1.2.4 zstandard==0.25.0 lz4==4.4.5 xxhash==3.6.0 pyelftools==0.33; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -la .whl
