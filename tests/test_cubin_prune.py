"""Cutting cubins down to the kernels a snapshot launches (cgsnap.binary.cubin_prune), without a GPU.

Every pruned image is checked against its original section by section: what is kept is
byte-identical and at the same index, what is dropped is gone from every table that named it,
and the program headers span exactly the kept sections. Whether the driver agrees is the GPU
suite's part (tests/gpu/test_gpu_prune.py); here the images come from the committed fixtures
and from nvcc (skipped without it: see tests/test_binaries.py for the fixture policy).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cgsnap.binary import cubin_prune, elf
from cgsnap.binary.cubin_prune import _PHDR, _SYM, prune_cubin
from cgsnap.errors import BinaryFormatError, FormatError
from cgsnap.format import snapfile
from cgsnap.format.hashing import content_hash
from cgsnap.format.model import KernelImage, RegionKind

FIXTURES = Path(__file__).parent / "fixtures"
SM90 = FIXTURES / "kernels.sm_90.cubin"

# Beyond the fixtures: device functions called through a pointer table (their own .text
# sections, reached only through relocations), printf (an extern), shared memory, a call
# chain that ptxas clones into each kernel, and many kernels of one template.
PRUNE_SOURCE = r"""
#include <cstdio>
__device__ float g_scale[32];
__constant__ int c_bias[8];
__device__ __noinline__ float inc(float x) { return x + 1.0f; }
__device__ __noinline__ float dbl(float x) { return 2.0f * x; }
__device__ float (*g_ops[2])(float) = {inc, dbl};
__device__ __noinline__ float chain(float x) { return x * g_scale[threadIdx.x & 31] + c_bias[threadIdx.x & 7]; }
extern "C" __global__ void via_table(float* a, int op) { a[threadIdx.x] = g_ops[op & 1](a[threadIdx.x]); }
extern "C" __global__ void chained(float* a) { a[threadIdx.x] = chain(a[threadIdx.x]); }
extern "C" __global__ void shared_sum(float* a, int n) {
  __shared__ float s[256]; s[threadIdx.x & 255] = a[threadIdx.x]; __syncthreads();
  a[threadIdx.x] = s[(threadIdx.x + 1) & 255] + chain(1.0f) + n; }
extern "C" __global__ void talker(int n) { if (threadIdx.x == 0) printf("n=%d\n", n); }
extern "C" __global__ void target(float* a) { a[0] = 1.0f; }
extern "C" __global__ void taker(void** out) { *out = (void*)target; }
template <int N> __global__ void many(float* a) { a[threadIdx.x] = a[threadIdx.x] * N + chain(N); }
template __global__ void many<1>(float*); template __global__ void many<2>(float*);
template __global__ void many<3>(float*); template __global__ void many<4>(float*);
template __global__ void many<5>(float*); template __global__ void many<6>(float*);
"""


# ---- reading a cubin back, independently of the code under test -----------------------------
class Image:
    def __init__(self, data: bytes):
        self.data = data
        self.elf = elf.ElfFile(data)
        self.sections = self.elf.sections
        self.symbols = self.elf.symbols()
        h = self.elf.header
        self.sh = np.frombuffer(data, elf._SHDR_NUMPY, len(self.sections), h.e_shoff)
        self.ph = np.frombuffer(data, _PHDR, h.e_phnum, h.e_phoff)
        tab = next(s for s in self.sections if s.type == 2)
        self.sym = np.frombuffer(data, _SYM, tab.size // 24, tab.offset)

    def bytes_of(self, s) -> bytes:
        return bytes(self.elf.section_data(s)) if s.type != 8 else b""

    def kernels(self) -> set:
        return set(elf.cubin_info(self.data).kernels)

    def section(self, name):
        return self.elf.section(name)

    def string(self, offset: int) -> bytes:
        table = self.bytes_of(self.section(".strtab"))
        return table[offset:table.index(b"\0", offset)]

    def callgraph(self) -> list:
        """(block, symbol, symbol or prototype string) per entry, markers left out."""
        out, block = [], None
        pairs = np.frombuffer(self.bytes_of(self.section(".nv.callgraph")), "<u4").reshape(-1, 2)
        for x, y in pairs.tolist():
            if x == 0 and y >= 0xFFFFFFFC:
                block = y - (1 << 32)
                out.append((0, 0, block))
            else:
                out.append((block, x, y if block in (-1, -4) else self.string(y)))
        return out

    def prototypes(self) -> list:
        pairs = np.frombuffer(self.bytes_of(self.section(".nv.prototype")), "<u4").reshape(-1, 2)
        return [(x, self.string(y)) for x, y in pairs.tolist()]

    def info_entries(self, name=".nv.info") -> list:
        data, out, i = self.bytes_of(self.section(name)), [], 0
        while i < len(data):
            fmt, attr = data[i], data[i + 1]
            size = int.from_bytes(data[i + 2:i + 4], "little") if fmt == 4 else 0
            out.append((attr, data[i + 4:i + 4 + size]))
            i += 4 + size
        return out


def _nvcc() -> str | None:
    return shutil.which(os.environ.get("NVCC", "nvcc"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{flavour: cubin bytes} compiled from PRUNE_SOURCE."""
    if not _nvcc():
        pytest.skip("nvcc is not available to build the pruning sources")
    d = tmp_path_factory.mktemp("prune")
    (d / "p.cu").write_text(PRUNE_SOURCE)
    out = {}
    for flavour, flags in {"sm_90": [], "sm_80": ["-arch=sm_80"], "debug": ["-G"],
                           "lineinfo": ["-lineinfo"]}.items():
        arch = [] if any(f.startswith("-arch") for f in flags) else ["-arch=sm_90"]
        target = d / f"{flavour}.cubin"
        subprocess.run([_nvcc(), "-cubin", *arch, *flags, "-o", str(target), str(d / "p.cu")],
                       check=True, capture_output=True)
        out[flavour] = target.read_bytes()
    # Separately compiled (-rdc) and linked by nvlink: prototype strings in .strtab, call-graph
    # blocks of address-taken functions and indirect calls.
    nvlink = Path(_nvcc()).with_name("nvlink")
    if nvlink.exists():
        obj = d / "p.o.cubin"
        subprocess.run([_nvcc(), "-cubin", "-arch=sm_90", "-rdc=true", "-o", str(obj),
                        str(d / "p.cu")], check=True, capture_output=True)
        libdir = Path(_nvcc()).parent.parent / "lib64"
        subprocess.run([str(nvlink), "-arch=sm_90", "-o", str(d / "linked.cubin"), str(obj),
                        f"-L{libdir}", "-lcudadevrt"], check=True, capture_output=True)
        out["linked"] = (d / "linked.cubin").read_bytes()
    # Blackwell images carry "mercury" sections this module does not cut.
    (d / "tiny.cu").write_text('extern "C" __global__ void a1(float* a) { a[0] = 1; }\n'
                               'extern "C" __global__ void a2(float* a) { a[0] = 2; }\n')
    made = subprocess.run([_nvcc(), "-cubin", "-arch=sm_100", "-o", str(d / "tiny.cubin"),
                           str(d / "tiny.cu")], capture_output=True)
    if made.returncode == 0:
        out["sm_100"] = (d / "tiny.cubin").read_bytes()
    return out


def check_pruned(original: bytes, pruned: bytes, keep: set) -> None:
    """Everything the pruning promises, checked from the outside."""
    a, b = Image(original), Image(pruned)
    assert len(a.sections) == len(b.sections) and len(a.sym) == len(b.sym)
    assert keep <= b.kernels() < a.kernels()
    assert elf.check_cubin(pruned, sorted(keep)) == []
    # Kept sections: same index, same bytes (string, symbol and summary tables are rebuilt).
    rebuilt = {".shstrtab", ".strtab", ".symtab", ".nv.info", ".nv.callgraph", ".nv.prototype"}
    for sa, sb in zip(a.sections, b.sections):
        if sb.type == 0:
            assert not sb.name and not sb.size and sb.offset == 0
            continue
        assert (sb.name, sb.type, sb.flags, sb.link, sb.info, sb.size if sb.name not in rebuilt else 0) \
            == (sa.name, sa.type, sa.flags, sa.link, sa.info, sa.size if sa.name not in rebuilt else 0)
        if sb.name not in rebuilt:
            assert a.bytes_of(sa) == b.bytes_of(sb), sb.name
        assert not sb.name.startswith((".debug", ".nv_debug", ".rela.debug", ".rel.debug"))
    dropped_sections = {i for i, s in enumerate(b.sections) if s.type == 0 and a.sections[i].type}
    # Symbols: kept ones unchanged; those of dropped sections are null symbols.
    dropped_symbols = set()
    for i, (x, y) in enumerate(zip(a.symbols, b.symbols)):
        if x.section_name is not None and x.shndx in dropped_sections:
            dropped_symbols.add(i)
            assert b.sym[i].tobytes() == bytes(24)
        else:
            assert (y.name, y.value, y.size, y.type, y.bind, y.shndx, y.other) == \
                (x.name, x.value, x.size, x.type, x.bind, x.shndx, x.other)
    for name in a.kernels() - b.kernels():
        assert b.section(f".text.{name}") is None and b.section(f".nv.info.{name}") is None
    # Nothing kept refers to anything dropped.
    for s in b.sections:
        if s.type in (4, 9):
            width = 3 if s.type == 4 else 2
            syms = np.frombuffer(b.bytes_of(s), "<u8").reshape(-1, width)[:, 1] >> np.uint64(32)
            assert not dropped_symbols & set(syms.tolist()), s.name
    if a.section(".nv.callgraph") is not None:
        # Blocks -1 / -4 hold symbol pairs, -2 / -3 (symbol, prototype string in .strtab).
        want = [(blk, x, y) for blk, x, y in a.callgraph()
                if not (x in dropped_symbols or (blk in (-1, -4) and y in dropped_symbols))]
        assert b.callgraph() == want
    if a.section(".nv.prototype") is not None:
        assert b.prototypes() == [(x, y) for x, y in a.prototypes() if x not in dropped_symbols]
    # No kept function's EIATTR_EXTERNS names a dropped symbol.
    for sec in b.sections:
        if sec.name.startswith(".nv.info."):
            for attr, value in b.info_entries(sec.name):
                if attr == cubin_prune.EIATTR_EXTERNS:
                    used = set(np.frombuffer(value[:len(value) // 4 * 4], "<u4").tolist())
                    assert not used & dropped_symbols, sec.name
    kept_info = [e for e in a.info_entries()
                 if not (e[0] in cubin_prune.FUNCTION_ATTRIBUTES
                         and int.from_bytes(e[1][:4], "little") in dropped_symbols)]
    assert b.info_entries() == kept_info
    # Module variables survive with their initial values.
    assert elf.global_initial_values(pruned) == elf.global_initial_values(original)
    # Program headers: each file-backed segment spans exactly its kept sections.
    for pa, pb in zip(a.ph, b.ph):
        assert (pa["p_type"], pa["p_flags"], pa["p_align"]) == (pb["p_type"], pb["p_flags"], pb["p_align"])
        if pa["p_offset"] == a.elf.header.e_phoff:     # PHDR, and the LOAD of the table
            assert (pb["p_offset"], pb["p_filesz"]) == (b.elf.header.e_phoff, pa["p_filesz"])
            continue
        if pa["p_type"] != 1 or not pa["p_filesz"]:
            continue
        inside = [i for i, s in enumerate(a.sections) if s.type not in (0, 8) and s.size
                  and pa["p_offset"] <= s.offset < pa["p_offset"] + pa["p_filesz"]]
        live = [b.sections[i] for i in inside if b.sections[i].type]
        if live:
            assert pb["p_offset"] == min(s.offset for s in live)
            # The file part may end at the NOBITS tail's alignment, as the original's does.
            slack_a = int(pa["p_offset"] + pa["p_filesz"]) - max(a.sections[i].offset + a.sections[i].size
                                                                 for i in inside)
            slack_b = int(pb["p_offset"] + pb["p_filesz"]) - max(s.offset + s.size for s in live)
            assert 0 <= slack_b < 8 and (slack_b == slack_a or slack_a)
        else:
            assert pb["p_filesz"] == 0
    assert len(pruned) < len(original)


@pytest.mark.parametrize("keep", [{"axpy"}, {"bump", "_Z5scaleIfLi128EEvPT_S0_"}, {"_Z6hiddenPi"}])
def test_fixture_cubin_keeps_exactly_what_was_asked(keep):
    original = SM90.read_bytes()
    result = prune_cubin(original, keep)
    assert result.reason == "" and result.kernels_before == 6
    assert result.kernels_after == len(Image(result.data).kernels())
    check_pruned(original, result.data, keep)


@pytest.mark.parametrize("flavour", ["sm_90", "sm_80", "debug", "lineinfo"])
def test_compiled_cubins(built, flavour):
    original = built[flavour]
    for keep in ({"chained"}, {"via_table"}, {"talker", "_Z4manyILi3EEvPf"}, {"shared_sum"}):
        result = prune_cubin(original, keep)
        assert result.reason == "", (flavour, keep, result.reason)
        check_pruned(original, result.data, keep)
        img = Image(result.data)
        if "via_table" in keep:        # the pointer table's functions stay with the table
            assert any(s.name.startswith(".text.") and "inc" in s.name for s in img.sections) or \
                any(sym.name.endswith("3incf") for sym in img.symbols)


def test_a_kernel_another_one_refers_to_stays(built):
    """taker stores target's address: a relocation in a global constant bank names target, so
    target is kept with it (and nothing else)."""
    for flavour in ("sm_90", "sm_80"):
        result = prune_cubin(built[flavour], {"taker"})
        assert Image(result.data).kernels() == {"taker", "target"}
        check_pruned(built[flavour], result.data, {"taker"})
        assert Image(prune_cubin(built[flavour], {"target"}).data).kernels() == {"target"}


def test_linked_images_keep_their_prototype_strings(built):
    """nvlink output: .nv.prototype and the call graph's -2 / -3 blocks point into .strtab; the
    rebuilt table must still give every kept entry its string (check_pruned compares them), and
    a string offset must not be taken for a symbol (which kept unrelated kernels)."""
    if "linked" not in built:
        pytest.skip("nvlink is not next to nvcc")
    original = built["linked"]
    a = Image(original)
    assert a.section(".nv.prototype") is not None
    assert any(blk in (-2, -3) for blk, _, _ in a.callgraph())
    for keep in ({"talker"}, {"chained"}, {"via_table"}, {"taker"}):
        result = prune_cubin(original, keep)
        assert result.reason == "", (keep, result.reason)
        check_pruned(original, result.data, keep)
    # target's address sits in a module-wide constant bank, so it stays with any cut.
    assert Image(prune_cubin(original, {"talker"}).data).kernels() == {"talker", "target"}
    assert Image(prune_cubin(original, {"chained"}).data).kernels() == {"chained", "target"}


def test_blackwell_images_are_left_whole(built):
    if "sm_100" not in built:
        pytest.skip("this nvcc cannot build sm_100")
    result = prune_cubin(built["sm_100"], {"a1"})
    assert result.data is None and "not one this module knows how to cut" in result.reason


def test_debug_sections_are_dropped(built):
    a = Image(built["debug"])
    assert any(s.name.startswith(".debug") for s in a.sections)   # the flavour has them
    b = Image(prune_cubin(built["debug"], {"chained"}).data)
    assert not any(s.name.startswith((".debug", ".nv_debug")) for s in b.sections)


def test_pruning_again_is_stable():
    original = SM90.read_bytes()
    once = prune_cubin(original, {"axpy", "bump"}).data
    assert prune_cubin(once, {"axpy", "bump"}).reason == cubin_prune.ALL_NEEDED
    twice = prune_cubin(once, {"axpy"})
    assert twice.reason == "" and Image(twice.data).kernels() == {"axpy"}
    direct = Image(prune_cubin(original, {"axpy"}).data)
    for x, y in zip(Image(twice.data).sections, direct.sections):
        assert (x.name, x.type, x.size) == (y.name, y.type, y.size)
        assert Image(twice.data).bytes_of(x) == direct.bytes_of(y)


def test_images_it_will_not_cut_come_back_with_a_reason():
    original = SM90.read_bytes()
    everything = elf.cubin_info(original).kernels
    assert prune_cubin(original, everything).reason == cubin_prune.ALL_NEEDED
    missing = prune_cubin(original, {"axpy", "no_such_kernel"})
    assert missing.data is None and "no_such_kernel" in missing.reason
    rdc = prune_cubin((FIXTURES / "kernels.rdc.sm_90.cubin").read_bytes(), {"axpy"})
    assert rdc.data is None and "executable" in rdc.reason
    # sm_100 images carry "mercury" sections that share file ranges: not cut, left whole.
    merc = prune_cubin((FIXTURES / "kernels.sm_100.cubin").read_bytes(), {"axpy"})
    assert merc.data is None and merc.reason


@pytest.mark.parametrize("cut", [0, 3, 64, 1000, -100])
def test_malformed_images_raise_a_format_error(cut):
    data = bytearray(SM90.read_bytes())
    if cut > 0:
        data = data[:cut]
    else:       # section header table pointed past the end
        data[0x28:0x30] = (len(data) + cut + 4096).to_bytes(8, "little")
    with pytest.raises(BinaryFormatError):
        prune_cubin(bytes(data), {"axpy"})


def test_a_broken_relocation_table_raises():
    img = Image(SM90.read_bytes())
    rela = next(s for s in img.sections if s.type == 4 and s.size)
    data = bytearray(img.data)
    hdr = img.elf.header.e_shoff + rela.index * 64
    data[hdr + 32:hdr + 40] = (rela.size - 3).to_bytes(8, "little")     # sh_size, ragged
    with pytest.raises(BinaryFormatError):
        prune_cubin(bytes(data), {"axpy"})


# ---- the snapshot side ----------------------------------------------------------------------
def _snapshot_with_fixture_image(data=None, names=("axpy", "bump")):
    from synthetic import make_snapshot
    snap = make_snapshot()
    data = SM90.read_bytes() if data is None else data
    h = content_hash(data)
    old = snap.images[0].hash
    image = KernelImage(h, "cubin", 90, tuple(sorted(elf.cubin_info(data).kernels)), data, "test")
    kernels = [dataclasses.replace(snap.kernels[i], name=name, image=h)
               for i, name in enumerate(names)]
    regions = [dataclasses.replace(r, image=h, symbol="c_coeffs", size=64, data=bytes(64),
                                   content_hash=content_hash(bytes(64)))
               if r.kind is RegionKind.MODULE_GLOBAL else r for r in snap.regions]
    assert old != h
    return dataclasses.replace(snap, images=[image], kernels=kernels, regions=regions)


def test_prune_images_renames_the_image_everywhere(tmp_path):
    snap = _snapshot_with_fixture_image()
    seen = []

    def check(original, pruned, kernels, variables):
        seen.append((kernels, sorted(variables)))
        return None
    out = snapfile.prune_images(snap, check=check)
    assert seen == [(["axpy", "bump"], ["c_coeffs", "c_scale", "g_counter", "g_table"])]
    # (every kernel the cut image holds is compared: here exactly the two launched ones)
    (im,) = out.images
    assert im.hash == content_hash(im.data) != snap.images[0].hash
    assert set(im.names) == {"axpy", "bump"} and "pruned: 2 of 6 kernels" in im.source
    assert all(k.image == im.hash for k in out.kernels)
    assert [r.image for r in out.regions if r.kind is RegionKind.MODULE_GLOBAL] == [im.hash]
    (entry,) = out.meta["pruned_images"]
    assert entry["from"] == snap.images[0].hash and entry["kernels"] == [6, 2]
    # The caller's snapshot is left as it was.
    assert snap.images[0].data == SM90.read_bytes() and snap.kernels[0].image == snap.images[0].hash
    # The file round-trips and validates; info reports the cut.
    path = tmp_path / "p.cgsnap"
    snapfile.save(path, out, prune=False)
    back, f = snapfile.read(path)
    try:
        assert back.images[0].data == im.data and back.kernels[0].image == im.hash
        from cgsnap.tools import render
        text = render.info_text(render.info_dict(back, f.blobs, f.version, str(path)))
    finally:
        f.close()
    assert "images    1 cut down to the kernels used" in text


def test_a_failed_check_keeps_the_image_whole():
    snap = _snapshot_with_fixture_image()
    out = snapfile.prune_images(snap, check=lambda *a: "kernel axpy: attributes differ")
    assert out.images[0].data == snap.images[0].data
    assert out.kernels[0].image == snap.images[0].hash
    assert out.meta["unpruned_images"] == [{"image": snap.images[0].hash,
                                            "why": "kernel axpy: attributes differ"}]
    assert "pruned_images" not in out.meta
    from cgsnap.tools import render
    text = render.info_text(render.info_dict(out))
    assert "images    1 kept whole, e.g. kernel axpy: attributes differ" in text


def test_without_a_gpu_images_stay_whole(monkeypatch):
    """No GPU (CI): the installed checker says why, whatever context the caller had current."""
    from cgsnap.cuda import driver
    from cgsnap.errors import CgsnapError

    def no_device():
        raise CgsnapError("no CUDA device (this test)")
    monkeypatch.setattr(driver, "context_current", lambda: True)   # the ambient state is ignored
    monkeypatch.setattr(driver, "current_device", no_device)       # as on CI, on a GPU machine too
    snap = _snapshot_with_fixture_image()
    out = snapfile.prune_images(snap)
    assert out.images == snap.images and out.kernels == snap.kernels
    assert "no GPU to check cut images on" in out.meta["images_not_pruned"]


def test_an_image_the_cutter_rejects_is_stored_whole(monkeypatch):
    """A library image the driver loaded but the cutter finds malformed must not fail save()."""
    def broken(data, keep):
        raise BinaryFormatError("symbol table entry size 7")
    monkeypatch.setattr(cubin_prune, "prune_cubin", broken)
    snap = _snapshot_with_fixture_image()
    out = snapfile.prune_images(snap, check=lambda *a: None)
    assert out.images[0].data == snap.images[0].data
    assert out.meta["unpruned_images"] == [{"image": snap.images[0].hash,
                                            "why": "symbol table entry size 7"}]


def test_two_images_that_would_cut_to_the_same_bytes_stay_whole(tmp_path):
    """Copies of one library that differ only in a kernel nobody launches: merging them would
    make their module variables one memory, so neither is cut, and the file reads back."""
    snap = _snapshot_with_fixture_image()
    im = snap.images[0]
    img = Image(im.data)
    data = bytearray(im.data)
    data[img.section(".text._Z6hiddenPi").offset + 100] ^= 0xFF
    copy = dataclasses.replace(im, hash=content_hash(bytes(data)), data=bytes(data), source="copy")
    more = [dataclasses.replace(k, id=len(snap.kernels) + i, image=copy.hash)
            for i, k in enumerate(snap.kernels)]
    snap = dataclasses.replace(snap, images=[im, copy], kernels=list(snap.kernels) + more)
    out = snapfile.prune_images(snap, check=lambda *a: None)
    assert [i.data for i in out.images] == [im.data, copy.data]
    assert "pruned_images" not in out.meta
    assert [u["image"] for u in out.meta["unpruned_images"]] == [im.hash, copy.hash]
    path = tmp_path / "copies.cgsnap"
    snapfile.save(path, out, prune=False)
    assert len(_read_images(path)) == 2


@pytest.mark.parametrize("order", ["fresh first", "cut first"])
def test_an_image_that_is_already_another_ones_cut(tmp_path, order):
    """A snapshot of a graph restored from a pruned file, saved with a fresh one: the fresh
    image's cut would be the other image itself. Both orders give a readable file."""
    fresh = _snapshot_with_fixture_image()
    cut = snapfile.prune_images(fresh, check=lambda *a: None)
    assert cut.images[0].hash != fresh.images[0].hash
    both = dataclasses.replace(
        fresh, images=[fresh.images[0], cut.images[0]][::1 if order == "fresh first" else -1],
        kernels=list(fresh.kernels) + [dataclasses.replace(k, id=len(fresh.kernels) + i)
                                       for i, k in enumerate(cut.kernels)])
    out = snapfile.prune_images(both, check=lambda *a: None)
    assert sorted(i.hash for i in out.images) == sorted(i.hash for i in both.images)
    path = tmp_path / "mixed.cgsnap"
    snapfile.save(path, out, prune=False)
    assert len(_read_images(path)) == 2


def test_save_refuses_a_file_that_would_not_read_back(tmp_path):
    """The reader's validation runs before the file is written."""
    snap = _snapshot_with_fixture_image()
    bad = dataclasses.replace(snap, images=snap.images * 2)      # one hash twice
    path = tmp_path / "bad.cgsnap"
    with pytest.raises(FormatError, match="duplicate image hash"):
        snapfile.save(path, bad, prune=False)
    assert not path.exists()


def _read_images(path):
    back, f = snapfile.read(path)
    f.close()
    return back.images


def test_the_check_gets_the_whole_images_variables():
    snap = _snapshot_with_fixture_image()
    seen = []
    snapfile.prune_images(snap, check=lambda o, p, k, v: seen.append(sorted(v)))
    assert seen == [sorted(g.name for g in elf.cubin_info(SM90.read_bytes()).globals)]


def test_save_prunes_by_default_and_prune_false_keeps_images_whole(tmp_path, monkeypatch):
    from cgsnap.cuda import driver
    monkeypatch.delenv("CGSNAP_PRUNE", raising=False)
    monkeypatch.setattr(driver, "current_device", lambda: None)     # a GPU is there
    calls = []
    monkeypatch.setattr(driver, "images_agree", lambda *a: calls.append(a[2]))
    snap = _snapshot_with_fixture_image()
    snapfile.save(tmp_path / "pruned.cgsnap", snap)
    snapfile.save(tmp_path / "whole.cgsnap", snap, prune=False)
    assert calls == [["axpy", "bump"]]
    assert set(elf.cubin_info(_image_of(tmp_path / "pruned.cgsnap")).kernels) == {"axpy", "bump"}
    assert _image_of(tmp_path / "whole.cgsnap") == SM90.read_bytes()


def _image_of(path) -> bytes:
    back, f = snapfile.read(path)
    f.close()
    return bytes(back.images[0].data)


def test_mutated_images_raise_a_format_error_or_come_back_whole_or_cut():
    """Random byte and header damage: prune_cubin raises BinaryFormatError or returns a
    Pruned, never another exception; a cut image still parses and holds what was asked."""
    import random
    original = SM90.read_bytes()
    h = elf.ElfFile(original).header
    hot = [(0, 64), (h.e_shoff, h.e_shoff + 64 * h.e_shnum), (h.e_phoff, h.e_phoff + 56 * h.e_phnum)]
    rng = random.Random(1234)
    outcomes = {"error": 0, "whole": 0, "cut": 0}
    for case in range(400):
        data = bytearray(original)
        for _ in range(rng.choice((1, 2, 4, 8))):
            lo, hi = rng.choice(hot) if rng.random() < 0.7 else (0, len(data))
            pos = rng.randrange(lo, min(hi, len(data)))
            data[pos] = rng.randrange(256)
        try:
            result = prune_cubin(bytes(data), {"axpy"})
        except BinaryFormatError:
            outcomes["error"] += 1
            continue
        if result.data is None:
            assert result.reason
            outcomes["whole"] += 1
        else:
            assert "axpy" in elf.cubin_info(result.data).kernels
            outcomes["cut"] += 1
    assert all(outcomes.values()), outcomes


def test_the_check_covers_kernels_kept_because_another_refers_to_them(built):
    """taker is launched; target stays because taker stores its address: the driver check
    must compare target too."""
    snap = _snapshot_with_fixture_image(built["sm_90"], names=("taker",))
    snap = dataclasses.replace(snap, regions=[r for r in snap.regions
                                              if r.kind is not RegionKind.MODULE_GLOBAL])
    seen = []
    snapfile.prune_images(snap, check=lambda o, p, kernels, v: seen.append(kernels))
    assert seen == [["taker", "target"]]
