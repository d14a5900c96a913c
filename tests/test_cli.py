"""The command line on the bundled snapshot, against golden files (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = "cgsnap/tools/data/sample.cgsnap"
GOLDEN = os.path.join(ROOT, "tests", "golden")
UPDATE = os.environ.get("CGSNAP_UPDATE_GOLDEN") == "1"


def cgsnap(*args, env=None):
    return subprocess.run([sys.executable, "-m", "cgsnap", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, **(env or {})), timeout=120)


@pytest.mark.parametrize("args,golden", [
    (("info", SAMPLE), "info.txt"),
    (("show", SAMPLE), "show.txt"),
    (("dot", SAMPLE), "dot.txt"),
    (("verify", SAMPLE), "verify.txt"),
])
def test_output_matches_golden(args, golden):
    proc = cgsnap(*args)
    assert proc.returncode == 0, proc.stderr
    path = os.path.join(GOLDEN, golden)
    if UPDATE:
        with open(path, "w") as f:
            f.write(proc.stdout)
    with open(path) as f:
        assert proc.stdout == f.read()


def test_info_json_has_schema_and_counts():
    proc = cgsnap("info", SAMPLE, "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["schema"] == 2
    assert d["memory_refs"] == {"words": 0, "regions": 0}
    g = d["graphs"][0]
    assert g["node_types"] == {"kernel": 5} and g["refs"] > 0
    assert d["device"]["arch"] == 90
    assert any("cutlass" in k["name"] for k in d["kernels"])
    assert d["bytes"]["stored"] < d["bytes"]["raw"]


def test_show_names_refs_like_the_docs():
    out = cgsnap("show", SAMPLE, "--graph", "demo").stdout
    assert '→ region 6 "x" + 0x0' in out and "<<<(" in out


def test_exit_codes(tmp_path):
    assert cgsnap().returncode == 2
    assert cgsnap("frobnicate").returncode == 2
    missing = cgsnap("info", str(tmp_path / "missing.cgsnap"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
    bad = tmp_path / "bad.cgsnap"
    with open(os.path.join(ROOT, SAMPLE), "rb") as f:
        bad.write_bytes(f.read()[:5000])
    for cmd in ("info", "show", "dot", "verify"):
        proc = cgsnap(cmd, str(bad))
        assert proc.returncode == 1, cmd
        assert str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert cgsnap("show", SAMPLE, "--graph", "nope").returncode == 2


def test_verify_catches_a_flipped_blob_byte(tmp_path):
    data = bytearray(open(os.path.join(ROOT, SAMPLE), "rb").read())
    data[-100] ^= 0x40
    bad = tmp_path / "flipped.cgsnap"
    bad.write_bytes(bytes(data))
    assert cgsnap("info", str(bad)).returncode == 0      # the manifest is intact
    proc = cgsnap("verify", str(bad))
    assert proc.returncode == 1 and "checksum" in proc.stderr


def test_demo_without_gpu_shows_the_sample():
    from cgsnap.tools.demo import _gpu_available
    if _gpu_available():
        pytest.skip("this machine has a GPU: the demo runs for real (GPU suite)")
    proc = cgsnap("demo")
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU here" in proc.stdout and "graphs (1)" in proc.stdout and "┌─" in proc.stdout


def test_kernels_command_on_a_shared_library():
    lib = os.path.join("tests", "fixtures", "libkernels.so")
    proc = cgsnap("kernels", lib, "--arch", "sm_90")
    assert proc.returncode == 0, proc.stderr
    assert "axpy" in proc.stdout or "hidden" in proc.stdout
    js = json.loads(cgsnap("kernels", lib, "--json").stdout)
    assert js["schema"] == 1 and js["entries"]
    assert cgsnap("kernels", lib, "--arch", "bogus").returncode == 2


def test_info_reports_ambiguous_words(tmp_path):
    """A snapshot whose recorder decided ambiguous argument words says so in `info`."""
    from cgsnap.format.hashing import content_hash
    from cgsnap.format.model import Graph, Kernel, KernelImage, Snapshot
    image = b"\x7fELF" + bytes(64)
    h = content_hash(image)
    snap = Snapshot(graphs=[Graph("g", [], [])], regions=[],
                    images=[KernelImage(h, "cubin", 90, ("k",), image, "test")],
                    kernels=[Kernel(0, "k", h, ((0, 16),))], device={"arch": 90},
                    meta={"ambiguous_word_count": 5, "ambiguous_words": [
                        "graph 'g' node 1: word 0x7ff700000001 at parameter byte 8 of k: literal",
                        "graph 'g' node 2: word 0x7ff700000000 at parameter byte 0 of k: pointer"]})
    path = tmp_path / "amb.cgsnap"
    snap.save(path)
    out = cgsnap("info", str(path)).stdout
    assert "ambiguous 5 argument words decided by evidence (1 of the 2 listed kept as " \
           "pointers" in out
    assert "ambiguous" not in cgsnap("info", SAMPLE).stdout


def test_info_and_show_list_pointers_stored_in_memory(tmp_path):
    """A saved allocation holding a pointer array: info counts the words (summary line, region
    line, --json), show lists each with its target."""
    import numpy as np

    from cgsnap.format.hashing import content_hash
    from cgsnap.format.model import (Arg, Graph, Kernel, KernelImage, KernelNode, Policy, Ref,
                                     Region, RegionKind, Snapshot)
    image = b"\x7fELF" + bytes(64)
    h = content_hash(image)
    ptrs = np.zeros(64, np.uint8)
    node = KernelNode.from_args(0, 0, (1, 1, 1), (32, 1, 1), 0, (
        Arg((0x7F00_0000_0000).to_bytes(8, "little"), ((0, Ref(0, 0)),)),), ((0, 8),))
    regions = [Region(0, RegionKind.ALLOCATION, 64, Policy.SAVED, data=ptrs,
                      content_hash=content_hash(ptrs),
                      refs=np.array([[0, 1, 0], [8, 1, 256], [16, 2, 4]], "<u8").tobytes()),
               Region(1, RegionKind.ALLOCATION, 1024, Policy.SCRATCH),
               Region(2, RegionKind.NAMED, 16, Policy.SCRATCH, name="t", dtype="float32",
                      shape=(2, 2), strides=(1, 2))]
    snap = Snapshot(graphs=[Graph("g", [node], [])], regions=regions,
                    images=[KernelImage(h, "cubin", 90, ("k",), image, "test")],
                    kernels=[Kernel(0, "k", h, ((0, 8),))], device={"arch": 90})
    path = tmp_path / "ptrs.cgsnap"
    snap.save(path)
    out = cgsnap("info", str(path)).stdout
    assert "pointers  3 words stored in 1 saved region(s) point into regions" in out
    assert "(3 stored pointers)" in out and "float32[2, 2] strides (1, 2)" in out
    d = json.loads(cgsnap("info", str(path), "--json").stdout)
    assert d["memory_refs"] == {"words": 3, "regions": 1}
    assert [r["memory_refs"] for r in d["regions"]] == [3, 0, 0]
    assert d["regions"][2]["strides"] == [1, 2]
    show = cgsnap("show", str(path)).stdout
    assert "region 0 (allocation): 3 stored pointer(s)" in show
    assert "  +0x8 → region 1 (allocation) + 0x100" in show
    assert '  +0x10 → region 2 "t" + 0x4' in show
    assert "stored pointer" not in cgsnap("show", SAMPLE).stdout
