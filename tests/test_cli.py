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


def test_info_says_which_kernels_the_recorder_tied_to_their_load():
    import cgsnap
    from cgsnap.format.hashing import content_hash
    from cgsnap.format.model import Graph, Kernel, KernelImage, Snapshot
    from cgsnap.tools import render
    a, b = b"\x7fELF" + bytes(64), b"\x7fELF" + bytes(65)
    ha, hb = content_hash(a), content_hash(b)
    snap = Snapshot(graphs=[Graph("g", [], [])], regions=[],
                    images=[KernelImage(ha, "cubin", 90, ("k",), a, "recorder: module load"),
                            KernelImage(hb, "cubin", 90, ("j",), b, "scan:/lib.so [by attributes]")],
                    kernels=[Kernel(0, "k", ha, ((0, 16),)), Kernel(1, "j", hb, ((0, 8),))],
                    device={"arch": 90})
    d = render.info_dict(snap)
    out = render.info_text(d)
    assert "identity  1 of 2 kernels tied by the recorder to the image they were loaded from" in out
    assert "(cubin sm_90, recorder: module load)" in out and "[by attributes]" in out
    assert [im["exact"] for im in d["images"]] == [True, False]
    assert "identity" not in render.info_text(render.info_dict(cgsnap.read(SAMPLE)))


# ---- hostile names and values (issue #19) ----------------------------------------------------

ESCAPES = "\x1b[2J\x1b]0;owned\x07\x9b31m\u202e"


def _hostile_file(tmp_path):
    import math

    import crafted

    def edit(manifest, blobs):
        manifest["graphs"][0]["name"] = "step" + ESCAPES
        manifest["regions"][0]["name"] = "x" + ESCAPES
        manifest["kernels"][1]["name"] = "pair" + ESCAPES + "\nkernel    fake"
        manifest["meta"].update({"loss": math.nan, "best": math.inf, "worst": -math.inf,
                                 "raw": b"\x00\x01", "host": ESCAPES,
                                 "pruned_images": [1, 2], "unpruned_images": "whole"})
    path = tmp_path / "hostile.cgsnap"
    path.write_bytes(crafted.snapshot_bytes(edit))
    return path


def _no_control_characters(text: str) -> None:
    import re
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text), repr(text)


def test_control_characters_in_names_are_shown_escaped(tmp_path, measured):
    path = _hostile_file(tmp_path)
    for command in ("info", "show", "dot"):
        result = measured("zygote:cli", command, str(path))
        assert result["value"] == 0, result
        _no_control_characters(result["stdout"])
        assert "\\x1b[2J" in result["stdout"], command
    info = measured("zygote:cli", "info", str(path))["stdout"]
    assert "pair\\x1b[2J" in info and "\\x0akernel    fake" in info
    assert "meta      pruned_images is not in the form cgsnap writes" in info
    err = measured("zygote:cli", "show", str(path), "--graph", "no" + ESCAPES)
    assert err["value"] == 2 and "no graph named" in err["stderr"]
    _no_control_characters(err["stderr"])


def test_info_json_is_strict_json(tmp_path, measured):
    path = _hostile_file(tmp_path)
    result = measured("zygote:cli", "info", str(path), "--json")
    assert result["value"] == 0, result

    def refuse(name):
        raise ValueError(f"{name} in the JSON")
    d = json.loads(result["stdout"], parse_constant=refuse)
    meta = d["meta"]
    assert (meta["loss"], meta["best"], meta["worst"], meta["raw"]) == \
        ("NaN", "Infinity", "-Infinity", "0001")


def test_kernel_names_in_binaries_are_shown_escaped(tmp_path, measured):
    cubin = bytearray(open(os.path.join(ROOT, "tests", "fixtures", "kernels.sm_90.cubin"),
                           "rb").read())
    patched = bytes(cubin).replace(b"axpy", b"\x1b[2J")      # same length: layout unchanged
    path = tmp_path / "escape.cubin"
    path.write_bytes(patched)
    result = measured("zygote:cli", "kernels", str(path))
    assert result["value"] == 0 and "kernel    \\x1b[2J" in result["stdout"], result
    _no_control_characters(result["stdout"])
    js = json.loads(measured("zygote:cli", "kernels", str(path), "--json")["stdout"])
    assert "\x1b[2J" in js["entries"][0]["kernels"]


def test_replay_of_an_unknown_graph_is_a_usage_error_before_any_gpu_work(measured):
    result = measured("zygote:cli", "replay", SAMPLE, "--graph", "nope")
    assert result["outcome"] == "ok" and result["value"] == 2, result
    assert "no graph named 'nope' (graphs: demo)" in result["stderr"]
    assert "Traceback" not in result["stderr"]


def test_limits_on_the_command_line(measured, tmp_path):
    result = measured("zygote:cli", "info", SAMPLE, "--limit", "manifest_objects=100")
    assert result["value"] == 1 and "manifest_objects budget of 100" in result["stderr"]
    result = measured("zygote:cli", "verify", SAMPLE, "--limit", "image_bytes=1M")
    assert result["value"] == 1 and "image_bytes budget of 1048576" in result["stderr"]
    assert measured("zygote:cli", "verify", SAMPLE, "--limit", "image_total=1G")["value"] == 0
    bad = cgsnap("info", SAMPLE, "--limit", "nonsense=1")
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
