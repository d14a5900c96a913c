"""Write the random weights of the serving example's decoder once, to a safetensors file whose
metadata holds the model's shape (both start-up paths read it from there).

usage: python make_weights.py OUT.safetensors [--layers 32] [--hidden 2048] [--vocab 32000]
                              [--max-seq 256] [--max-batch 512] [--seed 0]"""
import argparse
import json
import sys
import time

import torch

import model as M


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    d = M.Config()
    ap.add_argument("--layers", type=int, default=d.layers)
    ap.add_argument("--hidden", type=int, default=d.hidden)
    ap.add_argument("--vocab", type=int, default=d.vocab)
    ap.add_argument("--max-seq", type=int, default=d.max_seq)
    ap.add_argument("--max-batch", type=int, default=d.max_batch)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    c = M.Config(layers=args.layers, hidden=args.hidden, vocab=args.vocab, max_seq=args.max_seq,
                 max_batch=args.max_batch)
    t = time.perf_counter()
    nbytes = M.write_weights(args.out, c, args.seed,
                             device="cuda" if torch.cuda.is_available() else "cpu")
    secs = time.perf_counter() - t
    params = nbytes // 2
    print(f"{c.layers} layers, hidden {c.hidden}, {c.heads} query / {c.kv_heads} KV heads, "
          f"MLP {c.intermediate}: {params / 1e9:.2f} G parameters, {nbytes / 1e9:.2f} GB in "
          f"{secs:.1f} s; KV cache {c.kv_shape} bf16 = {c.kv_bytes() / 1e9:.2f} GB")
    print("TIMINGS " + json.dumps({"write": secs, "bytes": nbytes, "kv_bytes": c.kv_bytes(),
                                   "config": json.loads(c.to_json())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
