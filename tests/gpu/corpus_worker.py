"""Fresh-process restore for the corpus (tests/gpu/test_gpu_corpus.py): never imports torch or
CuPy. usage: corpus_worker.py SNAPSHOT INPUTS.npz OUTPUTS(comma) RESULT.npz REPLAYS
Writes the inputs into the named buffers, launches the graph REPLAYS times and saves every
output after each launch as RESULT[f"{k}:{name}"]."""
import sys

import numpy as np

import cgsnap

path, inputs_path, names, result_path, replays = sys.argv[1:6]
inputs = np.load(inputs_path)
out = {}
with cgsnap.load(path) as r:
    for key in inputs.files:
        r.buffer(key).copy_from(inputs[key])
    graph = r.graph(r.graph_names[0])
    for k in range(int(replays)):
        graph.launch()
        r.synchronize()
        for name in names.split(","):
            out[f"{k}:{name}"] = np.ascontiguousarray(r.buffer(name).to_numpy())
    out["__timings__"] = np.array([r.timings.get(t, 0.0) for t in ("read", "init")])
np.savez(result_path, **out)
assert "torch" not in sys.modules, "the restore path imported torch"
assert "cupy" not in sys.modules, "the restore path imported cupy"
print("worker ok")
