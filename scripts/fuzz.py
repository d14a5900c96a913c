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

usage: python scripts/fuzz.py [--cases 10000] [--seed 1] [--file F] [--json out.json]
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
sys.path.insert(0, ROOT)

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--file", default=os.path.join(ROOT, "cgsnap", "tools", "data", "sample.cgsnap"))
    ap.add_argument("--json")
    args = ap.parse_args()
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
