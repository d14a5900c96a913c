#!/usr/bin/env bash
# Rebuild the GPU binary fixtures of tests/test_binaries.py from tests/fixtures/src/kernels.cu.
#
#   scripts/make_fixtures.sh [OUTDIR]     (default: tests/fixtures)
#
# Needs nvcc (the committed files were made by CUDA 13.0) and a host C++ compiler. Targets the
# nvcc lacks are skipped. Set PTXAS12 to a CUDA 12.x ptxas (e.g. from the PyPI wheel
# nvidia-cuda-nvcc-cu12) to also build cubins in the old ELF ABI (EI_ABIVERSION 7), which
# CUDA 13 can no longer produce.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/tests/fixtures}
src=$root/tests/fixtures/src/kernels.cu
nvcc=${NVCC:-nvcc}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

has_sm() { "$nvcc" --list-gpu-code | grep -qx "sm_$1"; }

# SASS for two real targets plus PTX for JIT: the shape of a typical release build.
gencode=(-gencode arch=compute_80,code=sm_80 -gencode "arch=compute_90,code=[sm_90,compute_90]")

# Cubins, one per architecture: the oracle set for e_flags decoding.
for sm in 75 80 86 89 90 100 120; do
  has_sm "$sm" && "$nvcc" -cubin -arch="sm_$sm" -o "$out/kernels.sm_$sm.cubin" "$src"
done
for sm in 90 100; do  # arch-specific ('a') variants
  has_sm "$sm" && "$nvcc" -cubin -arch="sm_${sm}a" -o "$out/kernels.sm_${sm}a.cubin" "$src"
done
# Relocatable device code: variables become STT_CUDA_OBJECT, device functions global.
"$nvcc" -cubin -rdc=true -arch=sm_90 -o "$out/kernels.rdc.sm_90.cubin" "$src"

# Old ELF ABI: ptxas 12.x keeps the SM in the low byte of e_flags below sm_100 and marks 'a'
# in e_flags. Its PTX ISA ceiling is 8.8, and this source needs nothing newer.
if [[ -n "${PTXAS12:-}" ]]; then
  "$nvcc" -ptx -arch=compute_80 -o "$tmp/k.ptx" "$src"
  for sm in 80 90a 100a; do
    sed -e 's/^\.version .*/.version 8.8/' -e "s/^\.target .*/.target sm_$sm/" \
      "$tmp/k.ptx" >"$tmp/k_$sm.ptx"
    "$PTXAS12" -arch="sm_$sm" -o "$out/kernels.ptxas12.sm_$sm.cubin" "$tmp/k_$sm.ptx"
  done
fi

# Fatbins: nvcc's default, each --compress-mode, and cubins compressed too (-compress-all).
"$nvcc" -fatbin "${gencode[@]}" -o "$out/kernels.fatbin" "$src"
for mode in none size speed balance; do
  "$nvcc" -fatbin "${gencode[@]}" --compress-mode="$mode" -o "$out/kernels.$mode.fatbin" "$src"
done
"$nvcc" -fatbin "${gencode[@]}" --compress-mode=speed -Xfatbin -compress-all \
  -o "$out/kernels.speed_all.fatbin" "$src"
"$nvcc" -fatbin -gencode arch=compute_90,code=compute_90 -o "$out/kernels.ptx.fatbin" "$src"
"$nvcc" -fatbin -gencode arch=compute_90,code=lto_90 -o "$out/kernels.lto.fatbin" "$src"
variants=(-gencode "arch=compute_90a,code=[sm_90a,compute_90a]")
has_sm 100 && variants+=(-gencode arch=compute_100f,code=compute_100f)
"$nvcc" -fatbin "${variants[@]}" -o "$out/kernels.variants.fatbin" "$src"

# Host shared libraries of two objects each: whole-program (.nv_fatbin) and -rdc
# (device-linked .nv_fatbin plus the relocatable images in __nv_relfatbin).
for rdc in false true; do
  suffix=$([[ $rdc == true ]] && echo _rdc || true)
  flags=("${gencode[@]}" -rdc="$rdc" -Xcompiler -fPIC)
  "$nvcc" "${flags[@]}" -c -o "$tmp/a.o" "$src"
  "$nvcc" "${flags[@]}" -DSECOND_TU -c -o "$tmp/b.o" "$src"
  "$nvcc" "${gencode[@]}" -rdc="$rdc" -shared -cudart=shared \
    -o "$out/libkernels$suffix.so" "$tmp/a.o" "$tmp/b.o"
done

# Kernels that set graph conditionals (cgsnap.binary.calls).
"$nvcc" -cubin -arch=sm_90 -o "$out/conditional.sm_90.cubin" "$root/tests/fixtures/src/conditional.cu"
