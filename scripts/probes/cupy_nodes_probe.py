"""Which node of the CuPy corpus graph makes cuGraphKernelNodeGetParams crash: the driver's
own verbose DOT dump of the graph first, then each node read in turn (flushed), so the last
line before a crash names it. usage: python3 -X faulthandler scripts/probes/cupy_nodes_probe.py OUTDIR"""
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", ".."),
                os.path.join(os.path.dirname(__file__), "..", "..", "tests", "gpu")]
import cgsnap  # noqa: E402

cgsnap.start_recorder()
from cuda.bindings import driver as cu  # noqa: E402

import corpus  # noqa: E402
from cgsnap.cuda import driver, graphs  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "."
case = corpus.cupy_fft_kernels()
g = case.graph.graph
dot = os.path.join(out, "cupy_graph.dot").encode()
print("dot:", cu.cuGraphDebugDotPrint(g, dot, 1 << 0 | 1 << 2 | 1 << 3 | 1 << 10), flush=True)
for i, n in enumerate(graphs.graph_nodes(g)):
    t = graphs.node_type(n)
    print(f"node {i}: {t}", flush=True)
    if t == "kernel":
        err, p = cu.cuGraphKernelNodeGetParams(n)
        print(f"  getparams {err}", flush=True)
        f = int(p.func) if p.func is not None else 0
        k = int(p.kern) if getattr(p, "kern", None) is not None else 0
        print(f"  func {f:#x} kern {k:#x} kernelParams {int(p.kernelParams or 0):#x} "
              f"extra {int(p.extra or 0):#x} ctx {int(p.ctx or 0) if hasattr(p, 'ctx') else '-'}",
              flush=True)
        try:
            print("  name", driver.func_name(p.func), flush=True)
        except Exception as exc:   # noqa: BLE001
            print("  name failed:", exc, flush=True)
        try:
            print("  params", driver.func_params(p.func), flush=True)
        except Exception as exc:   # noqa: BLE001
            print("  params failed:", exc, flush=True)
print("snapshot ...", flush=True)
snap = cgsnap.snapshot(case.graph, buffers=case.buffers, name="cupy")
print("snapshot ok:", len(snap.graphs[0].nodes), "nodes", flush=True)
