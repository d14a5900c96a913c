"""Fresh-process restore used by the GPU tests: never imports torch or CuPy.

usage: restore_worker.py SNAPSHOT INPUTS.npz OUTPUT_NAMES(comma) RESULT.npz GRAPH [launches]
Writes the inputs into the named buffers, launches GRAPH, saves the named outputs."""
import sys

import numpy as np

import cgsnap

path, inputs_path, names, result_path, graph = sys.argv[1:6]
launches = int(sys.argv[6]) if len(sys.argv) > 6 else 1
inputs = np.load(inputs_path)
with cgsnap.load(path) as r:
    for key in inputs.files:
        r.buffer(key).copy_from(inputs[key])
    for _ in range(launches):
        r.graph(graph).launch()
    r.synchronize()
    out = {name: r.buffer(name).to_numpy() for name in names.split(",")}
    out["__timings__"] = np.array([r.timings.get(k, 0.0) for k in
                                   ("read", "alloc", "kernels", "copy", "build", "instantiate")])
np.savez(result_path, **out)
assert "torch" not in sys.modules, "the restore path imported torch"
assert "cupy" not in sys.modules, "the restore path imported cupy"
print("worker ok")
