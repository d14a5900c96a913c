"""Path B, a restart: import, load the weights, allocate the KV cache, then
cgsnap.torch.load(..., bind=...) and every graph is ready -- no compilation, no autotuning, no
capture in this process. Serves the first request, replays every graph once, checks the logits
bit for bit against the ones start_compiled.py --save recorded, and times the replays.

usage: python start_restored.py --weights W.safetensors --dir DIR [--instantiate lazy|all]
                                [--time-replays]

Prints ``TIMINGS {json}`` last; exits 1 if a check failed (logits differ, or anything was
compiled here)."""
import time

T_START = time.perf_counter()
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cgsnap.torch  # noqa: E402
import model as M  # noqa: E402

T_IMPORT = time.perf_counter() - T_START


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--dir", required=True, help="what start_compiled.py --save wrote")
    ap.add_argument("--instantiate", choices=("lazy", "all"), default="lazy")
    ap.add_argument("--time-replays", action="store_true")
    args = ap.parse_args()
    with open(os.path.join(args.dir, "original.json")) as f:
        original = json.load(f)
    sizes = original["sizes"]
    ref = np.load(os.path.join(args.dir, "reference.npz"))
    res: dict = {"import": T_IMPORT, "instantiate_mode": args.instantiate}
    failures = []

    t = time.perf_counter()
    model = M.load_model(args.weights)
    torch.cuda.synchronize()
    res["weights"] = time.perf_counter() - t
    c = model.config
    t = time.perf_counter()
    kv = M.new_kv_cache(c)
    M.fill_kv(kv)
    torch.cuda.synchronize()
    res["kv"] = time.perf_counter() - t

    # ---- the graph part: from weights in memory to every graph ready ----------------------
    t0 = time.perf_counter()
    try:
        graphs = cgsnap.torch.load(os.path.join(args.dir, "serving.cgsnap"),
                                   bind={"model": model, "kv_cache": kv},
                                   instantiate=args.instantiate)
    except cgsnap.CgsnapError as exc:     # a typed refusal is the result; print it with the rest
        res["load_error"] = f"{type(exc).__name__}: {exc}"[:4000]
        print(f"FAILED: cgsnap.torch.load: {res['load_error'][:500]}")
        print("TIMINGS " + json.dumps(res))
        return 1
    res["load"] = time.perf_counter() - t0
    first = min(sizes)          # the first request: one sequence
    tk, ps = M.step_inputs(c, first)
    t = time.perf_counter()
    tokens, positions = graphs.tensor("tokens"), graphs.tensor("positions")
    tokens.copy_(tk.cuda())
    positions.copy_(ps.cuda())
    graphs[f"bs{first}"].replay()
    logits = graphs.tensor(f"logits_bs{first}").cpu()
    res["first_request"] = time.perf_counter() - t
    res["ttft_from_weights"] = time.perf_counter() - t0
    res["ttft_from_start"] = time.perf_counter() - T_START
    res["first_token"] = int(logits[0].float().argmax())
    if f"bs{first}" in ref.files:     # the cache was fresh, as for the reference
        res["first_request_bitexact"] = bool(np.array_equal(logits.view(torch.int16).numpy(),
                                                            ref[f"bs{first}"]))
        if not res["first_request_bitexact"]:
            failures.append(f"first request (bs{first}) logits differ")
    t = time.perf_counter()
    for b in sizes:
        if b != first:
            graphs[f"bs{b}"].replay()
    torch.cuda.synchronize()
    res["other_replays"] = time.perf_counter() - t
    res["graph_part"] = res["load"] + res["first_request"] + res["other_replays"]
    res["ready_from_start"] = time.perf_counter() - T_START
    res["restored"] = dict(graphs.restored.timings)
    res["graphs"] = len(graphs)

    # ---- checks --------------------------------------------------------------------------------
    same = {}
    for key in ref.files:
        b = int(key[2:])
        M.fill_kv(kv)
        tk, ps = M.step_inputs(c, b)
        tokens.copy_(tk.cuda())
        positions.copy_(ps.cuda())
        graphs[f"bs{b}"].replay()
        torch.cuda.synchronize()
        got = graphs.tensor(f"logits_bs{b}").view(torch.int16).cpu().numpy()
        same[b] = bool(np.array_equal(got, ref[key]))
        print(f"bs{b:<4} {'bit-identical' if same[b] else 'DIFFERENT'}")
    res["bitexact"] = same
    if not all(same.values()):
        failures.append(f"logits differ for {[b for b, v in same.items() if not v]}")
    evidence = M.compile_evidence()
    res["compile_evidence"] = evidence
    if M.compiled_anything(evidence):
        failures.append(f"this process compiled or loaded a compiler: {evidence}")
    if args.time_replays:
        med = M.replay_medians({f"bs{b}": graphs[f"bs{b}"].replay for b in sizes})
        res["replay_ms"] = med
        res["replay_ratio"] = {k: v / original["replay_ms"][k] for k, v in med.items()
                               if original["replay_ms"].get(k)}
    graphs.close()
    print(f"(b) {args.instantiate}: load {res['load'] * 1e3:.1f} ms, first request "
          f"{res['first_request'] * 1e3:.1f} ms, other {len(sizes) - 1} first replays "
          f"{res['other_replays'] * 1e3:.1f} ms -> graph part {res['graph_part'] * 1e3:.1f} ms; "
          f"start -> first token {res['ttft_from_start']:.2f} s", flush=True)
    for f in failures:
        print("FAILED: " + f)
    print("TIMINGS " + json.dumps(res))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
