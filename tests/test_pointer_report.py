"""scripts/pointer_report.py on a snapshot built in code (CPU): it lists a rewritten word whose
captured value is not aligned, and a literal that lies near the captured pointers."""
import importlib.util
import os

from cgsnap.format.hashing import content_hash
from cgsnap.format.model import (Arg, Graph, Kernel, KernelImage, KernelNode, Policy, Ref, Region,
                                 RegionKind, Snapshot)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "pointer_report", os.path.join(ROOT, "scripts", "pointer_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_lists_suspects_and_near_literals(tmp_path):
    image = b"\x7fELF" + bytes(64)
    h = content_hash(image)
    word = lambda v: v.to_bytes(8, "little")  # noqa: E731
    node = KernelNode.from_args(0, 0, (1, 1, 1), (32, 1, 1), 0, (
        Arg(word(0x7F00_0000_1000), ((0, Ref(0, 0x1000)),)),
        Arg(word(0x7F00_0000_0003), ((0, Ref(0, 3)),)),        # an int + 4 bytes taken for one
        Arg(word(0x7F00_0020_0000)),                             # kept literal, near the others
        Arg(word(12345))), ((0, 8), (8, 8), (16, 8), (24, 8)))  # an ordinary value
    snap = Snapshot(graphs=[Graph("g", [node], [])],
                    regions=[Region(0, RegionKind.ALLOCATION, 1 << 20, Policy.SCRATCH)],
                    images=[KernelImage(h, "cubin", 90, ("k",), image, "test")],
                    kernels=[Kernel(0, "k", h, ((0, 8), (8, 8), (16, 8), (24, 8)))],
                    device={"arch": 90})
    path = tmp_path / "s.cgsnap"
    snap.save(path)
    text = _load_script().report(str(path))
    assert "2 pointer words" in text
    assert "suspect pointers (not 8-byte aligned): 1" in text
    assert "k @8: 0x7f0000000003 -> region 0 + 3" in text
    assert "near literals (within 1 GiB of the pointers, kept literal): 1" in text
    assert "k @16: 0x7f0000200000" in text and "0x3039" not in text


def test_reclassify_lists_what_todays_classifier_changes(tmp_path):
    """A file written before the ambiguous-word rules, holding an int + stale half taken for a
    pointer into a bf16 tensor: --reclassify reports it turning literal, the real one staying."""
    image = b"\x7fELF" + bytes(64)
    h = content_hash(image)
    base = 0x7FF7_0000_0000
    word = lambda v: v.to_bytes(8, "little")  # noqa: E731
    node = KernelNode.from_args(0, 0, (1, 1, 1), (32, 1, 1), 0, (
        Arg(word(base + 0x10040) + word(base + 1), ((0, Ref(0, 0x10040)), (8, Ref(0, 1)))),),
        ((0, 16),))
    snap = Snapshot(graphs=[Graph("g", [node], [])],
                    regions=[Region(0, RegionKind.NAMED, 1 << 20, Policy.BOUND, name="w",
                                    dtype="bfloat16")],
                    images=[KernelImage(h, "cubin", 90, ("k",), image, "test")],
                    kernels=[Kernel(0, "k", h, ((0, 16),))], device={"arch": 90})
    path = tmp_path / "s.cgsnap"
    snap.save(path)
    text = _load_script().reclassify_report(str(path))
    assert "1 ambiguous words, 1 decided differently from the file" in text
    assert "k @8: 0x7ff700000001 region 0 + 1 -> literal" in text
