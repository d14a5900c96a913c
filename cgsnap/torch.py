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
"""
from __future__ import annotations

from typing import Optional

import torch

from .capture import buffers as _buffers
from .capture.classify import DEFAULT_POINTER_BUDGET
from .capture.record import check_memory_pointers, snapshot_graph
from .capture.stream_capture import graph_handle
from .format.model import Policy
from .format.snapfile import save as _save_file


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
             memory_pointers: str = "follow",
             pointer_budget: int = DEFAULT_POINTER_BUDGET) -> list:
    """One :class:`cgsnap.Snapshot` per graph, sharing regions by name and address.
    ``memory_pointers`` / ``pointer_budget`` (see :func:`cgsnap.snapshot`) apply to each graph
    on its own."""
    check_memory_pointers(memory_pointers, pointer_budget)   # before any work
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
                           memory_pointers=memory_pointers, pointer_budget=pointer_budget)
            for name, g in graphs.items()]


def save(path, graphs: dict, *, model=None, tensors: Optional[dict] = None,
         bound: Optional[dict] = None, compress: bool = False, prune: bool = True,
         memory_pointers: str = "follow", pointer_budget: int = DEFAULT_POINTER_BUDGET):
    """Snapshot every graph and write them to one file; returns the merged snapshot."""
    from .format.snapfile import merge
    snaps = snapshot(graphs, model=model, tensors=tensors, bound=bound,
                     memory_pointers=memory_pointers, pointer_budget=pointer_budget)
    merged = merge(snaps)
    _save_file(path, merged, compress=compress, prune=prune)
    return merged


def as_tensor(buf) -> torch.Tensor:
    """A torch tensor viewing a restored :class:`cgsnap.restore.restored.Buffer` (zero-copy),
    with the view the buffer was named with (shape, strides, offset)."""
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
