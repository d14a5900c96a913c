"""Snapshot file -> runnable graphs in this process.

Order of work (each step only after the previous succeeded; any failure frees everything made so
far and raises a typed error):

1. read and validate the whole file (no GPU work yet);
2. check the device, the driver and every kernel image against the snapshot, and the bound
   buffers against the regions they replace;
3. allocate regions, load images and kernels, copy saved contents (module globals into the
   loaded images), rewrite the pointers stored in them, create events;
4. build each graph on first use (or all at once), instantiate once.

The per-node work that does not depend on addresses (argument bytes, pointer patch lists,
dependency lists, node order) is planned once per graph before any driver call.

Nothing here imports torch or CuPy.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import operator
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from .. import _progress
from ..capture.buffers import check_bind, flatten
from ..cuda import driver, graphs, native, transfer
from ..errors import BindError, CgsnapError, DriverError, FormatError, KernelNotFoundError, RestoreError
from ..format import fileformat
from ..format.hashing import region_hash
from ..format.model import Policy, RegionKind, Snapshot
from . import compat
from .buffers import Buffer
from .build import BuildState, build_graph
from .ledger import Ledger
from .plan import GraphPlan, param_offsets, region_patches

log = logging.getLogger("cgsnap.restore")


# ---- the restored snapshot ----------------------------------------------------------------

class RestoredGraph:
    """One graph, built and instantiated on first launch (or by :meth:`instantiate`). Usable
    while its restore is open; after ``close()`` every call raises RestoreError.

    Random numbers (a torch graph with dropout or sampling): ``rng`` lists the generator state
    the graph's kernels read (:class:`~cgsnap.format.model.RngState`). :meth:`launch` never
    touches it: the kernels read the seed and offset words as device memory holds them -- at
    first the generator's state at save time, so every launch draws the numbers the original's
    next replay would have drawn, the same numbers each time. :meth:`set_rng` writes other
    values before a launch; ``cgsnap.torch`` does that from the live generator on every
    replay, as torch does."""

    def __init__(self, owner: "Restored", name: str):
        self._owner = owner
        self.name = name
        self.exec = None
        self._rng = None
        self._rng_words = None

    @property
    def rng(self) -> tuple:
        """The graph's :class:`~cgsnap.format.model.RngState` entries (empty: no random numbers)."""
        self._owner._check_open()
        if self._rng is None:
            self._rng = tuple(self._owner.snapshot.graph(self.name).rng)
        return self._rng

    def set_rng(self, seed: int, offset: int, *, generator: Optional[str] = None,
                stream=None) -> None:
        """Write ``seed`` and ``offset`` into the words the graph's RNG kernels read, ordered on
        ``stream`` (default: the legacy default stream, as :meth:`launch`): launches after it on
        the same stream draw from Philox (seed, offset) -- what a torch replay from a generator
        with that seed and offset draws. ``generator``: the entry's name (None: the device's
        default generator). Replay *k* (from 0) after saving, with no other draw from the
        generator in between, used ``(rng[i].saved_seed, rng[i].saved_offset + k *
        rng[i].increment)``."""
        rng = self.rng
        if self._rng_words is None:
            bases = self._owner._bases
            self._rng_words = {e.generator: (int(bases[e.seed.region]) + e.seed.offset,
                                             int(bases[e.offset.region]) + e.offset.offset)
                               for e in rng}
        words = self._rng_words.get(generator)
        if words is None:
            which = "the default generator" if generator is None else f"generator {generator!r}"
            have = ", ".join("the default generator" if e.generator is None else
                             repr(e.generator) for e in rng) or "none"
            raise RestoreError(f"{self._owner.path}: graph {self.name!r} does not draw from "
                               f"{which} (it draws from: {have})")
        seed, offset = _word(seed, "seed", 64), _word(offset, "offset", 63)
        s = driver.as_stream(stream)
        driver.write_u64_async(words[0], seed, s)
        driver.write_u64_async(words[1], offset, s)

    def instantiate(self) -> "RestoredGraph":
        self._owner._check_open()
        if self.exec is None:
            self._owner._instantiate(self.name)
        return self

    def launch(self, stream=None) -> None:
        self._owner._check_open()
        if self.exec is None:
            self._owner._instantiate(self.name)
        graphs.launch(self.exec, driver.as_stream(stream))

    replay = launch


def _word(value, what: str, bits: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = operator.index(value)
    if not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value} is out of range [0, 2**{bits})")
    return value


class Restored:
    """What :func:`cgsnap.load` returns; a context manager that frees everything on exit.

    Every GPU object it makes is entered in a :class:`~cgsnap.restore.ledger.Ledger` as it is
    made: a failed restore frees all of it before raising, ``close()`` frees all of it and
    then raises what failed, and a restore nobody closes is freed when it is collected."""

    def __init__(self, path: str, device: int = 0, bind: Optional[dict] = None,
                 instantiate: str = "lazy", verify_bound: bool = False, allow_jit: bool = False,
                 verify_blobs: bool = True, host_callbacks: Optional[dict] = None,
                 limits=None, require_signature=None):
        if instantiate not in ("lazy", "all"):
            raise ValueError("instantiate must be 'lazy' or 'all'")
        self.path = str(path)
        self.timings: dict = {}
        self._ledger = Ledger(self.path)
        self._finalizer = self._ledger.finalize_with(self)
        self._events: list = []
        self._cu_graphs: dict = {}
        self._graphs: dict = {}
        self._closed = False
        self._file = None
        self._stager = None
        self._host_callbacks = dict(host_callbacks or {})
        self._keepalive: list = []          # ctypes thunks the graphs' host nodes call
        t_init = time.perf_counter()
        native.prefetch()
        try:
            with _gc_paused():
                t0 = time.perf_counter()
                # One descriptor: the signature (if required) is checked over the bytes read.
                self._file = fileformat.open_file(self.path, check_types=False, limits=limits,
                                                  signature_key=require_signature)
                self.timings["read.open"] = time.perf_counter() - t0
                self._prepare(bind or {}, verify_bound, allow_jit, verify_blobs)
                self.timings["read"] = time.perf_counter() - t0
                self._setup_gpu(device)
                if instantiate == "all":
                    for name in self.graph_names:
                        self.graph(name).instantiate()
            self.timings["init"] = time.perf_counter() - t_init
        except BaseException as exc:
            try:
                self.close()
            except CgsnapError as cleanup:    # report the cause; the cleanup's failure too
                log.warning("%s: releasing a failed restore: %s", self.path, cleanup)
            if isinstance(exc, DriverError):
                raise RestoreError(f"{self.path}: restore failed, everything it allocated was "
                                   f"released: {exc}") from exc
            raise

    # ---- step 1-2: validate, plan, check (no GPU work) ----------------------------------
    def _prepare(self, bind, verify_bound, allow_jit, verify_blobs):
        f = self._file
        blob_sizes = [b.raw_length for b in f.blobs]
        t = time.perf_counter()
        self.snapshot = snap = Snapshot.from_manifest(f.manifest, blob_sizes, self.path)
        self.timings["read.validate"] = time.perf_counter() - t
        # Kernel images are zstd-compressed (several-fold smaller: tens of MB of cuBLAS cubins
        # are common); each is checksummed and decompressed within the image budgets -- after
        # validation, not alongside it: the threads' GIL hand-offs slowed validation more than
        # the overlap saved (see SnapshotFile.images).
        t = time.perf_counter()
        for im, data in zip(snap.images, f.images([im.data for im in snap.images])):
            im.data = data
        self.timings["read.images"] = time.perf_counter() - t
        t = time.perf_counter()
        self._verify_blobs = verify_blobs
        self._bound = self._check_bind(bind)
        self.timings["read.bind"] = time.perf_counter() - t
        t = time.perf_counter()
        self._late = {r.id for r in snap.regions if r.kind is RegionKind.GRAPH_ALLOC}
        offsets = param_offsets(snap.kernels)     # once per load, shared by every graph's plan
        self._plans = {g.name: GraphPlan(snap, g, self._late, offsets) for g in snap.graphs}
        self._patches = region_patches(snap)      # pointers stored in region contents
        self.timings["read.plans"] = time.perf_counter() - t
        self.graph_names = [g.name for g in snap.graphs if g.top_level]
        # Conditional bodies are built inside their node's graph, never on their own.
        self._bodies = {b for g in snap.graphs for n in g.other_nodes() if n.TYPE == "conditional"
                        for b in n.bodies}
        missing = sorted({n.callback for g in snap.graphs for n in g.other_nodes()
                          if n.TYPE == "host"}
                         - set(self._host_callbacks))
        if missing:
            raise RestoreError(f"{self.path}: the graphs call host callback(s) "
                               f"{', '.join(missing)}: pass load(..., host_callbacks="
                               "{name: python_callable})")
        self._allow_jit = allow_jit
        self._verify_bound = verify_bound

    def _check_bind(self, bind: dict) -> dict:
        snap = self.snapshot
        bind = {name: obj for name, obj, _ in flatten(bind)}
        named = {r.name: r for r in snap.regions if r.name is not None}
        problems = []
        missing = [r.name for r in snap.regions if r.policy is Policy.BOUND and r.name not in bind]
        if missing:
            problems.append("missing: " + ", ".join(sorted(missing)))
        extra = [k for k in bind if k not in named]
        if extra:
            problems.append("not in the snapshot: " + ", ".join(sorted(extra)))
        bound = {}
        for key, obj in bind.items():
            if key in named:
                try:
                    bound[named[key].id] = check_bind(named[key], obj)
                except BindError as exc:
                    problems.append(str(exc))
        if problems:
            raise BindError(f"{self.path}: cannot bind buffers: " + "; ".join(problems))
        return bound

    # ---- step 3: memory, kernels, events --------------------------------------------------
    def _setup_gpu(self, ordinal: int):
        t = time.perf_counter()
        self.device = dev = driver.init(ordinal)
        choice = compat.choose_images(self.snapshot, dev.arch, dev.name, dev.driver_version,
                                      self._allow_jit, self.path)
        snap = self.snapshot
        self._bases = np.zeros(len(snap.regions), dtype=np.uint64)
        self._arrays = {}            # ARRAY region id -> CUarray (no address: base stays 0)
        for r in snap.regions:
            if r.id in self._bound:
                self._bases[r.id] = self._bound[r.id]
            elif r.kind is RegionKind.ARRAY:
                a = r.array
                self._arrays[r.id] = self._ledger.add("array", driver.array_create(
                    a.format, a.channels, a.width, a.height, a.depth, a.flags))
            elif r.kind in (RegionKind.MODULE_GLOBAL, RegionKind.GRAPH_ALLOC) or \
                    r.parent is not None:
                continue    # placed by the library load / by the graph / inside its parent
            elif r.kind is RegionKind.HOST:
                self._bases[r.id] = self._ledger.add("host", driver.host_alloc(r.size))
            else:
                self._bases[r.id] = self._alloc(r.size, r.alignment)
        for r in snap.regions:              # views: at their offset in the parent's memory
            if r.parent is not None and r.id not in self._bound:
                self._bases[r.id] = self._bases[r.parent] + np.uint64(r.parent_offset)
        self._zero_fill()
        self.timings["alloc"] = time.perf_counter() - t
        t = time.perf_counter()
        self._load_kernels(choice)
        self.timings["kernels"] = time.perf_counter() - t
        t = time.perf_counter()
        for r in snap.regions:
            if r.kind is RegionKind.ARRAY:
                self._write_array(r)
        saved = [r for r in snap.regions if r.policy is Policy.SAVED and r.id not in self._bound
                 and r.kind not in (RegionKind.MODULE_GLOBAL,      # (written by _load_kernels)
                                    RegionKind.ARRAY)]
        total = sum(sum(e.length for e in r.extents) if r.extents is not None else r.size
                    for r in saved)
        with _progress.task(f"loading {os.path.basename(self.path)}", total):
            for r in saved:
                self._write_region(r)
        if self._verify_bound:
            self._verify_bound_hashes()
        driver.ctx_sync()
        self._close_stager()
        self.timings["copy"] = time.perf_counter() - t
        self._events = [self._ledger.add("event", graphs.event_create())
                        for _ in range(snap.events)]
        self._state = BuildState(snap, self._bases, self._func_handles, self._builder,
                                 self._node_loop, self._events, self._cu_graphs,
                                 self._host_callbacks,
                                 graphs.AddEnv(dev.context, dev.ordinal, self._keepalive),
                                 plans=self._plans, arrays=self._arrays)

    def _zero_fill(self, scratch: bool = True) -> None:
        """Memory no saved byte covers starts zeroed: scratch (not whatever the allocator
        returns: some library kernels keep self-resetting counters in their workspace, valid
        when zero) and the parts of sparse regions between their extents. The zeroing ends
        before any contents are copied (copies run on another stream)."""
        zeroed = False
        for r in self.snapshot.regions:
            if r.id in self._bound or r.kind not in (RegionKind.ALLOCATION, RegionKind.NAMED):
                continue
            if (scratch and r.policy is Policy.SCRATCH and r.parent is None) or \
                    (r.policy is Policy.SAVED and r.extents is not None):
                driver.memset_d8(int(self._bases[r.id]), 0, r.size)
                zeroed = True
        if zeroed:
            driver.ctx_sync()

    def _alloc(self, size: int, alignment: int) -> int:
        # cuMemAlloc aligns to at least 256 bytes; larger recorded alignments get padding.
        pad = alignment if alignment > 256 else 0
        ptr = self._ledger.add("device", driver.mem_alloc(size + pad))
        return (ptr + pad - 1) // pad * pad if pad else ptr

    def _write_region(self, r) -> None:
        """Region ``r``'s saved contents into its memory (parents before the views inside
        them: region order) -- its blob, or each extent at its offset -- with the pointers
        stored in them rewritten to this process's addresses."""
        base, patches = int(self._bases[r.id]), self._patches.get(r.id)
        if r.extents is None:
            self._write_blob(r.data, base, r.size, host=r.kind is RegionKind.HOST,
                             patches=patches)
            return
        for e in r.extents:
            self._write_blob(e.data, base + e.offset, e.length)
        if patches is not None:     # each copy above has ended: the words go over them
            for off, chunk in patches.chunks(self._bases):
                driver.htod(base + off, chunk, len(chunk))

    def _write_blob(self, blob: int, dst: int, size: int, host: bool = False,
                    patches=None) -> None:
        if not size:
            return
        info = self._file.blobs[blob]
        if host or size < transfer.THRESHOLD or info.compression != fileformat.Compression.NONE:
            data = self._file.blob(blob, verify=self._verify_blobs)
            if patches is not None:         # rewritten on the host copy, then one upload
                data = np.frombuffer(data, dtype=np.uint8).copy()
                patches.apply(data, self._bases)
            if host:
                driver.host_view(dst, size)[:] = data
            else:
                driver.htod(dst, data, size)
            _progress.advance(size)
            return
        # Large and stored as is: DMA straight from the file's page cache (or, where file pages
        # cannot be page-locked, read by several threads into a pinned ring), the checksum
        # computed on the way: the file is read once.
        if self._stager is None:
            self._stager = self._ledger.add("stager", transfer.Stager())
        checksum = info.checksum if self._verify_blobs else None
        base, mapped = self._file.mapping_address()
        t = time.perf_counter()
        ok = None
        if transfer.upload_path() == "mapped":
            ok = self._stager.upload_mapped(dst, base, info.offset, size, mapped, checksum)
        how = "DMA from the page-locked page cache"
        if ok is None:      # the driver would not page-lock file pages here
            ok = self._stager.upload_file(dst, self._file.fileno(), info.offset, size, checksum)
            how = "pread into pinned staging"
        log.info("blob %d: %d bytes by %s%s: %.2f GB/s", blob, size, how,
                 ", verified" if checksum else "", size / (time.perf_counter() - t) / 1e9)
        if not ok:
            raise FormatError(f"blob {blob}: checksum mismatch (the file is corrupt)",
                              path=self.path)
        if patches is not None:     # uploaded as stored: the words rewritten after, per run
            for off, chunk in patches.chunks(self._bases):
                driver.htod(dst + off, chunk, len(chunk))

    def _write_array(self, r) -> None:
        """A CUDA array's saved contents (packed slices of rows), or zeros for scratch."""
        a = r.array
        data = self._file.blob(r.data, verify=self._verify_blobs) if r.policy is Policy.SAVED \
            else np.zeros(r.size, dtype=np.uint8)
        driver.array_copy(self._arrays[r.id], driver.buffer_address(data), a.row_bytes, a.rows,
                          a.slices, to_host=False)

    def _close_stager(self) -> None:
        if self._stager is not None:
            stager, self._stager = self._stager, None
            self._ledger.forget("stager", stager)
            stager.close()

    def _verify_bound_hashes(self):
        for r in self.snapshot.regions:
            if r.id in self._bound and r.content_hash:
                host = np.empty(r.size, dtype=np.uint8)
                driver.dtoh(int(host.ctypes.data), int(self._bases[r.id]), r.size)
                if region_hash(host) != r.content_hash:
                    raise BindError(f"{self.path}: bound buffer {r.name!r} does not hold the "
                                    "contents recorded at save time (verify_bound=True)")

    def _load_kernels(self, choice: dict):
        snap = self.snapshot
        images = list({v.hash: v for v in choice.values()}.values())
        by_image: dict = {}
        for k in snap.kernels:
            by_image.setdefault(choice[k.id].hash, []).append(k)
        ctx = self.device.context

        def load(im):
            driver.set_current(ctx)            # pool threads have no current context
            data = im.data
            if im.kind == "ptx" and not bytes(data[-1:]) == b"\0":
                data = bytes(data) + b"\0"
            lib = driver.library_load(data)
            # Getting the function is what loads it into the context (lazy loading): done here,
            # in parallel too, rather than one kernel after another afterwards.
            funcs = {}
            try:
                for k in by_image.get(im.hash, ()):
                    func = driver.library_function(lib, k.name)
                    funcs[k.id] = (func, driver.func_params(func))
            except DriverError:
                funcs[None] = k.name
            return lib, funcs
        # Images load in parallel: the driver parses tens of MB of cuBLAS cubins otherwise one
        # after another. Every library that did load is recorded before any error is raised,
        # so that a failed restore unloads it.
        with ThreadPoolExecutor(min(8, max(1, len(images)))) as pool:
            futures = [pool.submit(load, im) for im in images]
        libs, funcs, first_error = {}, {}, None
        for im, fut in zip(images, futures):
            try:
                libs[im.hash], found = fut.result()
                self._ledger.add("library", libs[im.hash])
            except BaseException as exc:      # the others' libraries are still entered
                first_error = first_error or exc
                continue
            if None in found and first_error is None:
                first_error = KernelNotFoundError(f"{self.path}: kernel {found[None]} is not in "
                                                  f"its image {im.hash}")
            funcs.update(found)
        if first_error is not None:
            raise first_error
        self._funcs = []
        for k in snap.kernels:
            func, params = funcs[k.id]
            if params != tuple(k.params):
                raise RestoreError(f"{self.path}: kernel {k.name}: the reloaded kernel takes "
                                   f"parameters {params}, the snapshot recorded {k.params}")
            if k.attrs:
                driver.func_set_attrs(func, k.attrs)
            self._funcs.append(func)
        self._func_handles = np.array([int(f) for f in self._funcs], dtype=np.uint64)
        self._builder = driver.GraphBuilder()
        self._node_loop = native.node_loop()
        # Module globals live in the reloaded library; their saved contents are written there,
        # once every global's address is known (a global may hold another's address).
        globals_ = [r for r in snap.regions if r.kind is RegionKind.MODULE_GLOBAL]
        for r in globals_:
            lib = libs.get(r.image)
            found = driver.library_global(lib, r.symbol) if lib is not None else None
            if found is None:
                raise RestoreError(f"{self.path}: module global {r.symbol} of region {r.id} "
                                   "is not in the reloaded image")
            addr, size = found
            if size != r.size:
                raise RestoreError(f"{self.path}: module global {r.symbol} has {size} bytes, "
                                   f"the snapshot recorded {r.size}")
            self._bases[r.id] = addr
        for r in globals_:
            if r.policy is Policy.SAVED:
                self._write_region(r)

    # ---- step 4: graphs -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RestoreError(f"{self.path}: this restore is closed; its graphs and buffers "
                               "were freed")

    def graph(self, name: str) -> RestoredGraph:
        self._check_open()
        if name not in self._plans:
            raise KeyError(f"{self.path} has no graph {name!r} (it has: "
                           f"{', '.join(self.graph_names)})")
        if name in self._bodies:
            raise RestoreError(f"{self.path}: graph {name!r} is the body of a conditional node: "
                               "it runs only inside its node's graph")
        g = self._graphs.get(name)
        if g is None:
            g = self._graphs[name] = RestoredGraph(self, name)
        return g

    def _instantiate(self, name: str) -> None:
        t = time.perf_counter()
        with _gc_paused():
            graph = build_graph(self._state, name, self._plans, self._ledger)
        t1 = time.perf_counter()
        self._graphs[name].exec = self._ledger.add("exec", graphs.instantiate(graph))
        self.timings.setdefault("build", 0.0)
        self.timings.setdefault("instantiate", 0.0)
        self.timings["build"] += t1 - t
        self.timings["instantiate"] += time.perf_counter() - t1

    # ---- public -----------------------------------------------------------------------------
    def buffer(self, name: str) -> Buffer:
        self._check_open()
        try:
            r = self.snapshot.region_by_name(name)
        except KeyError:
            names = [r.name for r in self.snapshot.regions if r.name]
            raise KeyError(f"{self.path} has no buffer {name!r} (it has: {', '.join(names)})") \
                from None
        return Buffer(name, int(self._bases[r.id]), r.size, r.dtype, r.shape, owner=self,
                      strides=r.strides, view_offset=r.view_offset)

    @property
    def buffers(self) -> dict:
        self._check_open()
        return {r.name: self.buffer(r.name) for r in self.snapshot.regions if r.name}

    def reset(self) -> None:
        """Write the saved contents back into every saved region (the state at save time)."""
        self._check_open()
        self._zero_fill(scratch=False)      # scratch is left as the graphs left it
        for r in self.snapshot.regions:
            if r.kind is RegionKind.ARRAY:
                if r.policy is Policy.SAVED:
                    self._write_array(r)
            elif r.policy is Policy.SAVED and r.id not in self._bound and r.kind is not \
                    RegionKind.GRAPH_ALLOC:
                self._write_region(r)
        driver.ctx_sync()
        self._close_stager()

    def read_region(self, rid: int) -> np.ndarray:
        """A host copy of region ``rid`` (synchronous)."""
        self._check_open()
        r = self.snapshot.regions[rid]
        out = np.empty(r.size, dtype=np.uint8)
        if r.size:
            if r.kind is RegionKind.ARRAY:
                a = r.array
                driver.array_copy(self._arrays[rid], int(out.ctypes.data), a.row_bytes, a.rows,
                                  a.slices, to_host=True)
            elif r.kind is RegionKind.HOST:
                out[:] = driver.host_view(int(self._bases[rid]), r.size)
            else:
                driver.dtoh(int(out.ctypes.data), int(self._bases[rid]), r.size)
        return out

    def expected(self, graph: str, rid: int):
        """The contents region ``rid`` held after one launch of ``graph`` at save time, with
        the pointers stored in it as this restore rewrote them."""
        self._check_open()
        data = self._file.blob(self.snapshot.graph(graph).checks[rid])
        patches = self._patches.get(rid)
        if patches is not None:
            data = np.frombuffer(data, dtype=np.uint8).copy()
            patches.apply(data, self._bases)
        return data

    def synchronize(self) -> None:
        self._check_open()
        driver.ctx_sync()

    def close(self) -> None:
        """Free every graph, event, library and allocation this restore made (idempotent).
        Every step is attempted; a step that failed is raised (RestoreError) afterwards."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        for g in self._graphs.values():
            g.exec = None
        self._cu_graphs.clear()
        self._stager = None
        try:
            self._ledger.release()
        finally:
            if self._file is not None:
                self._file.close()

    def __enter__(self) -> "Restored":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _gc_paused():
    """The cyclic collector off for the duration, back on afterwards if it was on. A manifest
    becomes tens of thousands of small objects: in a process with a large heap (torch imported)
    each full collection they trigger walks all of it -- measured 160 ms instead of 40 for
    validating the decoder's manifest. What is made meanwhile is freed by reference counting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
