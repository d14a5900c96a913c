"""The ``cgsnap`` command line. Exit codes: 0 ok, 1 invalid input or failed check, 2 usage."""
from __future__ import annotations

import argparse
import os
import sys

from ..binary.demangle import printable
from ..errors import CgsnapError
from ..limits import Limits, parse_assignment
from . import UsageError

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _limits(args) -> Limits:
    return Limits(**dict(args.limit or ()))


def _open(args, *, key=None):
    """The validated model (kernel images left in the file: no command here needs them) and
    the open file, read through one descriptor (the one a ``--key`` was checked over)."""
    from ..format.snapfile import read
    return read(args.file, load_images=False, limits=_limits(args), signature_key=key)


def _write(text: str) -> None:
    sys.stdout.write(text)


def cmd_info(args) -> int:
    from .render import info_dict, info_text, json_text
    snap, f = _open(args)
    with f:
        d = info_dict(snap, f.blobs, f.version, args.file)
    _write(json_text(d) if args.json else info_text(d))
    return EXIT_OK


def _no_such_graph(args, snap) -> int:
    print(printable(f"cgsnap: {args.file}: no graph named {args.graph!r} (graphs: "
                    f"{', '.join(g.name for g in snap.graphs)})"), file=sys.stderr)
    return EXIT_USAGE


def cmd_show(args) -> int:
    from .render import show_text
    snap, f = _open(args)
    f.close()
    if args.graph is not None and args.graph not in {g.name for g in snap.graphs}:
        return _no_such_graph(args, snap)
    _write(show_text(snap, args.graph))
    return EXIT_OK


def cmd_dot(args) -> int:
    from .render import dot_text
    snap, f = _open(args)
    f.close()
    _write(dot_text(snap))
    return EXIT_OK


def _read_key(path: str) -> bytes:
    from ..format.signing import read_key
    return read_key(path)


def cmd_sign(args) -> int:
    from ..format.signing import sign
    print(printable(f"wrote {sign(args.file, _read_key(args.key))}"))
    return EXIT_OK


def cmd_verify(args) -> int:
    from ..format.model import Policy
    snap, f = _open(args, key=_read_key(args.key) if args.key else None)
    with f:
        if f.signature is not None:
            print(printable(f"{args.file}: signature OK ({args.file}.sig, {f.signature.scheme}, "
                            f"signed at {f.signature.signed_at})"))
        # The images must fit the budgets a load holds them to; decoded contents are checked
        # against the hashes the manifest records.
        sizes = [f.blobs[im.data].raw_length for im in snap.images]
        for im, size in zip(snap.images, sizes):
            f.limits.check("image_bytes", size, f"kernel image {im.hash}", args.file)
        f.limits.check("image_total", sum(sizes), "the kernel images", args.file)
        content = {im.data: im.hash for im in snap.images}
        content.update({r.data: r.content_hash for r in snap.regions       # whole regions
                        if r.policy is Policy.SAVED and r.content_hash and r.extents is None})
        f.verify(content)
        nblobs = len(f.blobs)
    print(printable(f"{args.file}: OK ({len(snap.graphs)} graph(s), "
                    f"{sum(len(g.nodes) for g in snap.graphs)} nodes, {len(snap.kernels)} kernels, "
                    f"{len(snap.regions)} regions, {nblobs} blobs verified)"))
    return EXIT_OK


def cmd_kernels(args) -> int:
    from ..binary.binaries import format_listing, list_binary, parse_arch
    from ..binary.demangle import demangle
    from .render import json_text
    arch = None
    if args.arch:
        try:
            arch = parse_arch(args.arch)
        except CgsnapError as exc:
            print(printable(f"cgsnap: --arch: {exc}"), file=sys.stderr)
            return EXIT_USAGE
    records = list_binary(args.path, arch=arch, limits=_limits(args))
    if args.json:
        _write(json_text({"schema": 1, "path": args.path, "entries": records}))
    else:
        _write(format_listing(records, demangle=demangle))
    return EXIT_OK


def cmd_replay(args) -> int:
    if args.sanitize:
        from .sanitize import run_sanitize
        if args.check:
            print("cgsnap: --sanitize runs the replay under compute-sanitizer; --check is a "
                  "separate run", file=sys.stderr)
            return EXIT_USAGE
        return run_sanitize(args.file, tool=args.tool, graph=args.graph, device=args.device,
                            print_limit=args.print_limit, allow_jit=args.allow_jit,
                            as_json=args.json, key=_read_key(args.key) if args.key else None)
    from .replay import replay
    key = _read_key(args.key) if args.key else None
    if args.graph is not None:      # a usage error before any GPU work
        snap, f = _open(args, key=key)
        f.close()
        if args.graph not in {g.name for g in snap.graphs}:
            return _no_such_graph(args, snap)
    return replay(args.file, check=args.check, device=args.device, allow_jit=args.allow_jit,
                  graph=args.graph, key=key, limits=_limits(args))


def cmd_diff(args) -> int:
    from .diff import diff_files, diff_text
    for path in (args.a, args.b):
        if not os.path.exists(path):
            print(f"cgsnap: {path}: no such file", file=sys.stderr)
            return EXIT_INVALID
    if args.limit < 0:
        print("cgsnap: --limit must be at least 0", file=sys.stderr)
        return EXIT_USAGE
    from .render import json_text
    d = diff_files(args.a, args.b, limit=args.limit)
    sys.stdout.write(json_text(d) if args.json else diff_text(d))
    return EXIT_OK if d["same"] else EXIT_INVALID


def cmd_bisect(args) -> int:
    from .bisect import run_bisect
    return run_bisect(args.file, graph=args.graph, device=args.device, as_json=args.json,
                      allow_jit=args.allow_jit, key=_read_key(args.key) if args.key else None)


def cmd_extract(args) -> int:
    from .extract import run_extract
    if args.budget < 0:
        print("cgsnap: --trace-budget must be at least 0", file=sys.stderr)
        return EXIT_USAGE
    key = _read_key(args.key) if args.key else None
    try:
        return run_extract(args.file, args.node, args.output, graph=args.graph,
                           device=args.device, budget=args.budget, allow_jit=args.allow_jit,
                           key=key)
    except OSError as exc:
        if exc.filename is None or os.path.abspath(str(exc.filename)) == \
                os.path.abspath(args.file):
            raise
        print(f"cgsnap: {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INVALID


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(keep=args.keep)


def _limit_arg(text: str) -> tuple:
    try:
        return parse_assignment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_limit(parser) -> None:
    parser.add_argument("--limit", action="append", type=_limit_arg, metavar="NAME=VALUE",
                        help="raise a reading budget, e.g. image_bytes=1G (cgsnap.Limits; "
                             "docs/RELIABILITY.md lists them)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cgsnap", description="Save CUDA graphs to files and rebuild "
                                "them, bit-exact, in a fresh process.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="graphs, kernels, regions and sizes of a snapshot file")
    s.add_argument("file")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    _add_limit(s)
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("show", help="every node as a box, in topological order")
    s.add_argument("file")
    s.add_argument("--graph", help="only this graph")
    _add_limit(s)
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser("dot", help="Graphviz of the graphs")
    s.add_argument("file")
    _add_limit(s)
    s.set_defaults(fn=cmd_dot)
    s = sub.add_parser("verify", help="checksums, decoded contents and structure (no GPU needed)")
    s.add_argument("file")
    s.add_argument("--key", help="also check FILE.sig with this key file (HMAC secret, or "
                                 "Ed25519 public key: PEM, DER or OpenSSH)")
    _add_limit(s)
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("sign", help="write FILE.sig (HMAC-SHA256 secret or Ed25519 key)")
    s.add_argument("file")
    s.add_argument("--key", required=True, help="key file: a secret of >= 16 bytes, or an "
                                                "Ed25519 private key (PEM, DER or OpenSSH)")
    s.set_defaults(fn=cmd_sign)
    s = sub.add_parser("kernels", help="kernels and globals in a library, executable, fatbin or cubin")
    s.add_argument("path")
    s.add_argument("--arch", help="only this arch, e.g. sm_90")
    s.add_argument("--json", action="store_true")
    _add_limit(s)
    s.set_defaults(fn=cmd_kernels)
    s = sub.add_parser("replay", help="restore and launch on this GPU; --check compares outputs")
    s.add_argument("file")
    s.add_argument("--check", action="store_true",
                   help="compare outputs bit-exactly with those recorded at save time")
    s.add_argument("--graph", help="only this graph")
    s.add_argument("--device", type=int, default=0)
    s.add_argument("--allow-jit", action="store_true", help="JIT carried PTX on a newer arch")
    s.add_argument("--key", help="refuse the file unless FILE.sig matches this key")
    s.add_argument("--sanitize", action="store_true",
                   help="run the replay under compute-sanitizer; each finding names its node "
                        "and kernel (exit 1 on findings, 2 without compute-sanitizer)")
    s.add_argument("--tool", default="memcheck",
                   choices=("memcheck", "racecheck", "initcheck", "synccheck"),
                   help="compute-sanitizer tool for --sanitize (default memcheck)")
    s.add_argument("--print-limit", type=int, default=100, help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true", help="--sanitize: machine-readable output")
    _add_limit(s)
    s.set_defaults(fn=cmd_replay)
    s = sub.add_parser("bisect", help="replay a traced file node by node; name the first node "
                                      "whose result differs from the recorded trace")
    s.add_argument("file")
    s.add_argument("--graph", help="only this graph")
    s.add_argument("--device", type=int, default=0)
    s.add_argument("--allow-jit", action="store_true", help="JIT carried PTX on a newer arch")
    s.add_argument("--key", help="refuse the file unless FILE.sig matches this key")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_bisect)
    s = sub.add_parser("extract", help="a new file holding only nodes N..M, their inputs as "
                                       "they were before node N ran, and their kernels")
    s.add_argument("file")
    s.add_argument("--node", required=True, metavar="N[..M]",
                   help="a node id, or a range of ids in the order the nodes run")
    s.add_argument("-o", "--output", required=True, metavar="OUT")
    s.add_argument("--graph", help="the graph (needed when the file holds several)")
    s.add_argument("--device", type=int, default=0)
    s.add_argument("--allow-jit", action="store_true", help="JIT carried PTX on a newer arch")
    s.add_argument("--key", help="refuse the file unless FILE.sig matches this key")
    s.add_argument("--trace-budget", dest="budget", type=int, default=64 << 20,
                   help="bytes of changed contents the new file's trace keeps (default 64 MiB)")
    s.set_defaults(fn=cmd_extract)
    s = sub.add_parser("diff", help="how two snapshot files differ: graphs, nodes, arguments, "
                                    "kernels, regions and their contents (no GPU); exit 0 same, "
                                    "1 different")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--limit", type=int, default=50,
                   help="differences listed per graph, for kernels and for regions (all are "
                        "counted; default 50)")
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser("demo", help="capture, save, restore in a fresh process, compare")
    s.add_argument("--keep", metavar="DIR", help="keep the snapshot file in DIR")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    path = getattr(args, "file", None) or getattr(args, "path", None)
    if path is not None and not os.path.exists(path):
        print(printable(f"cgsnap: {path}: no such file"), file=sys.stderr)
        return EXIT_INVALID
    try:
        return args.fn(args)
    except UsageError as exc:
        print(f"cgsnap: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CgsnapError as exc:
        print(printable(f"cgsnap: {exc}"), file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:
        print(printable(f"cgsnap: {exc.filename or path}: {exc.strerror or exc}"), file=sys.stderr)
        return EXIT_INVALID
