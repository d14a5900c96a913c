"""In a new process: build the model again (new addresses), bind it and a new KV cache to the
saved graphs, replay every graph on the same inputs and compare bit-exactly with save_graphs.py.

usage: python restore_graphs.py OUT_DIR"""
import json
import os
import sys
import time

t_start = time.perf_counter()
import numpy as np
import torch
from model import BATCH_SIZES, build, step_inputs

import cgsnap.torch

t_import = time.perf_counter() - t_start
out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
t0 = time.perf_counter()
model, kv, kv_init = build()
torch.cuda.synchronize()
t_build = time.perf_counter() - t0
t0 = time.perf_counter()
graphs = cgsnap.torch.load(os.path.join(out_dir, "decoder.cgsnap"),
                           bind={"model": model, "kv_cache": kv})
t_load = time.perf_counter() - t0
ref = np.load(os.path.join(out_dir, "reference.npz"))
failures = 0
t0 = time.perf_counter()
for b in BATCH_SIZES:
    kv.copy_(kv_init)
    tk, ps = step_inputs(b)
    graphs.tensor("tokens").copy_(tk)
    graphs.tensor("pos").copy_(ps)
    graphs[f"bs{b}"].replay()
    torch.cuda.synchronize()
    got = graphs.tensor(f"logits_bs{b}").view(torch.int16).cpu().numpy()
    same = np.array_equal(got, ref[f"bs{b}"])
    failures += not same
    print(f"bs{b:<3} {'bit-identical' if same else 'DIFFERENT'}")
t_first = time.perf_counter() - t0
timings = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in graphs.restored.timings.items())
print(f"load + bind {t_load * 1e3:.1f} ms; first replay of all graphs {t_first * 1e3:.1f} ms "
      f"({timings})")
print("TIMINGS " + json.dumps({"import": t_import, "model": t_build, "load": t_load,
                               "first_replays": t_first, **graphs.restored.timings}))
graphs.close()
sys.exit(1 if failures else 0)
