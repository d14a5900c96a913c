"""Human and machine views of a snapshot: ``info`` (text / JSON), ``show`` (boxes), ``dot``.

Pure functions of the model (and the file's blob table for byte counts); no GPU.
"""
from __future__ import annotations

import json
import math
import struct

from ..binary.demangle import demangle, printable, short
from ..capture.classify import plausible_address
from ..format.model import Policy, Ref, Snapshot
from ..kernels.identity import EXACT_SOURCE_PREFIX

INFO_SCHEMA = 2


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
        if g.rng:      # random numbers: what each launch reads (see RestoredGraph.set_rng)
            graphs[-1]["rng"] = [{"generator": e.generator, "device": e.device,
                                  "increment": e.increment, "seed_word": [e.seed.region, e.seed.offset],
                                  "offset_word": [e.offset.region, e.offset.offset],
                                  "saved_state": [e.saved_seed, e.saved_offset]} for e in g.rng]
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
                    "kernels": len(im.names), "source": im.source,
                    "exact": im.source.startswith(EXACT_SOURCE_PREFIX)} for im in snap.images],
        "regions": [{"id": r.id, "kind": r.kind.value, "name": r.name, "size": r.size,
                     "policy": r.policy.value, "dtype": r.dtype,
                     "shape": list(r.shape) if r.shape is not None else None,
                     "strides": list(r.strides) if r.strides is not None else None,
                     "view_offset": r.view_offset, "symbol": r.symbol,
                     "memory_refs": len(r.refs) // 24, "saved_bytes": r.saved_bytes(),
                     "extents": None if r.extents is None else len(r.extents)}
                    for r in snap.regions],
        "memory_refs": {"words": sum(len(r.refs) // 24 for r in snap.regions),
                        "regions": sum(1 for r in snap.regions if r.refs)},
        "events": snap.events,
        "bytes": {"raw": raw, "stored": stored,
                  "saved_regions": sum(r.saved_bytes() for r in snap.regions),
                  "bound_regions": sum(r.size for r in snap.regions if r.policy is Policy.BOUND)},
    }


def json_text(d) -> str:
    """Strict JSON of a document built from a file (:func:`json_safe`), indented, sorted."""
    return json.dumps(json_safe(d), indent=2, sort_keys=True, allow_nan=False) + "\n"


def json_safe(obj):
    """``obj`` with what JSON cannot hold made into strings: NaN and infinities (a file's
    metadata may hold them; JSON has no such numbers) become ``"NaN"``, ``"Infinity"``,
    ``"-Infinity"``; bytes become their hex."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    return obj


def _meta_lines(meta: dict) -> list:
    """Summary lines of what cgsnap itself records in ``meta`` (a file's free-form map: any
    of it may be malformed, which is then said instead of failing)."""
    out = []
    for key, line in (("ambiguous_words", _ambiguous_line), ("pruned_images", _pruned_line),
                      ("unpruned_images", _unpruned_line)):
        if meta.get(key):
            try:
                out.append(line(meta))
            except (TypeError, ValueError, KeyError, IndexError, AttributeError):
                out.append(f"meta      {key} is not in the form cgsnap writes (info --json shows it)")
    if meta.get("images_not_pruned"):
        out.append(f"images    kept whole: {meta['images_not_pruned']}")
    return out


def _ambiguous_line(meta: dict) -> str:
    # Words that could be an int beside 4 stale bytes (cgsnap.capture.classify): what was decided.
    amb = meta["ambiguous_words"]
    count = meta.get("ambiguous_word_count", len(amb))
    kept = sum(1 for line in amb if str(line).endswith(": pointer"))
    return (f"ambiguous {count} argument words decided by evidence "
            f"({kept} of the {len(amb)} listed kept as pointers; info --json lists them)")


def _pruned_line(meta: dict) -> str:
    pruned = meta["pruned_images"]
    before = sum(int(p["bytes"][0]) for p in pruned)
    after = sum(int(p["bytes"][1]) for p in pruned)
    return (f"images    {len(pruned)} cut down to the kernels used: {_size(before)} -> "
            f"{_size(after)} (cgsnap.binary.cubin_prune)")


def _unpruned_line(meta: dict) -> str:
    whole = meta["unpruned_images"]
    return f"images    {len(whole)} kept whole, e.g. {str(whole[0].get('why', ''))[:80]}"


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
    out += _meta_lines(d["meta"])
    exact = {im["hash"] for im in d["images"] if im.get("exact")}
    if exact:
        # The recorder tied these kernels to the load they came from (cgsnap.kernels.identity).
        tied = sum(1 for k in d["kernels"] if k["image"] in exact)
        out.append(f"identity  {tied} of {len(d['kernels'])} kernels tied by the recorder to the "
                   "image they were loaded from; the others found by name")
    mem = d.get("memory_refs") or {}
    if mem.get("words"):
        out.append(f"pointers  {mem['words']} words stored in {mem['regions']} saved region(s) "
                   "point into regions: rewritten at restore (show lists them)")
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
        for e in g.get("rng", ()):
            which = f"generator {e['generator']!r}" if e["generator"] else "default generator"
            out.append(f"    random numbers: {which} of cuda:{e['device']}, offset +{e['increment']} "
                       f"per replay; seed and offset words in regions {e['seed_word'][0]} and "
                       f"{e['offset_word'][0]}")
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
        if r.get("strides") is not None:
            extra += f" strides {tuple(r['strides'])}" + (f" offset {r['view_offset']}"
                                                        if r["view_offset"] else "")
        if r.get("memory_refs"):
            extra += f"  ({r['memory_refs']} stored pointers)"
        out.append(f"  {r['id']:>4}  {r['kind']:<13} {r['policy']:<8} {_size(r['size']):>12}  "
                   f"{label}{extra}")
    if len(globals_) > 8:
        out.append(f"  {'':>4}  {'module_global':<13} {'saved':<8} "
                   f"{_size(sum(r['size'] for r in globals_)):>12}  {len(globals_)} __device__ / "
                   "__constant__ variables of the kernels' modules (info --json lists them)")
    if d["events"]:
        out += ["", f"events    {d['events']}"]
    return "".join(printable(line) + "\n" for line in out)


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


SHOW_MEMORY_REFS = 16      # stored pointers listed per region by ``show``


def memory_ref_lines(snap: Snapshot, limit: int = SHOW_MEMORY_REFS) -> list:
    """The pointers stored in saved regions, per region: what ``show`` lists after the graphs."""
    out = []
    for r in snap.regions:
        if not r.refs:
            continue
        table = r.pointer_table()
        out.append(f"{_region_label(snap, r.id)}: {len(table)} stored pointer(s)")
        for off, target, toff in table[:limit].tolist():
            out.append(f"  +{off:#x} → {_ref_text(snap, Ref(target, toff))}")
        if len(table) > limit:
            out.append(f"  … {len(table) - limit} more")
    return out


MAX_NESTING = 64           # conditional bodies drawn inside one another at most this deep


def _bodies(snap: Snapshot) -> dict:
    """Body graph name -> (conditional node, body label) for every conditional body."""
    out = {}
    for g in snap.graphs:
        for n in g.other_nodes():
            if n.TYPE == "conditional":
                for label, body in zip(n.body_labels(), n.bodies):
                    out[body] = (n, label)
    return out


def _show_graph(snap: Snapshot, g, width: int, by_name: dict, depth: int) -> list:
    """A graph's boxes; each conditional node's bodies drawn nested (indented) under it."""
    out = []
    preds: dict = {}
    for e in g.edges:
        preds.setdefault(e.dst, []).append(e.src)
    for n in g.topological_order():
        title = f" node {n.id} · {n.TYPE} "
        out.append("┌─" + title + "─" * max(0, width - len(title) - 3) + "┐")
        body = node_lines(snap, n)
        if preds.get(n.id):
            body.append("after " + ", ".join(f"node {p}" for p in sorted(preds[n.id])))
        for line in body:
            line = printable(line)
            line = line if len(line) <= width - 4 else line[:width - 5] + "…"
            out.append("│ " + line.ljust(width - 4) + " │")
        out.append("└" + "─" * (width - 2) + "┘")
        if n.TYPE == "conditional" and depth < MAX_NESTING:
            for label, name in zip(n.body_labels(), n.bodies):
                sub = by_name.get(name)
                if sub is None:
                    continue
                count = sub.node_count()
                out.append(printable(f"  ╰ {label}: graph {name!r}: {count} nodes, "
                                     f"{len(sub.edges)} edges" + ("" if count else " (empty)")))
                out.extend("    " + line for line in
                           _show_graph(snap, sub, max(width - 4, 24), by_name, depth + 1))
    return out


def show_text(snap: Snapshot, graph_name=None, width: int = 100) -> str:
    out = []
    bodies = _bodies(snap)
    by_name = {g.name: g for g in snap.graphs}
    for g in snap.graphs:
        if graph_name is not None and g.name != graph_name:
            continue
        if graph_name is None and g.name in bodies:
            continue            # drawn under its conditional node
        out.append(printable(f"graph {g.name!r}: {len(g.nodes)} nodes, {len(g.edges)} edges"))
        out.extend(_show_graph(snap, g, width, by_name, 0))
        out.append("")
    refs = memory_ref_lines(snap)
    if refs:
        out.append("pointers stored in region contents (rewritten at restore)")
        out.extend(printable(line) for line in refs)
        out.append("")
    return "\n".join(out)


def dot_text(snap: Snapshot) -> str:
    out = ["digraph cgsnap {", '  node [shape=box, fontname="monospace", fontsize=10];']
    bodies = _bodies(snap)
    index = {g.name: gi for gi, g in enumerate(snap.graphs)}
    by_name = {g.name: g for g in snap.graphs}
    links = []

    def cluster(gi: int, g, indent: str, depth: int) -> None:
        out.append(f"{indent}subgraph cluster_{gi} {{")
        label = g.name if g.name not in bodies else f"{bodies[g.name][1]}: {g.name}"
        out.append(f"{indent}  label={json.dumps(label)};")
        if g.name in bodies:
            out.append(f"{indent}  style=dashed;")
            if not g.node_count():
                out.append(f'{indent}  g{gi}empty [label="(empty body)", shape=plaintext];')
        for n in g.nodes:
            label = "\\n".join([f"{n.id}: {n.TYPE}"] + [
                printable(line).replace("\\", "\\\\").replace('"', "'")
                for line in node_lines(snap, n)[:2]])
            out.append(f'{indent}  g{gi}n{n.id} [label="{label}"];')
        for e in g.edges:
            out.append(f"{indent}  g{gi}n{e.src} -> g{gi}n{e.dst};")
        for n in g.other_nodes():
            if n.TYPE != "conditional" or depth >= MAX_NESTING:
                continue
            for lab, name in zip(n.body_labels(), n.bodies):
                bi, sub = index.get(name), by_name.get(name)
                if sub is None:
                    continue
                cluster(bi, sub, indent + "  ", depth + 1)
                has_pred = {e.dst for e in sub.edges}
                roots = [m.id for m in sub.nodes if m.id not in has_pred] or ["empty"]
                for r in roots:
                    target = f"g{bi}n{r}" if r != "empty" else f"g{bi}empty"
                    links.append(f'  g{gi}n{n.id} -> {target} [style=dashed, '
                                 f'label={json.dumps(lab)}];')
        out.append(f"{indent}}}")
    for gi, g in enumerate(snap.graphs):
        if g.name not in bodies:
            cluster(gi, g, "  ", 0)
    out.extend(links)
    out.append("}")
    return "\n".join(out) + "\n"
