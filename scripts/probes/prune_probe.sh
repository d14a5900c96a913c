# Device probes behind figures in docs/PERFORMANCE.md (run on the GPU machine, wheels installed):
#   bash scripts/probes/prune_probe.sh   whole vs pruned kernel images of the decoder
#   python3 scripts/probes/kload.py FILE  per-image kernel load times
#   python3 scripts/probes/pin_probe.py   page-locking file pages: threads, lock-then-DMA
# Whole vs pruned images for the 12-layer decoder: sizes, per-image load times, refusals.
export PYTHONPATH=/tmp/site:$PWD:$PWD/examples/warm_restart PYTHONUNBUFFERED=1
for mode in 0 1; do
  D=/tmp/pp$mode; mkdir -p $D
  CGSNAP_PRUNE=$mode WARM_LAYERS=${LAYERS:-12} python3 examples/warm_restart/save_graphs.py $D 2>&1 | tail -1
  ls -l $D/decoder.cgsnap
  python3 - $D/decoder.cgsnap <<'PY'
import sys, cgsnap
s = cgsnap.read(sys.argv[1])
p = s.meta.get("pruned_images", []); u = s.meta.get("unpruned_images", [])
print("images", len(s.images), "MB", round(sum(len(i.data) for i in s.images)/1e6, 2), "pruned", len(p), "unpruned", u[:5])
for e in sorted(p, key=lambda e: -e["bytes"][0])[:6]: print("  ", e["bytes"], e["kernels"])
PY
  python3 scripts/probes/kload.py $D/decoder.cgsnap 2>&1 | head -12
done
