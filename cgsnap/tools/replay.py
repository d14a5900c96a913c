"""``cgsnap replay FILE [--check]``: restore on this GPU, launch, and compare bit-exactly with the
outputs recorded at save time."""
from __future__ import annotations

import sys
import time

from ..format.model import Policy
from .compare import compare_arrays


def check_graph(r, name: str) -> list:
    """Reset the saved state, launch ``name`` once, and compare every recorded output:
    ``[(buffer label, region id, Comparison)]`` for those that differ (expected = A, got = B)."""
    g = r.snapshot.graph(name)
    r.reset()
    r.graph(name).launch()
    r.synchronize()
    failures = []
    for rid in sorted(g.checks):
        region = r.snapshot.regions[rid]
        c = compare_arrays(r.expected(name, rid), r.read_region(rid), region.dtype)
        if not c.equal:
            label = f"buffer {region.name!r}" if region.name else f"region {rid}"
            failures.append((label, rid, c))
    return failures


def replay(path: str, check: bool = False, device: int = 0, allow_jit: bool = False,
           graph=None, key=None, limits=None) -> int:
    from .. import load
    t0 = time.perf_counter()
    with load(path, device=device, allow_jit=allow_jit, require_signature=key,
              limits=limits) as r:
        names = [graph] if graph else r.graph_names
        bound = [x.name for x in r.snapshot.regions if x.policy is Policy.BOUND]
        if check and bound:
            print(f"cgsnap: {path}: buffers {', '.join(bound)} are bound at restore; check this "
                  "snapshot through the Python API with load(bind=...)", file=sys.stderr)
            return 1
        status = 0
        for name in names:
            if check:
                if not r.snapshot.graph(name).checks:
                    print(f"SKIP  {name}: no outputs were recorded at save time")
                    continue
                failures = check_graph(r, name)
                if failures:
                    total = len(r.snapshot.graph(name).checks)
                    print(f"FAIL  {name}: {len(failures)} of {total} recorded output(s) differ")
                    for label, _, c in failures:
                        print(f"      {label}: {c.summary('expected', 'got')}")
                    status = 1
                else:
                    print(f"PASS  {name}: {len(r.snapshot.graph(name).checks)} buffer(s) "
                          "bit-identical to the recorded outputs")
            else:
                r.graph(name).launch()
                r.synchronize()
                print(f"ran   {name}")
        total = time.perf_counter() - t0
        tim = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in r.timings.items())
        print(f"restore timings: {tim}; total {total * 1e3:.1f} ms; torch imported: "
              f"{'yes' if 'torch' in sys.modules else 'no'}")
    return status
