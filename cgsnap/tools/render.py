"""Human and machine views of a snapshot: ``info`` (text / JSON), ``show`` (boxes), ``dot``.

Pure functions of the model (and the file's blob table for byte counts); no GPU.
"""
from __future__ import annotations

import json
import struct

from ..binary.demangle import demangle, short
from ..capture.classify import plausible_address, weakly_reached_regions
from ..format.model import Policy, Snapshot

INFO_SCHEMA = 1


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def arg_word_stats(snap: Snapshot, graph) -> dict:
    """Refs, literal 8-byte words, and literal words that look like addresses (host pointers,
    or device pointers into memory the snapshot does not know) of one graph's kernel arguments."""
    refs = literals = suspicious = 0
    for n in graph.nodes:
        if n.TYPE != "kernel":
            continue
        params = snap.kernels[n.kernel].params
        for (off, _), a in zip(params, n.arguments(params)):
            ref_offsets = {o for o, _ in a.refs}
            refs += len(ref_offsets)
            for o in range((-off) % 8, len(a.data) - 7, 8):
                if o in ref_offsets:
                    continue
                literals += 1
                if plausible_address(struct.unpack_from("<Q", a.data, o)[0]):
                    suspicious += 1
    return {"refs": refs, "literal_words": literals, "address_like_literals": suspicious}


def info_dict(snap: Snapshot, blobs=None, version=None, path: str = "") -> dict:
    """The ``info --json`` document (schema ``INFO_SCHEMA``)."""
    raw = sum(b.raw_length for b in blobs) if blobs else None
    stored = sum(b.stored_length for b in blobs) if blobs else None
    graphs = []
    for g in snap.graphs:
        graphs.append({"name": g.name, "top_level": g.top_level, "nodes": len(g.nodes),
                       "edges": len(g.edges), "node_types": g.counts(),
                       "checked_buffers": sorted(snap.regions[r].name or str(r) for r in g.checks),
                       **arg_word_stats(snap, g)})
    return {
        "schema": INFO_SCHEMA,
        "file": path,
        "format_version": list(version) if version else None,
        "device": snap.device,
        "versions": snap.versions,
        "meta": snap.meta,
        "graphs": graphs,
        "kernels": [{"id": k.id, "name": k.name, "demangled": demangle(k.name), "image": k.image,
                     "params": len(k.params), "param_bytes": sum(s for _, s in k.params),
                     "ptx": bool(k.ptx_image)} for k in snap.kernels],
        "images": [{"hash": im.hash, "kind": im.kind, "arch": f"sm_{im.arch}",
                    "kernels": len(im.names), "source": im.source} for im in snap.images],
        "regions": [{"id": r.id, "kind": r.kind.value, "name": r.name, "size": r.size,
                     "policy": r.policy.value, "dtype": r.dtype,
                     "shape": list(r.shape) if r.shape is not None else None,
                     "symbol": r.symbol, "saved_bytes": r.saved_bytes(),
                     "extents": None if r.extents is None else len(r.extents)}
                    for r in snap.regions],
        "weakly_reached_regions": [{"id": rid, "size": size, "words": count}
                                   for rid, size, count in weakly_reached_regions(snap)],
        "events": snap.events,
        "bytes": {"raw": raw, "stored": stored,
                  "saved_regions": sum(r.saved_bytes() for r in snap.regions),
                  "bound_regions": sum(r.size for r in snap.regions if r.policy is Policy.BOUND)},
    }


def info_text(d: dict) -> str:
    dev = d["device"]
    out = [f"file      {d['file']}" + (f"  (format {d['format_version'][0]}.{d['format_version'][1]})"
                                       if d["format_version"] else "")]
    out.append(f"device    {dev.get('name', '?')}  sm_{dev.get('arch', '?')}  driver "
               f"{_driver(dev.get('driver'))}")
    if d["versions"]:
        out.append("versions  " + ", ".join(f"{k} {v}" for k, v in sorted(d["versions"].items())))
    if d["meta"].get("created"):
        out.append(f"created   {d['meta']['created']}" + (f" on {d['meta']['host']}"
                                                         if d["meta"].get("host") else ""))
    amb = d["meta"].get("ambiguous_words")
    if amb:
        # Words that could be an int beside 4 stale bytes (cgsnap.capture.classify): what was decided.
        count = d["meta"].get("ambiguous_word_count", len(amb))
        kept = sum(1 for line in amb if str(line).endswith(": pointer"))
        out.append(f"ambiguous {count} argument words decided by evidence "
                   f"({kept} of the {len(amb)} listed kept as pointers; info --json lists them)")
    pruned = d["meta"].get("pruned_images")
    if pruned:
        before = sum(int(p["bytes"][0]) for p in pruned)
        after = sum(int(p["bytes"][1]) for p in pruned)
        out.append(f"images    {len(pruned)} cut down to the kernels used: {_size(before)} -> "
                   f"{_size(after)} (cgsnap.binary.cubin_prune)")
    whole = d["meta"].get("unpruned_images")
    if whole:
        out.append(f"images    {len(whole)} kept whole, e.g. {str(whole[0].get('why', ''))[:80]}")
    if d["meta"].get("images_not_pruned"):
        out.append(f"images    kept whole: {d['meta']['images_not_pruned']}")
    b = d["bytes"]
    if b["raw"] is not None:
        out.append(f"bytes     {_size(b['raw'])} raw, {_size(b['stored'])} stored "
                   f"({_size(b['saved_regions'])} of saved regions, {_size(b['bound_regions'])} bound)")
    sparse = [r for r in d["regions"] if r.get("extents") is not None]
    if sparse:
        out.append(f"sparse    {len(sparse)} allocator segment(s) saved as "
                   f"{sum(r['extents'] for r in sparse)} extents: "
                   f"{_size(sum(r['saved_bytes'] for r in sparse))} of "
                   f"{_size(sum(r['size'] for r in sparse))}")
    out.append("")
    out.append(f"graphs ({len(d['graphs'])})")
    for g in d["graphs"]:
        types = ", ".join(f"{t} {c}" for t, c in sorted(g["node_types"].items()))
        role = "" if g["top_level"] else "  [child]"
        out.append(f"  {g['name']}{role}: {g['nodes']} nodes ({types}), {g['edges']} edges; "
                   f"{g['refs']} refs, {g['literal_words']} literal words "
                   f"({g['address_like_literals']} address-like)")
        if g["checked_buffers"]:
            out.append(f"    replay --check compares: {', '.join(g['checked_buffers'])}")
    out.append("")
    out.append(f"kernels ({len(d['kernels'])})")
    images = {im["hash"]: im for im in d["images"]}
    for k in d["kernels"]:
        im = images.get(k["image"], {})
        out.append(f"  [{k['id']}] {short(k['name'], 110)}")
        out.append(f"       {k['params']} params / {k['param_bytes']} bytes; image "
                   f"{k['image'][:12]} ({im.get('kind', '?')} {im.get('arch', '?')}, "
                   f"{im.get('source', '?')})" + ("; +PTX" if k["ptx"] else ""))
    out.append("")
    out.append(f"regions ({len(d['regions'])})")
    out.append(f"  {'id':>4}  {'kind':<13} {'policy':<8} {'size':>12}  name")
    globals_ = [r for r in d["regions"] if r["kind"] == "module_global"]
    for r in d["regions"]:
        if r["kind"] == "module_global" and len(globals_) > 8:
            continue      # summarised below: libraries' modules carry dozens of tiny ones
        label = r["name"] or r["symbol"] or ""
        extra = ""
        if r["dtype"]:
            extra = f"  {r['dtype']}{r['shape'] if r['shape'] is not None else ''}"
        out.append(f"  {r['id']:>4}  {r['kind']:<13} {r['policy']:<8} {_size(r['size']):>12}  "
                   f"{label}{extra}")
    if len(globals_) > 8:
        out.append(f"  {'':>4}  {'module_global':<13} {'saved':<8} "
                   f"{_size(sum(r['size'] for r in globals_)):>12}  {len(globals_)} __device__ / "
                   "__constant__ variables of the kernels' modules (info --json lists them)")
    for w in d.get("weakly_reached_regions", ()):
        out.append(f"  suspect: region {w['id']} ({_size(w['size'])} saved) is reached only by "
                   f"{w['words']} word(s) inside struct arguments -- a stale pointer may have "
                   "dragged it in (docs/RELIABILITY.md, Known problems)")
    if d["events"]:
        out.append(f"\nevents    {d['events']}")
    return "\n".join(out) + "\n"


def _driver(v) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if isinstance(v, int) and v else "?"


def _region_label(snap: Snapshot, rid: int) -> str:
    r = snap.regions[rid]
    label = r.name or r.symbol
    return f'region {rid} "{label}"' if label else f"region {rid} ({r.kind.value})"


def _ref_text(snap, ref) -> str:
    return f"{_region_label(snap, ref.region)} + {ref.offset:#x}"


class _Describer:
    """What node specs (:meth:`cgsnap.format.nodes.KernelNode.describe`, ...) use to name
    things in their lines."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def ref(self, ref) -> str:
        return _ref_text(self.snap, ref)

    def region(self, rid: int) -> str:
        return _region_label(self.snap, rid)

    def kernel_name(self, name: str) -> str:
        return short(name, 96)

    @staticmethod
    def size(n: int) -> str:
        return _size(n)


def node_lines(snap: Snapshot, n) -> list:
    """The lines inside a node's box (each node type's spec describes itself)."""
    return n.describe(_Describer(snap))


def show_text(snap: Snapshot, graph_name=None, width: int = 100) -> str:
    out = []
    for g in snap.graphs:
        if graph_name is not None and g.name != graph_name:
            continue
        preds: dict = {}
        for e in g.edges:
            preds.setdefault(e.dst, []).append(e.src)
        out.append(f"graph {g.name!r}: {len(g.nodes)} nodes, {len(g.edges)} edges")
        for n in g.topological_order():
            title = f" node {n.id} · {n.TYPE} "
            out.append("┌─" + title + "─" * max(0, width - len(title) - 3) + "┐")
            body = node_lines(snap, n)
            if preds.get(n.id):
                body.append("after " + ", ".join(f"node {p}" for p in sorted(preds[n.id])))
            for line in body:
                line = line if len(line) <= width - 4 else line[:width - 5] + "…"
                out.append("│ " + line.ljust(width - 4) + " │")
            out.append("└" + "─" * (width - 2) + "┘")
        out.append("")
    return "\n".join(out)


def dot_text(snap: Snapshot) -> str:
    out = ["digraph cgsnap {", '  node [shape=box, fontname="monospace", fontsize=10];']
    for gi, g in enumerate(snap.graphs):
        out.append(f"  subgraph cluster_{gi} {{")
        out.append(f"    label={json.dumps(g.name)};")
        for n in g.nodes:
            label = "\\n".join([f"{n.id}: {n.TYPE}"] + [line.replace('"', "'")
                                                       for line in node_lines(snap, n)[:2]])
            out.append(f'    g{gi}n{n.id} [label="{label}"];')
        for e in g.edges:
            out.append(f"    g{gi}n{e.src} -> g{gi}n{e.dst};")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
