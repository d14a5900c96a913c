"""Path A, today's start of a serving worker: import, load the weights, torch.compile the decode
step (GEMM autotuning on), warm up, capture one CUDA graph per batch size into one shared graph
pool (largest first), and serve the first request. With --save, also write every graph with
cgsnap for path B (start_restored.py), the logits of fixed inputs for its bit-exact check, and
each graph's replay time.

usage: python start_compiled.py --weights W.safetensors --out DIR [--sizes default] [--save]
                                [--parity] [--mode max-autotune-no-cudagraphs]
                                [--coordinate-descent]

Compilation: one torch.compile of the whole decode step with a dynamic batch dimension
(``mark_dynamic`` on dim 0 of tokens and positions, first call at the largest size so autotuning
tunes for it; ``backed_size_oblivious`` so batch 1 does not compile a second graph) -- what vLLM
does. SGLang compiles each batch size on its own; for 67 sizes that is 67 compiles of the whole
model. Autotuning: Inductor's ``max-autotune-no-cudagraphs`` (Triton GEMM templates benchmarked
against cuBLAS) without its coordinate-descent pass, which tunes every pointwise and reduction
kernel serially at its first launch (``--coordinate-descent`` turns it back on). Compile caches:
wherever TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point (fresh directories: cold).

Prints ``TIMINGS {json}`` last; exits 1 if a check failed."""
import time

T_START = time.perf_counter()
import cgsnap  # noqa: E402

cgsnap.start_recorder()     # before torch loads any kernel: cuBLAS and Triton modules are kept

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cgsnap.torch  # noqa: E402
import model as M  # noqa: E402

T_IMPORT = time.perf_counter() - T_START


def compile_options(mode: str, coordinate_descent: bool) -> dict:
    import torch._inductor
    options = dict(torch._inductor.list_mode_options(mode))
    options["triton.cudagraphs"] = False     # the graphs are captured below, not by Inductor
    if not coordinate_descent:
        options["coordinate_descent_tuning"] = False
    return options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="default")
    ap.add_argument("--mode", default="max-autotune-no-cudagraphs")
    ap.add_argument("--coordinate-descent", action="store_true")
    ap.add_argument("--save", action="store_true", help="write the graphs for start_restored.py")
    ap.add_argument("--parity", action="store_true",
                    help="with --save: restore the file in this process too and time both")
    ap.add_argument("--batch-one-apart", action="store_true",
                    help="no size-oblivious batch: batch 1 gets a compile of its own")
    args = ap.parse_args()
    sizes = M.parse_sizes(args.sizes)
    os.makedirs(args.out, exist_ok=True)
    res: dict = {"import": T_IMPORT, "sizes": sizes, "mode": args.mode,
                 "coordinate_descent": args.coordinate_descent}
    ok = True

    t = time.perf_counter()
    model = M.load_model(args.weights)
    torch.cuda.synchronize()
    res["weights"] = time.perf_counter() - t
    c = model.config
    if max(sizes) > c.max_batch:
        raise SystemExit(f"batch size {max(sizes)} > the model's max_batch {c.max_batch}")
    t = time.perf_counter()
    kv = M.new_kv_cache(c)
    M.fill_kv(kv)
    tokens = torch.zeros(c.max_batch, dtype=torch.long, device="cuda")
    positions = torch.zeros(c.max_batch, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    res["kv"] = time.perf_counter() - t
    res["config"] = json.loads(c.to_json())

    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.utils import counters
    if hasattr(fx_config, "backed_size_oblivious") and not args.batch_one_apart:
        fx_config.backed_size_oblivious = True      # a batch of 1 is one more symbolic size
    res["size_oblivious"] = bool(getattr(fx_config, "backed_size_oblivious", False))
    res["inductor"] = {"compile_threads": inductor_config.compile_threads,
                       "gemm_backends": inductor_config.max_autotune_gemm_backends,
                       "gemm_search_space": inductor_config.max_autotune_gemm_search_space}
    # Why Dynamo compiles again, if it does (each reason goes into TIMINGS).
    import logging
    recompiles: list = []

    class _Recompiles(logging.Handler):
        def emit(self, record):
            if record.name.endswith("__recompiles") and len(recompiles) < 8:
                recompiles.append(record.getMessage()[:1500])
    logging.getLogger("torch").addHandler(_Recompiles())
    torch._logging.set_logs(recompiles=True)
    options = compile_options(args.mode, args.coordinate_descent)
    # One compile for every size, as vLLM does (it calls its one compiled graph without
    # Dynamo's guards): Inductor's reshapes guard "batch != 1" where they merge the batch with
    # a head dimension, although the code they emit is valid for a batch of 1 too; the batch-1
    # graph is checked against eager execution below.
    res["guards_skipped"] = False
    if not args.batch_one_apart and hasattr(torch.compiler, "skip_all_guards_unsafe"):
        options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        res["guards_skipped"] = True
    step = torch.compile(model, options=options)

    # 1. compile + autotune: the first call, at the largest size (autotuning's size hint)
    big = max(sizes)
    t = time.perf_counter()
    with torch.no_grad():
        tb, pb = tokens[:big], positions[:big]
        torch._dynamo.mark_dynamic(tb, 0)
        torch._dynamo.mark_dynamic(pb, 0)
        step(tb, pb, kv)
    torch.cuda.synchronize()
    res["compile"] = time.perf_counter() - t
    res["dynamo_graphs_after_compile"] = int(counters["stats"]["unique_graphs"])

    # 2. warm-up of every size, then capture (and instantiate) one graph per size, largest first
    cap: dict = {}
    graphs, outputs = cgsnap.torch.capture_sizes(step, sizes, (tokens, positions), (kv,),
                                                 warmup=1, timings=cap)
    res["warmup"], res["capture"], res["instantiate"] = cap["warmup"], cap["capture"], \
        cap["instantiate"]
    res["graph_part"] = res["compile"] + res["warmup"] + res["capture"] + res["instantiate"]
    res["dynamo_graphs"] = int(counters["stats"]["unique_graphs"])
    res["recompile_reasons"] = recompiles
    res["ready_from_start"] = time.perf_counter() - T_START

    # 3. the first request: one sequence
    first = min(sizes)
    tk, ps = M.step_inputs(c, first)
    t = time.perf_counter()
    tokens.copy_(tk.cuda())
    positions.copy_(ps.cuda())
    graphs[f"bs{first}"].replay()
    logits = outputs[first].cpu()
    res["first_request"] = time.perf_counter() - t
    res["ttft_from_start"] = time.perf_counter() - T_START
    res["first_token"] = int(logits[0].float().argmax())
    res["inductor_counters"] = {k: int(v) for k, v in counters["inductor"].items()}
    print(f"(a) compile + autotune {res['compile']:.1f} s, warm-up {res['warmup']:.1f} s, "
          f"capture {res['capture']:.1f} s + instantiate {res['instantiate']:.2f} s of "
          f"{len(graphs)} graphs; Dynamo graphs: {res['dynamo_graphs']}; "
          f"start -> first token {res['ttft_from_start']:.1f} s", flush=True)

    if args.save:
        try:
            ok = save(args, c, model, kv, tokens, positions, graphs, outputs, sizes, res) and ok
        except Exception as exc:      # the timings above still count; the error is the result
            traceback.print_exc()
            res["save_error"] = f"{type(exc).__name__}: {exc}"[:4000]
            print(f"FAILED: saving: {res['save_error'][:500]}")
            ok = False
    print("TIMINGS " + json.dumps(res))
    return 0 if ok else 1


def replay_once(c, kv, tokens, positions, graph, out, b) -> np.ndarray:
    """Logits of ``graph`` (batch ``b``) on the fixed inputs, from the fixed cache contents."""
    M.fill_kv(kv)
    tk, ps = M.step_inputs(c, b)
    tokens.copy_(tk.to(tokens.device))
    positions.copy_(ps.to(positions.device))
    graph.replay()
    torch.cuda.synchronize()
    return out.view(torch.int16).cpu().numpy()


def save(args, c, model, kv, tokens, positions, graphs, outputs, sizes, res) -> bool:
    ok = True
    path = os.path.join(args.out, "serving.cgsnap")
    M.fill_kv(kv)
    torch.cuda.synchronize()
    t = time.perf_counter()
    cgsnap.torch.save(path, graphs, model=model, bound={"kv_cache": kv},
                      tensors={"tokens": tokens, "positions": positions,
                               **{f"logits_bs{b}": cgsnap.Scratch(outputs[b]) for b in sizes}})
    res["save"] = time.perf_counter() - t
    res["file_bytes"] = os.path.getsize(path)

    # Reference logits for the restore's bit-exact check; each graph from the same cache.
    ref = {}
    for b in M.check_sizes(sizes):
        ref[b] = replay_once(c, kv, tokens, positions, graphs[f"bs{b}"], outputs[b], b)
        f = torch.from_numpy(ref[b]).view(torch.bfloat16).float()[:b]
        if not bool(torch.isfinite(f).all()) or float(f.std()) == 0.0:
            print(f"FAILED: bs{b} logits are not finite or constant: nothing to compare")
            ok = False
    np.savez(os.path.join(args.out, "reference.npz"), **{f"bs{b}": v for b, v in ref.items()})
    original = {"sizes": sizes, "check_sizes": sorted(ref), "config": res["config"],
                "replay_ms": {}}

    def write_original():          # before the timings too: path B needs only the rest
        with open(os.path.join(args.out, "original.json"), "w") as f:
            json.dump(original, f)
    write_original()

    # The graphs compute the model: the smallest checked size against eager execution.
    b = min(ref)
    M.fill_kv(kv)
    tk, ps = M.step_inputs(c, b)
    with torch.no_grad():
        eager = model(tk[:b].cuda(), ps[:b].cuda(), kv).float()
    graph = torch.from_numpy(ref[b]).view(torch.bfloat16).float()[:b].cuda()
    cos = float(torch.nn.functional.cosine_similarity(eager.flatten(), graph.flatten(), dim=0))
    res["eager_cosine"] = cos
    res["eager_max_abs_diff"] = float((eager - graph).abs().max())
    if cos < 0.99:
        print(f"FAILED: compiled graph bs{b} vs eager: cosine {cos:.4f} (< 0.99)")
        ok = False

    # The graph's GPU time: the executable graph launched alone; torch's replay() (which adds
    # its RNG prologue, two fill_ kernels) is timed beside it for three sizes.
    launchers = {b: M.exec_launcher(graphs[f"bs{b}"]) for b in sizes}
    res["replay_timed_as"] = ("executable graph launch" if all(getattr(f, "raw", False)
                                                               for f in launchers.values())
                              else "torch replay()")
    prologue = {f"torch/bs{b}": graphs[f"bs{b}"].replay for b in M.check_sizes(sizes)}

    replays = {**{f"orig/bs{b}": launchers[b] for b in sizes}, **prologue}
    restored = None
    if args.parity:
        t = time.perf_counter()
        try:
            restored = cgsnap.torch.load(path, bind={"model": model, "kv_cache": kv},
                                         instantiate="all")
        except cgsnap.CgsnapError as exc:     # the originals are still timed below
            res["parity_error"] = f"{type(exc).__name__}: {exc}"[:4000]
            print(f"FAILED: restoring in this process: {res['parity_error'][:500]}")
            ok = False
        res["inprocess_load"] = time.perf_counter() - t
    if restored is not None:
        same = {}
        for b in ref:
            M.fill_kv(kv)
            tk, ps = M.step_inputs(c, b)
            restored.tensor("tokens").copy_(tk.cuda())
            restored.tensor("positions").copy_(ps.cuda())
            restored[f"bs{b}"].replay()
            torch.cuda.synchronize()
            got = restored.tensor(f"logits_bs{b}").view(torch.int16).cpu().numpy()
            same[b] = bool(np.array_equal(got, ref[b]))
        res["inprocess_bitexact"] = same
        if not all(same.values()):
            print(f"FAILED: restored in this process, not bit-exact: {same}")
            ok = False
        replays = {}
        for b in sizes:       # interleaved: original and restored of one size side by side
            replays[f"orig/bs{b}"] = launchers[b]
            replays[f"rest/bs{b}"] = restored[f"bs{b}"].replay
        replays.update(prologue)
    med = M.replay_medians(replays)
    res["replay_ms"] = {k.split("/")[1]: v for k, v in med.items() if k.startswith("orig/")}
    res["torch_replay_ms"] = {k.split("/")[1]: v for k, v in med.items() if k.startswith("torch/")}
    # Clones of the originals' own graphs (same nodes, same memory, new executable graphs),
    # instantiated with torch's flag and without, each beside its original: if they replay
    # like the restored graphs, the gap lies in the executable graph, not in where the restore
    # put memory. A diagnostic: its failure is noted, never the run's.
    try:
        clones = {}
        for b in M.check_sizes(sizes):
            for tag, flags in (("clone0", 0), ("clone1", 1)):
                fn = M.clone_launcher(graphs[f"bs{b}"], flags)
                if fn is not None:
                    clones[f"orig/bs{b}"] = launchers[b]
                    clones[f"{tag}/bs{b}"] = fn
        cmed = M.replay_medians(clones) if clones else {}
        for tag in ("clone0", "clone1"):
            res[f"{tag}_ratio"] = {k.split("/")[1]: v / cmed["orig/" + k.split("/")[1]]
                                   for k, v in cmed.items() if k.startswith(tag + "/")}
    except Exception as exc:
        res["clone_error"] = f"{type(exc).__name__}: {exc}"[:1000]
    if restored is not None:
        res["inprocess_replay_ms"] = {k.split("/")[1]: v for k, v in med.items()
                                      if k.startswith("rest/")}
        restored.close()
    original["replay_ms"] = res["replay_ms"]
    write_original()
    print(f"saved {len(graphs)} graphs to {path} ({res['file_bytes'] / 1e6:.1f} MB) in "
          f"{res['save']:.1f} s; eager vs graph cosine {cos:.5f}", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
