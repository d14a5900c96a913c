"""PyTorch integration: save every graph of a model runner, restore them bound to a new process's
tensors, and replay them like ``torch.cuda.CUDAGraph``.

Saving::

    cgsnap.torch.save("graphs.cgsnap", {"bs1": g1, "bs8": g8, ...},
                      model=model,                       # parameters: bound at restore
                      bound={"kv_cache": kv},            # supplied by the new process
                      tensors={"tokens": tokens, "logits_bs8": out8, ...})  # saved

Restoring (new process; build the model and the KV cache first, at any addresses)::

    graphs = cgsnap.torch.load("graphs.cgsnap", bind={"model": model, "kv_cache": kv})
    graphs.tensor("tokens").copy_(new_tokens)     # torch tensors viewing the restored memory
    graphs["bs8"].replay()

Memory of torch's graph pool (``graph_pool_handle``) that no named tensor covers becomes shared
scratch: not saved, and the restored graphs share it the way the originals did. Of the caching
allocator's other segments only the blocks the graphs reach are saved (the allocator's own
block map, :func:`allocator_map`): live blocks' live bytes, and whole any free block a graph's
nodes address (a tensor freed while its graph lives; reported with a ``CgsnapWarning``); a segment stays one region, so graphs that share it still
share it after the restore.

Graphs that draw random numbers (dropout, sampling) record where their kernels read the Philox
seed and offset and how far a replay advances the generator; a restored ``replay()`` writes the
live generator's state there and advances it, as torch's does (see "random numbers" below).

``torch.compile(mode="reduce-overhead")`` keeps its CUDA graphs in torch's own graph trees,
which this module cannot carry (:class:`GraphTreesError` says why); compile with
``mode="max-autotune-no-cudagraphs"`` and capture the sizes yourself, e.g. with
:func:`capture_sizes`.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Optional

import numpy as np

try:
    import torch
except ImportError:     # the checks of what save() is given work without torch; the rest needs it
    torch = None

from .capture import buffers as _buffers
from .capture import philox
from .capture.blocks import AllocatorMap, Block, Segment
from .capture.classify import DEFAULT_POINTER_BUDGET
from .capture.record import check_memory_pointers, patch_saved_bytes, snapshot_graph
from .capture.stream_capture import graph_handle
from .cuda import driver
from .cuda import graphs as cuda_graphs
from .errors import CaptureError, DriverError, RestoreError
from .format.model import Policy, RngState
from .format.snapfile import save as _save_file

_TREES = "torch._inductor.cudagraph_trees"
_INSTEAD = ("compile with torch.compile(..., mode=\"max-autotune-no-cudagraphs\") (or the "
            "default mode), warm up, and capture each batch size into "
            "torch.cuda.CUDAGraph(keep_graph=True) yourself -- cgsnap.torch.capture_sizes() does "
            "that loop; examples/serving shows it")


class GraphTreesError(CaptureError):
    """What :func:`save` / :func:`snapshot` were given is (or comes from) torch.compile, not a
    ``torch.cuda.CUDAGraph(keep_graph=True)``: graphs that ``mode="reduce-overhead"`` (and
    ``"max-autotune"``) record live in torch's CUDA graph trees, which cannot be carried."""


def _need_torch() -> None:
    if torch is None:
        raise ImportError("cgsnap.torch needs PyTorch (pip install torch)")


def _tree_graphs() -> dict:
    """``{id(graph): where}`` for every ``torch.cuda.CUDAGraph`` that torch's CUDA graph trees
    hold in this thread. Read-only; empty when the trees were never imported, and whenever their
    private layout is not the one known here (torch 2.11 - 2.13)."""
    mod = sys.modules.get(_TREES)
    if mod is None:
        return {}
    found: dict = {}
    try:
        containers = getattr(getattr(mod, "local", None), "tree_manager_containers", None)
        if containers is None and torch is not None and \
                torch._C._is_key_in_tls("tree_manager_containers"):
            containers = torch._C._get_obj_in_tls("tree_manager_containers")
        for device, container in list((containers or {}).items()):
            manager = getattr(container, "tree_manager", None)
            if manager is None:
                continue
            if getattr(manager, "graph", None) is not None:
                found[id(manager.graph)] = f"the tree manager of cuda:{device}"
            stack = [n for nodes in (getattr(manager, "roots", None) or {}).values()
                     for n in nodes]
            seen = 0
            while stack and seen < 100_000:     # bounded: a tree is never near this
                node = stack.pop()
                seen += 1
                if getattr(node, "graph", None) is not None:
                    found[id(node.graph)] = (f"graph tree node {getattr(node, 'id', '?')} "
                                             f"of cuda:{device}")
                for children in (getattr(node, "children", None) or {}).values():
                    stack.extend(children)
    except Exception:       # private structures of another torch version: detect less, never fail
        return found
    return found


def _why_not_a_graph(what: str, g, trees: dict) -> Optional[CaptureError]:
    """The error for ``g`` (called ``what`` in it) if cgsnap cannot record it, else None."""
    cls = type(g)
    if cls.__module__ == _TREES:
        return GraphTreesError(
            f"{what} is a {cls.__name__} of torch.compile's CUDA graph trees "
            "(mode=\"reduce-overhead\" or \"max-autotune\"): the trees keep no cudaGraph_t "
            "(their CUDAGraphs use keep_graph=False), and what replaying one depends on -- inputs "
            "copied to fixed pool addresses, outputs rebuilt from the pool, Dynamo guards and the "
            "tree's generation state -- lives in torch's process state and cannot be carried; "
            f"{_INSTEAD}")
    if hasattr(g, "_torchdynamo_orig_callable") or (hasattr(g, "_orig_mod") and
                                                     hasattr(g, "dynamo_ctx")):
        return GraphTreesError(
            f"{what} is a function compiled by torch.compile, not a CUDA graph. If it was "
            "compiled with mode=\"reduce-overhead\" (or \"max-autotune\"), its graphs live in "
            "torch's CUDA graph trees, which cannot be carried: they keep no cudaGraph_t, and "
            "their inputs, outputs, guards and tree state belong to torch's process state; "
            f"{_INSTEAD}")
    if id(g) in trees:
        return GraphTreesError(
            f"{what} is a CUDAGraph owned by torch.compile's CUDA graph trees ({trees[id(g)]}; "
            "mode=\"reduce-overhead\" or \"max-autotune\"): replaying it depends on the trees' "
            "inputs at fixed pool addresses, Dynamo guards and generation state, which cannot be "
            f"carried; {_INSTEAD}")
    raw = getattr(g, "raw_cuda_graph", None)
    if raw is not None:
        try:
            raw()
        except RuntimeError as exc:
            return CaptureError(
                f"{what}: this torch.cuda.CUDAGraph keeps no cudaGraph_t ({exc}): capture it "
                "with torch.cuda.CUDAGraph(keep_graph=True). If it came from "
                f"torch.compile(mode=\"reduce-overhead\"), that cannot be carried; {_INSTEAD}")
    return None


def check_graphs(graphs) -> None:
    """Refuse, before any work, what :func:`snapshot` cannot record: a function compiled by
    torch.compile, torch's CUDA graph trees or their graphs (:class:`GraphTreesError`), a
    ``CUDAGraph`` without ``keep_graph=True``, or anything but a ``{name: graph}`` mapping
    (:class:`CaptureError`)."""
    if not isinstance(graphs, Mapping):
        err = _why_not_a_graph("graphs", graphs, _tree_graphs())
        if err is not None:
            raise err
        raise CaptureError(f"graphs must be a mapping {{name: torch.cuda.CUDAGraph}}, not "
                           f"{type(graphs).__name__}")
    trees = _tree_graphs()
    for name, g in graphs.items():
        if not isinstance(name, str) or not name:
            raise CaptureError(f"graph names must be non-empty strings, not {name!r}")
        err = _why_not_a_graph(f"graphs[{name!r}]", g, trees)
        if err is not None:
            raise err


GRANULARITIES = ("block", "segment")


def allocator_map(device: Optional[int] = None, granularity: str = "block") -> AllocatorMap:
    """The caching allocator's segments on ``device`` (default: the current one) from
    ``torch.cuda.memory.memory_snapshot()``: graph-pool segments (pool id other than (0, 0))
    become shared scratch; the others carry their blocks -- live ones (``active_allocated``,
    ``active_pending_free``) with their requested size, free ones (``inactive``) empty -- so
    that only the blocks the graphs reach are saved (a free one whole: see the module's doc). ``granularity="segment"`` leaves the
    blocks out: segments are then saved whole (bounds still from the allocator, which matters
    for expandable segments)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    _need_torch()
    dev = torch.cuda.current_device() if device is None else device
    segments = []
    for seg in torch.cuda.memory.memory_snapshot():
        if int(seg.get("device", dev)) != dev:
            continue
        base, size = int(seg["address"]), int(seg["total_size"])
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if pool != (0, 0):
            segments.append(Segment(base, size, (), Policy.SCRATCH, "torch-pool-%d-%d" % pool))
            continue
        blocks = ()
        if granularity == "block":
            blocks = tuple(_block(b, base) for b in seg.get("blocks", ()))
        segments.append(Segment(base, size, blocks))
    return AllocatorMap(segments)


def _block(b: dict, base: int) -> Block:
    size = int(b["size"])
    live = 0
    if b.get("state") != "inactive":
        requested = int(b.get("requested_size") or size)
        live = min(requested, size)
    return Block(int(b["address"]) - base, size, live)


def snapshot(graphs: dict, *, model=None, tensors: Optional[dict] = None,
             bound: Optional[dict] = None, model_name: str = "model",
             memory_pointers: str = "follow", pointer_budget: int = DEFAULT_POINTER_BUDGET,
             granularity: str = "block", hold: str = "copy",
             generators: Optional[dict] = None) -> list:
    """One :class:`cgsnap.Snapshot` per graph, sharing regions by name and address.
    ``memory_pointers`` / ``pointer_budget`` (see :func:`cgsnap.snapshot`) apply to each graph
    on its own. ``granularity``: ``"block"`` saves only the allocator blocks the graphs
    reach, ``"segment"`` whole segments. ``hold`` (see :func:`cgsnap.snapshot`): ``"copy"``
    keeps a device copy of the saved contents until the snapshots are saved and dropped.
    Graphs that draw random numbers carry their generator's state (see :func:`_record_rng`);
    ``generators``: ``{name: torch.Generator}`` for graphs that draw from generators of their
    own (registered with ``register_generator_state`` before capture), besides the default.
    What cannot be recorded is refused first (:func:`check_graphs`)."""
    check_graphs(graphs)
    check_memory_pointers(memory_pointers, pointer_budget)   # before any work
    _need_torch()
    named: dict = {}
    if model is not None:
        named[model_name] = _buffers.Bound(model)
    for name, t in (bound or {}).items():
        named[name] = _buffers.Bound(t)
    for name, t in (tensors or {}).items():
        named[name] = t if isinstance(t, _buffers._PolicyWrapper) else _buffers.Saved(t)
    torch.cuda.synchronize()
    amap = allocator_map(granularity=granularity)
    bound_hashes: dict = {}     # weights are read and hashed once for all the graphs
    contents: dict = {}         # and memory several graphs save is read once
    freed_seen: dict = {}       # one freed-block budget for all the graphs, one warning
    snaps = [snapshot_graph(graph_handle(g), name=name, buffers=named, record_outputs=False,
                            allocator_map=amap, bound_hashes=bound_hashes,
                            memory_pointers=memory_pointers, pointer_budget=pointer_budget,
                            hold=hold, contents_cache=contents, freed_seen=freed_seen,
                            warn_freed=False)
             for name, g in graphs.items()]
    _warn_freed(snaps)
    _record_rng(snaps, list(graphs.values()), generators)
    return snaps


def _warn_freed(snaps: list) -> None:
    """One :class:`cgsnap.CgsnapWarning` for the freed blocks every graph of a save reaches
    (each graph's snapshot keeps its own report in its meta)."""
    from .capture.record import warn_freed
    from .format.snapfile import merge_freed
    reports = [(s.meta.get("freed_blocks_read"), {}) for s in snaps]
    merged = merge_freed(reports)
    if merged is not None:
        names = [s.meta.get("name", "?") for s, (r, _) in zip(snaps, reports) if r]
        shown = ", ".join(map(repr, names[:4])) + (f" and {len(names) - 4} more"
                                                     if len(names) > 4 else "")
        warn_freed(("graph " if len(names) == 1 else "graphs ") + shown, merged, stacklevel=4)


def save(path, graphs: dict, *, model=None, tensors: Optional[dict] = None,
         bound: Optional[dict] = None, compress="auto", prune: bool = True,
         memory_pointers: str = "follow", pointer_budget: int = DEFAULT_POINTER_BUDGET,
         granularity: str = "block", generators: Optional[dict] = None):
    """Snapshot every graph and write them to one file; returns the merged snapshot. The
    contents are read from the live memory while the file is written (nothing runs in
    between but the RNG probe, whose two words are patched into saved copies), each blob
    checked against what the snapshot scanned."""
    from .format.snapfile import merge
    snaps = snapshot(graphs, model=model, tensors=tensors, bound=bound,
                     memory_pointers=memory_pointers, pointer_budget=pointer_budget,
                     granularity=granularity, hold="live",
                     generators=generators)
    merged = merge(snaps)
    _save_file(path, merged, compress=compress, prune=prune)
    return merged


# ---- random numbers: torch's Philox state in the graphs ----------------------------------------
#
# ATen's RNG kernels in a captured graph read the seed and base offset from two 8-byte device
# words (cgsnap.capture.philox); torch's replay fills them from the generator before each launch
# and then advances the generator's offset by the graph's whole increment (C++ only: neither the
# words nor the increment are visible to Python). Torch 2.11 keeps one pair of words per
# generator, shared by every graph of that generator; 2.12 and later one pair per capture. Both
# are found the same way: the graph's kernels that take such a struct name the words, and one
# replay of torch's own executable graph with every kernel, memset and memcpy node disabled --
# it changes no memory but the two words -- confirms them and measures the increment: the
# generator is set to a probe state first, the replay writes exactly that state into the words
# and advances the offset by the increment, and the generator is put back afterwards.

def _record_rng(snaps: list, graph_objs: list, generators: Optional[dict]) -> None:
    """Set ``graphs[0].rng`` of each snapshot (the graph it was made of) and write the
    generator's state at save time into the saved copies of the words, so that a plain
    ``launch()`` of the restored graph draws what the original's next replay would have."""
    device = torch.cuda.current_device()
    gens = _save_generators(generators, device)
    for snap, g in zip(snaps, graph_objs):
        top = snap.graphs[0]
        top.rng = _probe_rng(snap, top.name, g, philox.find_states(snap), gens, device)
        _write_saved_words(snap, top.rng)


def _save_generators(generators: Optional[dict], device: int) -> list:
    torch.cuda.init()
    out = [(None, torch.cuda.default_generators[device])]
    for name, gen in (generators or {}).items():
        if not isinstance(name, str) or not isinstance(gen, torch.Generator):
            raise CaptureError(f"generators: expected {{name: torch.Generator}}, got "
                               f"{type(name).__name__}: {type(gen).__name__}")
        if gen.device.type != "cuda" or (gen.device.index or 0) != device:
            raise CaptureError(f"generators[{name!r}] is a generator of {gen.device}; the graphs "
                               f"are on cuda:{device}")
        out.append((name, gen))
    return out


def _torch_exec(g) -> Optional[int]:
    """The CUgraphExec torch replays ``g`` with (instantiated now if torch has not yet)."""
    raw = getattr(g, "raw_cuda_graph_exec", None)
    if raw is None:
        return None
    try:
        return int(raw())
    except RuntimeError:          # keep_graph=True and never replayed
        g.instantiate()
        return int(raw())


def _probe_rng(snap, name: str, g, uses: list, gens: list, device: int) -> list:
    """The :class:`RngState` of each generator graph ``g`` draws from (see above)."""
    where = f"graph {name!r}"
    nodes = cuda_graphs.graph_nodes(graph_handle(g))
    types = [cuda_graphs.node_type(n) for n in nodes]
    others = sorted({t for t in types if t not in cuda_graphs.DISABLEABLE | cuda_graphs.INERT})
    exe = _torch_exec(g)
    if exe is None or others:
        if not uses:
            return []          # no sign of RNG, and no replay of it would be harmless
        why = f"its {', '.join(others)} node(s) cannot be disabled" if others else \
            "it is not a torch.cuda.CUDAGraph"
        raise CaptureError(f"{where} draws random numbers (kernel node {uses[0].node} takes "
                           "torch's RNG state), and measuring how far a replay advances the "
                           f"generator needs one replay that runs no node, but {why}")
    words = {}
    for u in uses:
        words.setdefault((u.seed, u.offset),
                         tuple(snap.regions[r.region].origin + r.offset for r in (u.seed, u.offset)))
    probes = philox.probe_states(len(gens))
    views = [_state_view(gen) for _, gen in gens]
    saved = [(v.get_state(), v.initial_seed(), v.get_offset()) for v in views]
    try:
        for v, (seed, offset) in zip(views, probes):
            v.manual_seed(seed)
            v.set_offset(offset)
        torch.cuda.synchronize()
        with cuda_graphs.nodes_disabled(exe, [n for n, t in zip(nodes, types)
                                              if t in cuda_graphs.DISABLEABLE]):
            g.replay()
            torch.cuda.synchronize()
        increments = [v.get_offset() - offset for v, (_, offset) in zip(views, probes)]
        read = {key: (_read_u64(a), _read_u64(b)) for key, (a, b) in words.items()}
    except (RuntimeError, DriverError) as exc:
        if not uses:
            return []
        raise CaptureError(f"{where}: the replay measuring its RNG use failed: {exc}") from exc
    finally:
        for v, (state, _, _) in zip(views, saved):
            v.set_state(state)
    blocks = _rng_tensor_blocks() if any(v not in probes for v in read.values()) else set()
    return [RngState(seed=key[0], offset=key[1], increment=increment, device=device,
                     saved_seed=saved[i][1], saved_offset=saved[i][2], generator=gens[i][0])
            for i, key, increment in philox.match_probe(where, uses, read, increments,
                                                        [n for n, _ in gens], blocks, words)]


def _state_view(gen):
    """A generator sharing ``gen``'s state (seed and offset). Setting the state or the offset
    through ``gen`` itself also marks cuDNN's cached RNN dropout state for re-seeding, which
    torch's own replay never does; through this view it does not."""
    view = getattr(gen, "graphsafe_get_state", None)
    return view() if view is not None else gen


def _read_u64(addr: int) -> int:
    out = np.zeros(1, dtype="<u8")
    driver.dtoh(int(out.ctypes.data), addr, 8)
    return int(out[0])


def _rng_tensor_blocks() -> set:
    """Addresses of the caching allocator's live blocks of 8 requested bytes: torch's seed and
    offset words are such blocks (one-element int64 tensors)."""
    return {int(b["address"]) for seg in torch.cuda.memory.memory_snapshot()
            for b in seg.get("blocks", ())
            if b.get("requested_size") == 8 and b.get("state") == "active_allocated"}


def _write_saved_words(snap, states: list) -> None:
    """Each entry's generator state at save time into the saved contents of its words (a
    scratch or bound region keeps no contents: its words start as zeros or the caller's). The
    innermost saved region holding a word is patched (a view's contents are written after its
    parent's); an allocator block saved as an extent is patched in host memory, or added
    where it was left out for being zero."""
    for e in states:
        for ref, value in ((e.seed, e.saved_seed), (e.offset, e.saved_offset)):
            rid, off = ref.region, ref.offset
            while rid is not None:
                r = snap.regions[rid]
                if r.policy is Policy.SAVED and (r.data is not None or r.extents is not None):
                    patch_saved_bytes(r, off, value.to_bytes(8, "little"))
                    break
                rid, off = r.parent, r.parent_offset + off


def capture_sizes(fn, sizes, batched, shared=(), *, warmup: int = 1, pool=None,
                  name: str = "bs{}", instantiate: bool = True,
                  timings: Optional[dict] = None) -> tuple:
    """Capture ``fn(*(t[:b] for t in batched), *shared)`` once per batch size ``b`` into
    ``torch.cuda.CUDAGraph(keep_graph=True)`` graphs that share one graph pool, largest first as
    vLLM and SGLang do -- what ``torch.compile(mode="reduce-overhead")`` users need instead of
    graph trees. Each size first runs ``warmup`` times on a side stream, outside capture
    (compilation, autotuning and lazy module loads must not happen while capturing).

    ``batched``: the static input tensors, at least ``max(sizes)`` rows each (fill them before
    a replay); ``shared``: arguments passed whole (a KV cache). Returns
    ``({name.format(b): graph}, {b: output})``, largest first: what :func:`save` takes. Each
    size's output stays allocated on its own. ``instantiate``: instantiate every graph now
    (otherwise the first replay does). ``timings``, if given, gets the seconds of ``warmup``,
    ``capture`` and ``instantiate``."""
    _need_torch()
    sizes = list(sizes)
    if not sizes or any(type(b) is not int or b < 1 for b in sizes) or \
            len(set(sizes)) != len(sizes):
        raise CaptureError(f"capture_sizes: positive, distinct int batch sizes expected, "
                           f"got {sizes!r}")
    batched, shared = tuple(batched), tuple(shared)
    if not batched:
        raise CaptureError("capture_sizes: no batched inputs (the tensors sliced to each size)")
    rows = min(int(t.shape[0]) for t in batched)
    if max(sizes) > rows:
        raise CaptureError(f"capture_sizes: batch size {max(sizes)} exceeds the {rows} rows of "
                           "the batched inputs")
    names = {b: name.format(b) for b in sizes}
    if len(set(names.values())) != len(sizes):
        raise CaptureError(f"capture_sizes: name {name!r} gives several sizes one name")
    order = sorted(sizes, reverse=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        if warmup > 0:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for b in order:
                    for _ in range(warmup):
                        fn(*(t[:b] for t in batched), *shared)
            torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        if pool is None:
            pool = torch.cuda.graph_pool_handle()
        graphs, outputs = {}, {}
        for b in order:
            g = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(g, pool=pool):
                outputs[b] = fn(*(t[:b] for t in batched), *shared)
            graphs[names[b]] = g
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        if instantiate:
            for g in graphs.values():
                if hasattr(g, "instantiate"):       # else the first replay instantiates
                    g.instantiate()
            torch.cuda.synchronize()
        t3 = time.perf_counter()
    if timings is not None:
        timings.update(warmup=t1 - t0, capture=t2 - t1, instantiate=t3 - t2)
    return graphs, outputs


def as_tensor(buf) -> "torch.Tensor":
    """A torch tensor viewing a restored :class:`cgsnap.restore.restored.Buffer` (zero-copy),
    with the view the buffer was named with (shape, strides, offset)."""
    _need_torch()
    raw = torch.as_tensor(_ByteView(buf), device="cuda")
    dtype = getattr(torch, buf.dtype) if buf.dtype and hasattr(torch, buf.dtype) else torch.uint8
    t = raw.view(dtype)
    if not buf.dtype:
        return t
    if buf.strides is None:
        return t.reshape(buf.shape)
    if any(s < 0 for s in buf.strides):
        raise ValueError(f"buffer {buf.name!r} has negative strides {buf.strides}: a torch "
                         "tensor cannot view it (use its __cuda_array_interface__)")
    return torch.as_strided(t, buf.shape, buf.strides, buf.view_offset)


class _ByteView:
    """The buffer as raw bytes: works for dtypes ``__cuda_array_interface__`` cannot name
    (bfloat16, fp8)."""

    def __init__(self, buf):
        self.__cuda_array_interface__ = {"shape": (buf.nbytes,), "typestr": "|u1",
                                         "data": (buf.ptr, False), "version": 3, "strides": None}


class TorchGraph:
    """A restored graph with ``torch.cuda.CUDAGraph``'s ``replay()``, on torch's current stream.

    A graph that draws random numbers draws them from the live generator, as torch's replay
    does: before each launch its seed and offset are written into the graph's RNG words on the
    launch stream, then the generator's offset advances by the graph's increment. So a sequence
    of replays from a generator state draws what the original's replays drew from that state,
    and eager random ops in between interleave as they would with the original graph."""

    def __init__(self, restored, name: str, generators: Optional[dict] = None):
        self._graph = restored.graph(name)
        self.name = name
        self._rng = [(e.generator, e.increment, _load_generator(restored, name, e, generators))
                     for e in self._graph.rng]

    def replay(self) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for gname, increment, gen in self._rng:
            offset = gen.get_offset()     # torch's replay_prologue: write, then advance
            self._graph.set_rng(gen.initial_seed(), offset, generator=gname, stream=stream)
            _state_view(gen).set_offset(offset + increment)
        self._graph.launch(stream)

    def instantiate(self) -> "TorchGraph":
        self._graph.instantiate()
        return self


class TorchGraphs:
    """All graphs of a file, restored; ``graphs[name].replay()``, ``graphs.tensor(name)``."""

    def __init__(self, restored, generators: Optional[dict] = None):
        self.restored = restored
        names = {e.generator for g in restored.snapshot.graphs for e in g.rng} - {None}
        extra = sorted(set(generators or {}) - names)
        if extra:
            raise RestoreError(f"{restored.path}: generators {', '.join(map(repr, extra))} are "
                               "drawn from by no graph of the file")
        self._graphs = {n: TorchGraph(restored, n, generators) for n in restored.graph_names}
        self._tensors: dict = {}

    def __getitem__(self, name: str) -> TorchGraph:
        return self._graphs[name]

    def __iter__(self):
        return iter(self._graphs)

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self):
        return self._graphs.keys()

    def tensor(self, name: str) -> "torch.Tensor":
        if name not in self._tensors:
            self._tensors[name] = as_tensor(self.restored.buffer(name))
        return self._tensors[name]

    def close(self) -> None:
        self._tensors.clear()
        self.restored.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_generator(restored, graph: str, e, generators: Optional[dict]):
    """The live generator an RNG entry draws from: the restore device's default generator, or
    the one passed under the entry's name."""
    if e.generator is None:
        torch.cuda.init()
        return torch.cuda.default_generators[restored.device.ordinal]
    gen = (generators or {}).get(e.generator)
    if not isinstance(gen, torch.Generator):
        raise RestoreError(f"{restored.path}: graph {graph!r} draws from generator "
                           f"{e.generator!r}: pass it, load(..., generators={{{e.generator!r}: "
                           "torch.Generator(device='cuda')}})")
    if gen.device.type != "cuda" or (gen.device.index or 0) != restored.device.ordinal:
        raise RestoreError(f"{restored.path}: generator {e.generator!r} is a generator of "
                           f"{gen.device}; the graphs are restored on cuda:"
                           f"{restored.device.ordinal}")
    return gen


def load(path, *, bind: Optional[dict] = None, device: Optional[int] = None,
         instantiate: str = "lazy", verify_bound: bool = False,
         generators: Optional[dict] = None) -> TorchGraphs:
    """Restore a file saved by :func:`save`. ``generators``: ``{name: torch.Generator}`` for
    graphs saved with ``save(..., generators=...)`` (the default generator needs none)."""
    from . import load as _load
    _need_torch()
    if device is None:
        device = torch.cuda.current_device()
    torch.cuda.init()
    restored = _load(path, device=device, bind=bind, instantiate=instantiate,
                     verify_bound=verify_bound)
    try:
        return TorchGraphs(restored, generators)
    except BaseException:
        restored.close()
        raise
