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
scratch: not saved, and the restored graphs share it the way the originals did.

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

try:
    import torch
except ImportError:     # the checks of what save() is given work without torch; the rest needs it
    torch = None

from .capture import buffers as _buffers
from .capture.record import check_suspect_choice, snapshot_graph
from .capture.stream_capture import graph_handle
from .errors import CaptureError
from .format.model import Policy
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


def _graph_pool_segments() -> dict:
    """``{segment base: pool id}`` of the caching allocator's segments that belong to a graph
    pool (pool id (0, 0) is the ordinary pool)."""
    out = {}
    for seg in torch.cuda.memory.memory_snapshot():
        pool = tuple(seg.get("segment_pool_id", (0, 0)))
        if pool != (0, 0):
            out[int(seg["address"])] = "torch-pool-%d-%d" % pool
    return out


def snapshot(graphs: dict, *, model=None, tensors: Optional[dict] = None,
             bound: Optional[dict] = None, model_name: str = "model",
             suspect_regions: str = "keep") -> list:
    """One :class:`cgsnap.Snapshot` per graph, sharing regions by name and address.
    ``suspect_regions`` (see :func:`cgsnap.snapshot`) is applied to each graph on its own.
    What cannot be recorded is refused first (:func:`check_graphs`)."""
    check_graphs(graphs)
    check_suspect_choice(suspect_regions)     # before any work, even with no graphs
    _need_torch()
    named: dict = {}
    if model is not None:
        named[model_name] = _buffers.Bound(model)
    for name, t in (bound or {}).items():
        named[name] = _buffers.Bound(t)
    for name, t in (tensors or {}).items():
        named[name] = t if isinstance(t, _buffers._PolicyWrapper) else _buffers.Saved(t)
    torch.cuda.synchronize()
    pools = _graph_pool_segments()

    def allocation_policy(base: int, size: int):
        pool = pools.get(base)
        return (Policy.SCRATCH, pool) if pool is not None else None

    bound_hashes: dict = {}     # weights are read and hashed once for all the graphs
    return [snapshot_graph(graph_handle(g), name=name, buffers=named, record_outputs=False,
                           allocation_policy=allocation_policy, bound_hashes=bound_hashes,
                           suspect_regions=suspect_regions)
            for name, g in graphs.items()]


def save(path, graphs: dict, *, model=None, tensors: Optional[dict] = None,
         bound: Optional[dict] = None, compress: bool = False, prune: bool = True,
         suspect_regions: str = "keep"):
    """Snapshot every graph and write them to one file; returns the merged snapshot."""
    from .format.snapfile import merge
    snaps = snapshot(graphs, model=model, tensors=tensors, bound=bound,
                     suspect_regions=suspect_regions)
    merged = merge(snaps)
    _save_file(path, merged, compress=compress, prune=prune)
    return merged


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
    """A torch tensor viewing a restored :class:`cgsnap.restore.restored.Buffer` (zero-copy)."""
    _need_torch()
    raw = torch.as_tensor(_ByteView(buf), device="cuda")
    dtype = getattr(torch, buf.dtype) if buf.dtype and hasattr(torch, buf.dtype) else torch.uint8
    t = raw.view(dtype)
    return t.reshape(buf.shape) if buf.dtype else t


class _ByteView:
    """The buffer as raw bytes: works for dtypes ``__cuda_array_interface__`` cannot name
    (bfloat16, fp8)."""

    def __init__(self, buf):
        self.__cuda_array_interface__ = {"shape": (buf.nbytes,), "typestr": "|u1",
                                         "data": (buf.ptr, False), "version": 3, "strides": None}


class TorchGraph:
    """A restored graph with ``torch.cuda.CUDAGraph``'s ``replay()``, on torch's current stream."""

    def __init__(self, restored, name: str):
        self._graph = restored.graph(name)
        self.name = name

    def replay(self) -> None:
        self._graph.launch(torch.cuda.current_stream().cuda_stream)

    def instantiate(self) -> "TorchGraph":
        self._graph.instantiate()
        return self


class TorchGraphs:
    """All graphs of a file, restored; ``graphs[name].replay()``, ``graphs.tensor(name)``."""

    def __init__(self, restored):
        self.restored = restored
        self._graphs = {n: TorchGraph(restored, n) for n in restored.graph_names}
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


def load(path, *, bind: Optional[dict] = None, device: Optional[int] = None,
         instantiate: str = "lazy", verify_bound: bool = False) -> TorchGraphs:
    from . import load as _load
    _need_torch()
    if device is None:
        device = torch.cuda.current_device()
    torch.cuda.init()
    return TorchGraphs(_load(path, device=device, bind=bind, instantiate=instantiate,
                             verify_bound=verify_bound))
