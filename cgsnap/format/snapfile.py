"""Snapshots <-> files: merging several snapshots into one file, and reading one back (no GPU).

The container itself is :mod:`cgsnap.format.fileformat`; the dict it carries is the model's manifest
(:meth:`cgsnap.format.model.Snapshot.to_manifest`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterable, Optional, Union

import numpy as np


from ..errors import CaptureError, FormatError
from . import contents as _contents
from . import fileformat
from .model import (MAX_DECISIONS_KEPT, REGION_REF_DTYPE, BlobTable, Extent, Graph, Policy,
                    Region, RegionKind, Snapshot, remap_region_refs)
from .nodes import Renumbering
from .trace import remap_trace


def _region_key(r: Region):
    """Regions that are the same memory in the capturing process merge into one."""
    if r.kind is RegionKind.NAMED:
        return ("named", r.name)
    if r.kind is RegionKind.MODULE_GLOBAL:
        return ("global", r.image, r.symbol)
    if r.origin is None:      # a region read from a file: nothing to merge it with
        return ("unique", id(r))
    return (r.kind.value, r.origin, r.size)


def merge(snaps: Iterable[Snapshot]) -> Snapshot:
    """One snapshot holding the graphs of all ``snaps``: regions that are the same memory, images
    and kernels are stored once. Graph names must be unique."""
    snaps = list(snaps)
    if len(snaps) == 1:
        return snaps[0]
    if not snaps:
        raise CaptureError("nothing to save: no snapshots given")
    archs = {s.arch for s in snaps}
    if len(archs) > 1:
        raise CaptureError(f"snapshots of different GPU archs cannot share a file: {sorted(archs)}")
    regions, region_ids = [], {}
    images, kernels, kernel_ids = {}, [], {}
    graphs, names, events, handles = [], set(), 0, 0
    freed_reports = []                     # (meta.freed_blocks_read, rmap) of each snapshot
    for snap in snaps:
        rmap, added, more_refs = {}, [], []
        for r in snap.regions:     # parents precede their children, so rmap has them
            key = _region_key(r)
            if key not in region_ids:
                region_ids[key] = len(regions)
                parent = rmap[r.parent] if r.parent is not None else None
                regions.append(dataclasses.replace(r, id=len(regions), parent=parent))
                added.append(regions[-1])
            else:
                _merge_contents(regions[region_ids[key]], r)
                if r.refs:
                    more_refs.append((regions[region_ids[key]], r.refs))
            rmap[r.id] = region_ids[key]
        for r in added:            # stored pointers may name any region of their snapshot
            r.refs = remap_region_refs(r.refs, rmap)
        freed_reports.append((snap.meta.get("freed_blocks_read"), rmap))
        for kept, refs in more_refs:   # the same memory: pointers the first did not record too
            kept.refs = union_refs(kept.refs, remap_region_refs(refs, rmap))
        for im in snap.images:
            images.setdefault(im.hash, im)
        kmap = {}
        for k in snap.kernels:
            key = (k.name, k.image)
            if key not in kernel_ids:
                kernel_ids[key] = len(kernels)
                kernels.append(dataclasses.replace(k, id=len(kernels)))
            kmap[k.id] = kernel_ids[key]
        for g in snap.graphs:
            if g.name in names:
                raise CaptureError(f"two snapshots hold a graph named {g.name!r}; give each "
                                   "snapshot(..., name=...) a different name")
            names.add(g.name)
            graphs.append(Graph(name=g.name, top_level=g.top_level, edges=list(g.edges),
                                nodes=[remap_node(n, rmap, kmap, events, handles)
                                       for n in g.nodes],
                                checks={rmap[rid]: data for rid, data in g.checks.items()},
                                rng=[e.remap(rmap) for e in g.rng],
                                trace=remap_trace(g.trace, rmap)))
        events += snap.events
        # Conditional handle ids run over the whole snapshot: one per conditional node.
        handles += sum(1 for g in snap.graphs for n in g.other_nodes()
                       if n.TYPE == "conditional")
    first = snaps[0]
    meta = {**first.meta, "name": ",".join(s.meta.get("name", "") for s in snaps)}
    ambiguous = [line for s in snaps for line in s.meta.get("ambiguous_words", ())]
    if ambiguous:      # each graph's decisions (cgsnap.capture.classify), not only the first one's
        meta["ambiguous_words"] = ambiguous[:MAX_DECISIONS_KEPT]
        meta["ambiguous_word_count"] = sum(s.meta.get("ambiguous_word_count", 0) for s in snaps)
    meta.pop("freed_blocks_read", None)    # the first graph's, in its own region ids
    freed = merge_freed(freed_reports)
    if freed is not None:
        meta["freed_blocks_read"] = freed
    return Snapshot(graphs=graphs, regions=regions, images=list(images.values()), kernels=kernels,
                    events=events, device=dict(first.device), versions=dict(first.versions),
                    meta=meta)


def merge_freed(reports) -> Optional[dict]:
    """Several snapshots' ``meta.freed_blocks_read`` (``[(report or None, rmap)]``, ``rmap``
    renumbering each one's region ids) as one: every graph's blocks once per address (graphs
    sharing a segment report it each); None when there are none."""
    freed: dict = {}                       # address -> row
    unlisted = [0, 0, 0, 0]                # count and bytes past the listed rows; not saved
    for report, rmap in reports:
        _merge_freed(report, rmap, freed, unlisted)
    if not freed:
        return None
    rows = [freed[a] for a in sorted(freed)]
    out = {"count": len(rows) + unlisted[0], "bytes": sum(r["size"] for r in rows) + unlisted[1],
           "blocks": rows[:MAX_DECISIONS_KEPT]}
    if unlisted[2]:              # summed over the graphs (a block two share counts twice)
        out["not_saved"] = {"count": unlisted[2], "bytes": unlisted[3]}
    return out


def _merge_freed(report, rmap: dict, freed: dict, unlisted: list) -> None:
    """One snapshot's ``meta.freed_blocks_read`` into the merged rows (``freed``, by address,
    region ids renumbered by ``rmap``), the count and bytes its list left out, and what it
    did not save."""
    if not isinstance(report, dict):
        return
    listed = [b for b in report.get("blocks", ()) if isinstance(b, dict)]
    for b in listed:
        freed.setdefault(b["address"], {**b, "region": rmap.get(b["region"], b["region"])})
    unlisted[0] += max(0, int(report.get("count", 0)) - len(listed))
    unlisted[1] += max(0, int(report.get("bytes", 0)) - sum(b["size"] for b in listed))
    skipped = report.get("not_saved")
    if isinstance(skipped, dict):
        unlisted[2] += int(skipped.get("count", 0))
        unlisted[3] += int(skipped.get("bytes", 0))


def _merge_contents(kept: Region, other: Region) -> None:
    """The same memory saved by two snapshots: each graph saved the blocks it reaches, so the
    merged region holds the union (and uses the union of the parts each one uses). Where both
    saved the same bytes the first snapshot's are kept (as for whole regions); a whole region
    covers every extent."""
    if kept.span is not None:
        kept.span = None if other.span is None else \
            (min(kept.span[0], other.span[0]), max(kept.span[1], other.span[1]))
    if kept.policy is not Policy.SAVED or other.policy is not Policy.SAVED:
        return
    if kept.extents is None:
        return
    if other.extents is None:
        kept.extents, kept.data, kept.content_hash = None, other.data, other.content_hash
        return
    merged = union_extents(kept.extents, other.extents)
    if len(merged) != len(kept.extents):
        kept.extents = merged
        kept.content_hash = None      # recomputed from the extents' checksums when saved


def union_refs(first: bytes, second: bytes) -> bytes:
    """Stored-pointer tables of the same memory from two snapshots: the first's rows, plus the
    second's at offsets the first has none (sorted by offset)."""
    if not second:
        return first
    a = np.frombuffer(first, dtype=REGION_REF_DTYPE)
    b = np.frombuffer(second, dtype=REGION_REF_DTYPE)
    b = b[~np.isin(b["offset"], a["offset"])]
    if not len(b):
        return first
    rows = np.concatenate([a, b])
    return rows[np.argsort(rows["offset"], kind="stable")].tobytes()


def union_extents(first: list, second: list) -> list:
    """The extents of ``first`` plus the parts of ``second`` that no extent of ``first``
    covers (their contents sliced: ``data.slice(offset, length)``), sorted."""
    out = list(first)
    covered = [(e.offset, e.offset + e.length) for e in first]
    for e in second:
        pieces = [(e.offset, e.offset + e.length)]
        for lo, hi in covered:
            pieces = [p for a, b in pieces
                      for p in ((a, min(b, lo)), (max(a, hi), b)) if p[0] < p[1]]
        for a, b in pieces:
            data = e.data if (a, b) == (e.offset, e.offset + e.length) else \
                _contents.as_contents(e.data).slice(a - e.offset, b - a)
            out.append(Extent(a, b - a, data))
    return sorted(out, key=lambda e: e.offset)


class _Shift(Renumbering):
    """Refs into trimmed regions move down by the part cut off the region's start."""

    __slots__ = ("lo",)

    def __init__(self, lo: dict):
        super().__init__()
        self.lo = lo

    def ref(self, ref):
        lo = self.lo.get(ref.region)
        return ref if lo is None else type(ref)(ref.region, ref.offset - lo)


def trim_regions(snap: Snapshot) -> Snapshot:
    """``snap`` with each allocation that knows the part the graphs use (``Region.span``, set
    from an allocator map) cut down to that part: same relative layout, less memory at
    restore (an expandable segment can be a whole pool). Refs, views, extents and pointer
    tables move with it (and the RNG words' refs); the address every ref names stays the
    same."""
    lo: dict = {}
    regions = []
    for r in snap.regions:
        span = r.span
        if span is None or r.kind is not RegionKind.ALLOCATION or r.parent is not None or \
                not (0 <= span[0] < span[1] <= r.size) or span == (0, r.size) or \
                (r.policy is Policy.SAVED and r.extents is None):
            regions.append(dataclasses.replace(r, span=None) if span is not None else r)
            continue
        a, b = span
        lo[r.id] = a
        fields = dict(size=b - a, span=None,
                      alignment=min(r.alignment, a & -a) if a else r.alignment,
                      origin=None if r.origin is None else r.origin + a)
        if r.extents is not None:
            fields["extents"] = [Extent(e.offset - a, e.length, e.data) for e in r.extents]
            fields["content_hash"] = None        # the offsets are part of it: recomputed
        regions.append(dataclasses.replace(r, **fields))
    if not lo:
        return dataclasses.replace(snap, regions=regions)
    regions = [dataclasses.replace(r, parent_offset=r.parent_offset - lo[r.parent])
               if r.parent in lo else r for r in regions]
    regions = [dataclasses.replace(r, refs=_shift_refs(r, lo)) if r.refs else r for r in regions]
    shift = _Shift(lo)
    graphs = []
    for g in snap.graphs:
        nodes = []
        for n in g.nodes:
            n = n.remap(shift)
            if n.TYPE == "kernel" and n.refs:
                table = np.frombuffer(n.refs, dtype="<u8").reshape(-1, 3).copy()
                for rid, a in lo.items():
                    table[table[:, 1] == rid, 2] -= np.uint64(a)
                n = dataclasses.replace(n, refs=table.tobytes())
            nodes.append(n)
        rng = [dataclasses.replace(e, seed=shift.ref(e.seed), offset=shift.ref(e.offset))
               for e in g.rng]
        # A trace stays as it is: trace_snapshot records it from a file this same trimming
        # wrote, so its offsets and digests are already the trimmed regions'.
        graphs.append(Graph(name=g.name, nodes=nodes, edges=list(g.edges),
                            top_level=g.top_level, checks=dict(g.checks), rng=rng,
                            trace=g.trace))
    return dataclasses.replace(snap, regions=regions, graphs=graphs)


def _shift_refs(r: Region, lo: dict) -> bytes:
    """Region ``r``'s stored-pointer rows with its own offsets and its targets' offsets moved
    down by what trimming cut off each region's start."""
    table = np.frombuffer(r.refs, dtype=REGION_REF_DTYPE).copy()
    if r.id in lo:
        table["offset"] -= np.uint64(lo[r.id])
    for rid, a in lo.items():
        table["target_offset"][table["region"] == rid] -= np.uint64(a)
    return table.tobytes()


def remap_node(n, rmap: dict, kmap: Optional[dict] = None, event_offset: int = 0,
               handle_offset: int = 0):
    """``n`` with its regions, kernel, events and conditional handles renumbered (``rmap`` /
    ``kmap``: old -> new id; no ``kmap``: kernels keep their ids)."""
    return n.remap(Renumbering(rmap, kmap, event_offset, handle_offset=handle_offset))


# A pruned image is kept only when it is at most this fraction of the whole one: a small gain
# is not worth an image that differs from the library's.
PRUNE_WORTH = 0.9

# Whether a cut image behaves like the whole one is checked by loading both on a GPU, which this
# layer never touches: the layer that saves from a live process installs the checker
# (cgsnap.capture.saving). ``checker()`` returns the check -- ``check(original, pruned, kernels,
# variables)`` gives None when the cut image is good, else why not -- or a string saying why no
# check can run on this machine (no GPU), and then images stay whole.
_image_checker = None


def install_image_checker(checker) -> None:
    global _image_checker
    _image_checker = checker


def prune_images(snap: Snapshot, check=None) -> Snapshot:
    """``snap`` with each cubin cut down to the kernels its kernels name
    (:mod:`cgsnap.binary.cubin_prune`). ``check(original, pruned, kernels, variables)`` returns None
    when the pruned image is good, else why not; by default the installed checker's (the
    driver loads both images and compares every kernel the cut image holds). Where no check
    can run (no checker, no GPU), images stay whole and ``meta["images_not_pruned"]`` says why.
    A cut image that would have the hash of another image of the file is not used: two
    different images never become one (their module variables are separate memory)."""
    from ..binary import cubin_prune, elf
    from ..errors import CgsnapError
    from .hashing import content_hash
    if check is None:
        if not any(im.kind == "cubin" for im in snap.images):
            return snap
        check = _image_checker() if _image_checker is not None else \
            "no GPU check of cut images is installed"
        if isinstance(check, str):
            return dataclasses.replace(snap, meta={**snap.meta, "images_not_pruned": check})
    used: dict = {}
    for k in snap.kernels:
        used.setdefault(k.image, set()).add(k.name)
    cut, refused = {}, []       # original hash -> (new hash, pruned KernelImage, meta entry)
    for im in snap.images:
        if im.kind != "cubin" or im.hash not in used or im.data is None:
            continue
        data = bytes(im.data)
        try:
            result = cubin_prune.prune_cubin(data, used[im.hash])
        except CgsnapError as exc:      # the driver loaded it, so keep it as it is
            refused.append({"image": im.hash, "why": str(exc)})
            continue
        problem = result.reason
        if result.data is not None and len(result.data) > PRUNE_WORTH * len(data):
            problem = cubin_prune.TOO_LITTLE
        if not problem:
            # Every kernel the cut image holds (also those kept because another refers to
            # them); the variables of the whole image, so that a lost one is noticed.
            info = elf.cubin_info(result.data)
            problem = check(data, result.data, sorted(info.kernels),
                            [g.name for g in elf.cubin_info(data).globals])
        if problem:
            if problem not in cubin_prune.NOTHING_TO_CUT:
                refused.append({"image": im.hash, "why": problem})
            continue
        new_hash = content_hash(result.data)
        cut[im.hash] = (new_hash, dataclasses.replace(
            im, hash=new_hash, data=result.data, names=tuple(sorted(info.kernels)),
            source=f"{im.source} (pruned: {result.kernels_after} of {result.kernels_before} "
                   "kernels)"),
            {"image": new_hash, "from": im.hash, "bytes": [len(data), len(result.data)],
             "kernels": [result.kernels_before, result.kernels_after]})
    # Hash collisions (two copies of a library that differ only in kernels nobody launches,
    # or an image that is already another's cut): those images stay whole, until none is left.
    while True:
        final = [cut[im.hash][0] if im.hash in cut else im.hash for im in snap.images]
        clash = {h for h in final if final.count(h) > 1}
        undo = [old for old, (new, _, _) in cut.items() if new in clash]
        if not undo:
            break
        for old in undo:
            refused.append({"image": old, "why": "its cut would be the same bytes as another "
                                                 "image of the file"})
            del cut[old]
    if not cut and not refused:
        return snap
    images = [cut[im.hash][1] if im.hash in cut else im for im in snap.images]
    renamed = {old: new for old, (new, _, _) in cut.items()}
    kernels = [dataclasses.replace(k, image=renamed[k.image]) if k.image in renamed else k
               for k in snap.kernels]
    regions = [dataclasses.replace(r, image=renamed[r.image])
               if r.kind is RegionKind.MODULE_GLOBAL and r.image in renamed else r
               for r in snap.regions]
    meta = dict(snap.meta)
    if cut:
        meta["pruned_images"] = [entry for _, _, entry in cut.values()]
    if refused:
        meta["unpruned_images"] = refused
    return dataclasses.replace(snap, images=images, kernels=kernels, regions=regions, meta=meta)


def save(path, snaps: Union[Snapshot, Iterable[Snapshot]], *, compress="auto",
         prune: bool = True) -> None:
    """Write one or several snapshots to ``path`` atomically.

    Region contents and checks with identical bytes are stored once. ``compress``: ``"auto"``
    zstd-compresses a region blob when a sample of it shrinks below
    :data:`~cgsnap.format.contents.AUTO_RATIO` (zeros, repeated values and small integers do;
    fp16 / bf16 / fp32 weights do not), ``True`` compresses every region blob, ``False`` none
    (kernel images are always compressed: they shrink several-fold). Contents kept in device
    memory stream device -> pinned staging -> file. ``prune`` cuts each cubin down to the
    kernels the graphs launch, checked on the GPU first (:func:`prune_images`); ``prune=False``
    (or ``CGSNAP_PRUNE=0`` in the environment, for comparisons) keeps library images whole."""
    _contents.check_compress(compress)
    snap = trim_regions(merge([snaps] if isinstance(snaps, Snapshot) else list(snaps)))
    if prune and os.environ.get("CGSNAP_PRUNE", "1") != "0":
        snap = prune_images(snap)
    table = BlobTable(snap)
    _fill_extent_hashes(snap, table)
    manifest, blobs = snap.to_manifest(table)
    # What is written must read back: the reader's own validation, before the file exists.
    Snapshot.from_manifest(manifest, [_length(b) for b in blobs], str(path))
    write_blobs(str(path), manifest, table, compress)


def _length(payload) -> int:
    if isinstance(payload, _contents.Contents):
        return payload.nbytes
    return memoryview(payload).nbytes


def _fill_extent_hashes(snap: Snapshot, table: BlobTable) -> None:
    """``content_hash`` of regions saved as extents (:func:`hashing.extents_hash`), where the
    snapshot did not set it (a merge of two snapshots' extents)."""
    from .hashing import extents_hash
    for r in snap.regions:
        if r.policy is Policy.SAVED and r.extents is not None and r.content_hash is None:
            items = [(e.offset, e.length, table._contents(e.data)) for e in r.extents]
            _contents.scan_all([c for _, _, c in items if c is not None])
            if all(c is not None for _, _, c in items):
                r.content_hash = extents_hash((o, n, c.digest) for o, n, c in items)


def write_blobs(path: str, manifest: dict, table: BlobTable, compress) -> None:
    """Write the file: images compressed, region contents as ``compress`` says, contents of
    each reader streamed through that reader's pipeline in file order, each streamed blob
    checked against the checksum its scan gave (memory that changed between snapshot and save
    fails the save, and leaves no file)."""
    sources, streamed = [], {}
    for data, c in zip(table.items, table.contents):
        if c is None:                     # a kernel image (or a blob index of a read file)
            if isinstance(data, int):
                raise FormatError("a region's contents are a blob of another file: read the "
                                  "snapshot with its file open, or load it", path=path)
            sources.append(fileformat.BlobSource(data, compress=True))
            continue
        squeeze = _contents.worth_compressing(compress, c.ratio)
        level = _contents.REGION_LEVEL
        if isinstance(c, _contents.HostContents):
            sources.append(fileformat.BlobSource(c.view, compress=squeeze, level=level))
            continue
        group = streamed.setdefault(id(c.reader), (c.reader, []))[1]
        group.append(c)
        sources.append(fileformat.BlobSource(chunks=_Streamed(streamed, c), raw_length=c.nbytes,
                                             compress=squeeze, level=level, digest=c.digest))
    with contextlib.ExitStack() as stack:
        for key, (reader, items) in list(streamed.items()):
            streamed[key] = (reader, iter(stack.enter_context(reader.stream(items))))
        fileformat.write_file(path, manifest, sources)


class _Streamed:
    """The chunks of one streamed blob: the next item of its reader's stream (the writer takes
    blobs in order, and each reader streams its items in that same order)."""

    def __init__(self, streams: dict, contents):
        self._streams, self._contents = streams, contents

    def __iter__(self):
        _, stream = self._streams[id(self._contents.reader)]
        item, chunks = next(stream)
        if item is not self._contents:
            raise RuntimeError("a contents stream is out of order")
        return iter(chunks)


def read(path, *, load_images: bool = True, limits=None, signature_key=None) -> tuple:
    """``(snapshot, file)``: the validated model and the open :class:`fileformat.SnapshotFile`
    (regions' ``data`` are blob indices into it). Close the file when done. ``load_images``:
    decompress the kernel images into the model (within the ``image_bytes`` / ``image_total``
    budgets of ``limits``); otherwise images' ``data`` are blob indices too.
    ``signature_key``: see :func:`fileformat.open_file`."""
    f = fileformat.open_file(str(path), check_types=False, limits=limits,
                             signature_key=signature_key)
    try:
        snap = Snapshot.from_manifest(f.manifest, [b.raw_length for b in f.blobs], str(path),
                                      blob_getter=f.image if load_images else None)
    except BaseException:
        f.close()
        raise
    return snap, f
