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
allocator's other segments only the live blocks the graphs reach are saved (the allocator's own
block map, :func:`allocator_map`); a segment stays one region, so graphs that share it still
share it after the restore.
"""
from __future__ import annotations

from typing import Optional

import torch

from .capture import buffers as _buffers
from .capture.blocks import AllocatorMap, Block, Segment
from .capture.record import check_suspect_choice, snapshot_graph
from .capture.stream_capture import graph_handle
from .format.model import Policy
from .format.snapfile import save as _save_file


GRANULARITIES = ("block", "segment")


def allocator_map(device: Optional[int] = None, granularity: str = "block") -> AllocatorMap:
    """The caching allocator's segments on ``device`` (default: the current one) from
    ``torch.cuda.memory.memory_snapshot()``: graph-pool segments (pool id other than (0, 0))
    become shared scratch; the others carry their blocks -- live ones (``active_allocated``,
    ``active_pending_free``) with their requested size, free ones (``inactive``) empty -- so
    that only the live blocks the graphs reach are saved. ``granularity="segment"`` leaves the
    blocks out: segments are then saved whole (bounds still from the allocator, which matters
    for expandable segments)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)}")
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
             suspect_regions: str = "keep", granularity: str = "block",
             hold: str = "copy") -> list:
    """One :class:`cgsnap.Snapshot` per graph, sharing regions by name and address.
    ``suspect_regions`` (see :func:`cgsnap.snapshot`) is applied to each graph on its own.
    ``granularity``: ``"block"`` saves only the live allocator blocks the graphs reach,
    ``"segment"`` whole segments. ``hold`` (see :func:`cgsnap.snapshot`): ``"copy"`` keeps a
    device copy of the saved contents until the snapshots are saved and dropped."""
    check_suspect_choice(suspect_regions)     # before any work, even with no graphs
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
    return [snapshot_graph(graph_handle(g), name=name, buffers=named, record_outputs=False,
                           allocator_map=amap, bound_hashes=bound_hashes,
                           suspect_regions=suspect_regions, hold=hold, contents_cache=contents)
            for name, g in graphs.items()]


def save(path, graphs: dict, *, model=None, tensors: Optional[dict] = None,
         bound: Optional[dict] = None, compress="auto", prune: bool = True,
         suspect_regions: str = "keep", granularity: str = "block"):
    """Snapshot every graph and write them to one file; returns the merged snapshot. The
    contents are read from the live memory while the file is written (nothing runs in
    between), each blob checked against what the snapshot scanned."""
    from .format.snapfile import merge
    snaps = snapshot(graphs, model=model, tensors=tensors, bound=bound,
                     suspect_regions=suspect_regions, granularity=granularity, hold="live")
    merged = merge(snaps)
    _save_file(path, merged, compress=compress, prune=prune)
    return merged


def as_tensor(buf) -> torch.Tensor:
    """A torch tensor viewing a restored :class:`cgsnap.restore.restored.Buffer` (zero-copy)."""
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

    def tensor(self, name: str) -> torch.Tensor:
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
    if device is None:
        device = torch.cuda.current_device()
    torch.cuda.init()
    return TorchGraphs(_load(path, device=device, bind=bind, instantiate=instantiate,
                             verify_bound=verify_bound))
