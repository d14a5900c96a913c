"""Long fuzzing run over the snapshot reader (CI runs a short, fixed budget of the same ideas in
tests/test_fileformat.py and tests/test_model.py).

Two kinds of mutant of a real snapshot (cgsnap/tools/data/sample.cgsnap by default):
  bytes     flipped bits, overwritten / inserted / deleted bytes, truncations -- mostly caught by
            the checksums, which is the point: nothing may get past them;
  manifest  the manifest decoded, one to three fields replaced by values of other types and
            ranges, and the file re-written with valid checksums -- so that the structural
            validation behind the checksums is what gets exercised.
Each mutant is opened and read completely (cgsnap.read + verify of every blob). Allowed outcomes:
success or a cgsnap error. Anything else, a case over 5 s, or memory over the cap is a failure.

``--crafted N`` instead runs N crafted inputs (tests/crafted.py), each in a forked child whose
peak RSS and time are measured: 512 MiB and 10 s at most, like the CI cases in
tests/test_crafted.py, but with random sizes and shapes:
  ratio      zstd bombs at up to the format's 32768x: kernel images and regions claiming up to
             8 GiB (read, load up to the GPU step, verify), corrupt frames (short, long, a
             wrong declared size), PTX / cubin fatbin entries claiming up to 4 GiB;
  structure  many section headers naming long strings (at one offset or many), overlapping
             fatbin sections, section counts far past the table, many fatbin entries, manifests
             of many tiny objects (empty maps, empty lists, short strings, ints).

usage: python scripts/fuzz.py [--cases 10000] [--seed 1] [--file F] [--json out.json]
       python scripts/fuzz.py --crafted 200 [--seed 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import cgsnap  # noqa: E402
from cgsnap.errors import CgsnapError
from cgsnap.format import fileformat

MEMORY_CAP = 4 << 30
CASE_SECONDS = 5


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.choice(["flip", "flip", "overwrite", "insert", "delete", "truncate"])
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "overwrite":
        i = rng.randrange(len(b))
        b[i:i + 8] = rng.randbytes(8)
    elif op == "insert":
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif op == "delete":
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 64)]
    else:
        del b[rng.randrange(len(b)):]
    return bytes(b)


_VALUES = [None, True, -1, 0, 1, 7, 2 ** 31, 2 ** 63 - 1, -(2 ** 63), 1.5, "", "x" * 5000,
           "kernel", b"", b"\x00" * 9, [], [0], [[0, 0, 0]], {}, {"a": 1}, [1, 2, 3]]


def _leaves(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            yield from _leaves(v, path + (i,))


def mutate_manifest(manifest: dict, rng: random.Random, paths: list) -> dict:
    m = copy.deepcopy(manifest)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        if not path:
            continue
        target = m
        try:
            for k in path[:-1]:
                target = target[k]
            if isinstance(target, list) and rng.random() < 0.2:
                target.pop(path[-1])
            elif isinstance(target[path[-1]], bytes) and target[path[-1]] and rng.random() < 0.5:
                # Packed fields (a kernel node's params / pointer table): damage them in place,
                # same length, so that their validation rather than the type check meets them.
                b = bytearray(target[path[-1]])
                b[rng.randrange(len(b))] = rng.randrange(256)
                target[path[-1]] = bytes(b)
            else:
                target[path[-1]] = rng.choice(_VALUES)
        except (KeyError, IndexError, TypeError):
            continue
    return m


def check(path: str) -> None:
    snap = cgsnap.read(path)
    with fileformat.open_file(path) as f:
        f.verify()
    for g in snap.graphs:
        g.topological_order()


# ---- crafted inputs --------------------------------------------------------------------------

CRAFTED_RSS_MIB, CRAFTED_SECONDS = 512, 10


def crafted_ratio(rng: random.Random, tmp: str) -> tuple:
    """(description, path, readers) of a random decompression bomb."""
    import crafted
    kind = rng.choice(["image", "images", "region", "corrupt", "ptx", "cubin"])
    size = rng.choice([1, 64, 300, 1024, 2048, 4096, 8191]) * crafted.MiB
    if kind == "image":
        data, readers = crafted.image_bomb(size), ["read", "load", "verify"]
    elif kind == "images":
        n = rng.randint(2, 8)
        data, readers = crafted.image_bomb(min(size, 256 * crafted.MiB), n), ["read", "load"]
        kind += f" x{n}"
    elif kind == "region":
        data, readers = crafted.region_bomb(size), ["verify", "read"]
    elif kind == "corrupt":
        mode = rng.choice(["short", "long", "declared"])
        data, readers = crafted.region_bomb(size, mode), ["verify"]
        kind += f" ({mode})"
    else:
        claimed = rng.choice([1, 200, 256, 257, 1024, 4096]) * crafted.MiB
        entry = crafted.fatbin_entry(crafted.KIND_PTX if kind == "ptx" else crafted.KIND_CUBIN,
                                     90, crafted.rle_zstd(claimed, byte=0x20), claimed)
        data, readers, size = crafted.fatbin([entry]), ["kernels"], claimed
    path = os.path.join(tmp, "crafted.bin")
    with open(path, "wb") as f:
        f.write(data)
    return f"{kind} claiming {size >> 20} MiB in {len(data)} bytes", path, readers


def crafted_structure(rng: random.Random, tmp: str) -> tuple:
    """(description, path, readers) of a random structure asking for unbounded work."""
    import crafted
    kind = rng.choice(["names", "overlap", "sections", "entries", "objects"])
    if kind == "names":
        headers, length = rng.choice([64, 1024, 4096]), rng.choice([1024, 1 << 16, 1 << 20])
        distinct = rng.random() < 0.5
        data = crafted.strtab_elf(headers, length, distinct)
        what, readers = f"{headers} headers naming {length}-byte strings " \
                        f"({'distinct' if distinct else 'one'} offset)", ["kernels"]
    elif kind == "overlap":
        copies = rng.choice([2, 64, 2048, 8192])
        data, what, readers = crafted.overlapping_fatbin_sections(copies), \
            f"{copies} overlapping fatbin sections", ["kernels"]
    elif kind == "sections":
        count = rng.choice([1 << 16, 1 << 20, 1 << 32, (1 << 64) - 1])
        data = bytearray(crafted.elf([(0, 0, 0, 0)], b"", count=0))
        table = int.from_bytes(data[40:48], "little")
        data[table + 32:table + 40] = count.to_bytes(8, "little")
        data, what, readers = bytes(data), f"a section count of {count}", ["kernels"]
    elif kind == "entries":
        n = rng.choice([10, 10_000, 200_000])
        data, what, readers = crafted.many_entries_fatbin(n), f"{n} fatbin entries", ["kernels"]
    else:
        shape = rng.choice(["maps", "lists", "strings", "ints"])
        item = {"maps": b"\x80", "lists": b"\x90"}.get(shape)
        total = rng.choice([1, 16, 64]) * crafted.MiB - 64
        if item is None:
            unit = b"\xa2ab" if shape == "strings" else b"\xce\x00\x01\x00\x00"
            inner = 1 << 18
            body = b"\xdd" + (inner).to_bytes(4, "big") + unit * inner
            count = (total - 16) // len(body)
            manifest = b"\x81\xa1a\xdd" + count.to_bytes(4, "big") + body * count
        else:
            manifest = crafted.empty_maps_manifest(total).replace(b"\x80", item) \
                if item != b"\x80" else crafted.empty_maps_manifest(total)
        data, what, readers = crafted.assemble(manifest, []), \
            f"a {total >> 20} MiB manifest of {shape}", ["read"]
    path = os.path.join(tmp, "crafted.bin")
    with open(path, "wb") as f:
        f.write(data)
    return what, path, readers


def _crafted_child(reader: str, path: str) -> None:
    import crafted
    from cgsnap.tools.cli import main as cli
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.alarm(CRAFTED_SECONDS * 3)
    try:
        if reader == "read":
            crafted.run_read(path)
        elif reader == "load":
            crafted.run_load(path)
        elif reader == "verify":
            cli(["verify", path])
        else:
            cli(["kernels", path])
    except CgsnapError:
        os._exit(1)
    except BaseException:   # noqa: BLE001 -- what the fuzzer looks for
        os._exit(2)
    os._exit(0)


def run_crafted(args) -> int:
    rng = random.Random(args.seed)
    outcomes = {"ok": 0, "cgsnap_error": 0, "failure": 0}
    failures, worst_rss, worst_s, runs = [], 0.0, 0.0, []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in range(args.crafted):
            make = crafted_ratio if case % 2 == 0 else crafted_structure
            what, path, readers = make(rng, tmp)
            for reader in readers:
                t = time.perf_counter()
                pid = os.fork()
                if pid == 0:
                    _crafted_child(reader, path)
                _, status, usage = os.wait4(pid, 0)
                seconds, rss = time.perf_counter() - t, usage.ru_maxrss / 1024
                worst_rss, worst_s = max(worst_rss, rss), max(worst_s, seconds)
                runs.append((rss, seconds, what, reader))
                code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
                bad = code not in (0, 1) or rss > CRAFTED_RSS_MIB or seconds > CRAFTED_SECONDS
                outcomes["failure" if bad else "ok" if code == 0 else "cgsnap_error"] += 1
                if bad:
                    failures.append({"case": case, "input": what, "reader": reader,
                                     "exit": code, "rss_mib": round(rss), "seconds": seconds})
    elapsed = time.perf_counter() - t_start
    print(f"{'crafted inputs':<24}{args.crafted}")
    for k, v in outcomes.items():
        print(f"{k:<24}{v}")
    print(f"{'seconds':<24}{elapsed:.1f}\n{'slowest case (s)':<24}{worst_s:.3f}\n"
          f"{'largest peak RSS (MiB)':<24}{worst_rss:.0f}")
    for label, key in (("largest", 0), ("slowest", 1)):
        for rss, seconds, what, reader in sorted(runs, key=lambda r: -r[key])[:3]:
            print(f"  {label}: {what}, {reader}: {rss:.0f} MiB, {seconds:.2f} s")
    for f in failures[:10]:
        print(f"FAILURE case {f['case']} ({f['input']}, {f['reader']}): exit {f['exit']}, "
              f"{f['rss_mib']} MiB, {f['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"crafted": args.crafted, "seed": args.seed, "outcomes": outcomes,
                       "seconds": round(elapsed, 1), "slowest_case_s": round(worst_s, 3),
                       "peak_rss_mib": round(worst_rss, 1), "failures": failures[:50]},
                      fh, indent=1)
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--file", default=os.path.join(ROOT, "cgsnap", "tools", "data", "sample.cgsnap"))
    ap.add_argument("--json")
    ap.add_argument("--crafted", type=int, metavar="N",
                    help="run N crafted bombs and structures instead of mutants")
    args = ap.parse_args()
    if args.crafted:
        return run_crafted(args)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(args.seed)
    data = open(args.file, "rb").read()
    with fileformat.open_file(args.file) as f:
        manifest = f.manifest
        blobs = [bytes(f.blob(i)) for i in range(len(f.blobs))]
    paths = list(_leaves(manifest))
    outcomes = {"ok": 0, "cgsnap_error": 0, "failure": 0}
    kinds = {"bytes": 0, "manifest": 0}
    failures = []
    slowest = 0.0
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mutant.cgsnap")
        for case in range(args.cases):
            kind = "bytes" if case % 2 == 0 else "manifest"
            kinds[kind] += 1
            if kind == "bytes":
                with open(path, "wb") as f:
                    f.write(mutate_bytes(data, rng))
            else:
                try:
                    fileformat.write_file(path, mutate_manifest(manifest, rng, paths), blobs)
                except CgsnapError:
                    outcomes["cgsnap_error"] += 1     # the writer refused: also fine
                    continue
            t = time.perf_counter()
            signal.alarm(CASE_SECONDS)
            try:
                check(path)
                outcomes["ok"] += 1
            except CgsnapError:
                outcomes["cgsnap_error"] += 1
            except Hang:
                outcomes["failure"] += 1
                failures.append({"case": case, "kind": kind, "error": "hang"})
            except BaseException as exc:   # noqa: BLE001 -- this is what the fuzzer looks for
                outcomes["failure"] += 1
                failures.append({"case": case, "kind": kind, "error": repr(exc),
                                 "trace": traceback.format_exc()[-2000:]})
            finally:
                signal.alarm(0)
            slowest = max(slowest, time.perf_counter() - t)
    elapsed = time.perf_counter() - t_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"cases": args.cases, "seed": args.seed, "file": os.path.basename(args.file),
              "kinds": kinds, "outcomes": outcomes, "seconds": round(elapsed, 1),
              "slowest_case_s": round(slowest, 3), "peak_rss_mib": round(peak, 1),
              "failures": failures[:20]}
    print(f"{'cases':<24}{args.cases}\n{'bytes / manifest':<24}{kinds['bytes']} / "
          f"{kinds['manifest']}")
    for k, v in outcomes.items():
        print(f"{k:<24}{v}")
    print(f"{'seconds':<24}{elapsed:.1f}\n{'slowest case (s)':<24}{slowest:.3f}\n"
          f"{'peak RSS (MiB)':<24}{peak:.0f}")
    for f in failures[:5]:
        print(f"FAILURE case {f['case']} ({f['kind']}): {f['error']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
