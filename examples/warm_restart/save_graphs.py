"""Build the model, capture one decode-step graph per batch size, save them all to one file,
and record each graph's outputs on fixed inputs for restore_graphs.py to compare with.

usage: python save_graphs.py OUT_DIR"""
import os
import sys
import time

t_start = time.perf_counter()
import cgsnap

cgsnap.start_recorder()          # before any kernel is loaded: cuBLAS keeps some in no fatbin

import numpy as np
import torch
from model import BATCH_SIZES, CONFIG, build, capture_graphs, step_inputs

import cgsnap.torch

t_import = time.perf_counter() - t_start
out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(out_dir, exist_ok=True)
t0 = time.perf_counter()
model, kv, kv_init = build()
tokens = torch.zeros(CONFIG["max_batch"], dtype=torch.long, device="cuda")
pos = torch.zeros(CONFIG["max_batch"], dtype=torch.long, device="cuda")
torch.cuda.synchronize()
t_build = time.perf_counter() - t0

t0 = time.perf_counter()
graphs, outputs = capture_graphs(model, kv, tokens, pos)
t_capture = time.perf_counter() - t0

kv.copy_(kv_init)     # the cache as a new process starts it (load(verify_bound=True) checks it)
torch.cuda.synchronize()
t0 = time.perf_counter()
path = os.path.join(out_dir, "decoder.cgsnap")
cgsnap.torch.save(path, graphs, model=model, bound={"kv_cache": kv},
                  tensors={"tokens": tokens, "pos": pos,
                           **{f"logits_bs{b}": outputs[b] for b in BATCH_SIZES}})
t_save = time.perf_counter() - t0

# Reference outputs: each graph from the same cache contents, on fixed inputs.
ref = {}
for b in BATCH_SIZES:
    kv.copy_(kv_init)
    tk, ps = step_inputs(b)
    tokens.copy_(tk)
    pos.copy_(ps)
    graphs[f"bs{b}"].replay()
    torch.cuda.synchronize()
    ref[f"bs{b}"] = outputs[b].view(torch.int16).cpu().numpy()
np.savez(os.path.join(out_dir, "reference.npz"), **ref)
import json

print("TIMINGS " + json.dumps({"import": t_import, "model": t_build, "capture": t_capture, "save": t_save,
                               "file_bytes": os.path.getsize(path)}))
print(f"saved {len(graphs)} graphs to {path} ({os.path.getsize(path) / 1e6:.1f} MB): "
      f"build {t_build:.2f} s, warm-up + capture {t_capture:.2f} s, snapshot + save {t_save:.2f} s")
