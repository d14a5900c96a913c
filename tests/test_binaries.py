"""CPU tests of the GPU binary parsers (cgsnap.binary.elf, cgsnap.binary.fatbin, cgsnap.binary.binaries).

They run on the nvcc-built files committed under tests/fixtures/ (see scripts/make_fixtures.sh);
without those files they rebuild them when nvcc is available and skip otherwise. pyelftools is
the oracle for ELF structure, and cuobjdump (when on PATH, or named by $CUOBJDUMP) for
architecture names.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from elftools.elf import enums
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgsnap.binary import binaries, elf, fatbin
from cgsnap.errors import BinaryFormatError, CgsnapError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

KERNELS = {"axpy", "bump", "uses_helper", "_Z5scaleIfLi128EEvPT_S0_", "_Z5scaleIdLi64EEvPT_S0_",
           "_Z6hiddenPi"}
GLOBALS = [("g_table", 1024, "global"), ("g_counter", 4, "global"),
           ("c_coeffs", 64, "constant"), ("c_scale", 4, "constant")]

# Cubin fixture -> the architecture nvcc was asked for.
CUBINS = {
    **{f"kernels.{arch}.cubin": arch for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90",
                                                  "sm_90a", "sm_100", "sm_100a", "sm_120")},
    "kernels.rdc.sm_90.cubin": "sm_90",
    # Built by a CUDA 12.9 ptxas: the old ELF ABI below sm_100.
    **{f"kernels.ptxas12.{arch}.cubin": arch for arch in ("sm_80", "sm_90a", "sm_100a")},
}


def _sm80_sm90_ptx90(cubins: str, ptx: str) -> list[tuple[str, str, str]]:
    return [("cubin", "sm_80", cubins), ("cubin", "sm_90", cubins), ("ptx", "sm_90", ptx)]


# Fatbin fixture -> (kind, arch name, compression) of each entry.
FATBINS = {
    "kernels.fatbin": _sm80_sm90_ptx90("none", "zstd"),
    "kernels.balance.fatbin": _sm80_sm90_ptx90("none", "zstd"),
    "kernels.none.fatbin": _sm80_sm90_ptx90("none", "none"),
    "kernels.size.fatbin": _sm80_sm90_ptx90("zstd", "zstd"),
    "kernels.speed.fatbin": _sm80_sm90_ptx90("none", "lz4"),
    "kernels.speed_all.fatbin": _sm80_sm90_ptx90("lz4", "lz4"),
    "kernels.ptx.fatbin": [("ptx", "sm_90", "zstd")],
    "kernels.lto.fatbin": [("ltoir", "sm_90", "zstd")],
    "kernels.variants.fatbin": [("cubin", "sm_90a", "none"), ("ptx", "sm_90a", "zstd"),
                                ("ptx", "sm_100f", "zstd")],
}
HOST_LIBS = ["libkernels.so", "libkernels_rdc.so"]


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    if (FIXTURES / "kernels.fatbin").exists():
        return FIXTURES
    if not shutil.which(os.environ.get("NVCC", "nvcc")):
        pytest.skip("tests/fixtures is missing and nvcc is not available to rebuild it")
    out = tmp_path_factory.mktemp("fixtures")
    subprocess.run(["bash", str(ROOT / "scripts" / "make_fixtures.sh"), str(out)], check=True)
    return out


@pytest.fixture
def load(fixtures_dir):
    """load(name) -> (path, bytes); skips for targets the building nvcc/ptxas could not make."""
    def _load(name: str) -> tuple[Path, bytes]:
        path = fixtures_dir / name
        if not path.exists():
            pytest.skip(f"{name} was not built (target unsupported by nvcc, or PTXAS12 unset)")
        return path, path.read_bytes()
    return _load


def _wheel_cuobjdump():
    """cuobjdump from the nvidia-cuda-cuobjdump wheel (a test extra on x86-64)."""
    import sysconfig
    for sub in ("cu13", "cuda_cuobjdump"):
        path = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / sub / "bin" / "cuobjdump"
        if path.exists():
            return str(path)
    return None


def _cuobjdump() -> str:
    tool = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump") or _wheel_cuobjdump()
    if not tool:
        pytest.skip("cuobjdump not found (set $CUOBJDUMP or put it on PATH)")
    return tool


def _cuobjdump_archs(path: Path) -> dict[str, list[str]]:
    """{'cubin': [...], 'ptx': [...]} architecture names in the order cuobjdump lists them."""
    result = subprocess.run([_cuobjdump(), "--list-elf", "--list-ptx", str(path)],
                            capture_output=True, text=True, check=True)
    found: dict[str, list[str]] = {"cubin": [], "ptx": []}
    # Lines like "ELF file    2: libkernels.2.sm_90.cubin" and "PTX file    1: x.1.sm_100f.ptx".
    for kind, arch in re.findall(r"^(ELF|PTX) file\s+\d+: .*\.(sm_\d+[af]?)\.(?:cubin|ptx)$",
                                 result.stdout, re.M):
        found["cubin" if kind == "ELF" else "ptx"].append(arch)
    return found


def _all_entries(data) -> list[fatbin.Entry]:
    return [e for c in fatbin.iter_containers(data) for e in c.entries]


# --- ELF reader vs pyelftools -----------------------------------------------------------------

def _enum_table(prefix: str) -> dict[str, int]:
    table: dict[str, int] = {}
    for name in dir(enums):
        if name.startswith(prefix):
            table.update({k: v for k, v in getattr(enums, name).items() if isinstance(v, int)})
    return table


_SH_TYPES, _ST_TYPES = _enum_table("ENUM_SH_TYPE"), _enum_table("ENUM_ST_INFO_TYPE")
_ST_BINDS, _ST_SHNDX = _enum_table("ENUM_ST_INFO_BIND"), _enum_table("ENUM_ST_SHNDX")


def _raw(value, table):
    return value if isinstance(value, int) else table[value]


def _assert_matches_pyelftools(data: bytes) -> None:
    ours = elf.ElfFile(data)
    theirs = ELFFile(io.BytesIO(data))
    assert ours.machine == _raw(theirs.header.e_machine, enums.ENUM_E_MACHINE)
    assert ours.e_flags == theirs.header.e_flags
    expected_sections = [
        (s.name, _raw(s["sh_type"], _SH_TYPES), s["sh_offset"], s["sh_size"], s["sh_addr"],
         s["sh_flags"], s["sh_link"], s["sh_info"], s["sh_entsize"], i)
        for i, s in enumerate(theirs.iter_sections())]
    assert [tuple(s) for s in ours.sections] == expected_sections
    for sec, theirs_sec in zip(ours.sections, theirs.iter_sections()):
        if theirs_sec["sh_type"] != "SHT_NOBITS":
            assert bytes(ours.section_data(sec)) == theirs_sec.data()
    table = theirs.get_section_by_name(".symtab") or theirs.get_section_by_name(".dynsym")
    expected_symbols = [
        (s.name, s["st_value"], s["st_size"], _raw(s["st_info"]["type"], _ST_TYPES),
         _raw(s["st_info"]["bind"], _ST_BINDS), _raw(s["st_shndx"], _ST_SHNDX))
        for s in (table.iter_symbols() if table else [])]
    assert [s[:6] for s in ours.symbols()] == expected_symbols


@pytest.mark.parametrize("name", list(CUBINS) + HOST_LIBS)
def test_elf_matches_pyelftools(load, name):
    _assert_matches_pyelftools(load(name)[1])


@pytest.mark.parametrize("name", list(FATBINS) + HOST_LIBS)
def test_embedded_cubins_match_pyelftools(load, name):
    data = load(name)[1]
    views = fatbin.fatbin_sections(elf.ElfFile(data)) if name in HOST_LIBS else [memoryview(data)]
    cubins = [e.payload() for view in views for e in _all_entries(view) if e.kind == "cubin"]
    for cubin in cubins:
        _assert_matches_pyelftools(cubin)


def test_extended_section_numbering(load):
    """e_shnum == 0 and e_shstrndx == SHN_XINDEX defer to section 0, as for > 0xff00 sections."""
    data = load("kernels.sm_90.cubin")[1]
    h = elf.ElfFile(data).header
    extended = _patched(_patched(data, 60, "H", 0), 62, "H", elf.SHN_XINDEX)
    extended = _patched(_patched(extended, h.e_shoff + 32, "Q", h.e_shnum), h.e_shoff + 40, "I",
                        h.e_shstrndx)
    assert [s[:-1] for s in elf.ElfFile(extended).sections[1:]] == \
        [s[:-1] for s in elf.ElfFile(data).sections[1:]]
    assert elf.cubin_info(extended) == elf.cubin_info(data)


def test_section_data_is_zero_copy(load):
    data = load("libkernels.so")[1]
    image = elf.ElfFile(data)
    view = image.section_data(image.section(".nv_fatbin"))
    assert view.obj is data
    assert image.section(".no_such_section") is None


# --- architecture decoding --------------------------------------------------------------------

@pytest.mark.parametrize("e_flags, abiversion, arch, name", [
    # ptxas 12.9, old ABI: SM in the low byte, virtual SM at bit 16, 'a' = 0x800.
    (0x4B054B, 7, 75, "sm_75"), (0x500550, 7, 80, "sm_80"), (0x5A055A, 7, 90, "sm_90"),
    (0x5A0D5A, 7, 90, "sm_90a"),
    # New ABI (ptxas 13 for every SM, ptxas 12.9 from sm_100): SM in bits 8..15, 'a' = 0x8.
    (0x06004B04, 8, 75, "sm_75"), (0x06005A04, 8, 90, "sm_90"), (0x06006402, 8, 100, "sm_100"),
    (0x0600640A, 8, 100, "sm_100a"), (0x06007802, 8, 120, "sm_120"), (0x0E005A04, 8, 90, "sm_90"),
])
def test_arch_decoding(e_flags, abiversion, arch, name):
    assert elf.cuda_arch(e_flags, abiversion) == arch
    assert elf.cuda_arch(e_flags) == arch  # the layout is also recognisable without EI_ABIVERSION
    assert elf.cuda_arch_name(e_flags, abiversion) == name
    assert elf.cuda_arch_name(e_flags) == name


def test_nv_compat_overrides_e_flags():
    # ptxas 13 marks 'a' only in .nv.compat; cuobjdump trusts that attribute over e_flags.
    assert elf.cuda_arch_name(0x06005A04, 8, arch_specific=True) == "sm_90a"
    assert elf.cuda_arch_name(0x0600640A, 8, arch_specific=False) == "sm_100"


@pytest.mark.parametrize("name", CUBINS)
def test_cubin_info(load, name):
    info = elf.cubin_info(load(name)[1])
    assert info.arch_name == CUBINS[name]
    assert elf.cubin_arch_name(load(name)[1]) == CUBINS[name]     # the header-only read
    assert info.arch == int(re.sub(r"\D", "", CUBINS[name]))
    # -rdc gives the internal-linkage kernel a per-compilation prefix.
    assert {re.sub(r"^__nv_static_\w+?_(?=_Z)", "", k) for k in info.kernels} == KERNELS
    assert "_Z5twicef" not in info.kernels and "$uses_helper$_Z5twicef" not in info.kernels
    assert sorted((g.name, g.size, g.space) for g in info.globals) == sorted(GLOBALS)


@pytest.mark.parametrize("name", CUBINS)
def test_global_initial_values(load, name):
    # What a fresh module load gives each variable (kernels.cu: g_counter = 7, c_scale = 3, the
    # arrays uninitialised): the recorder leaves out globals that still hold exactly this.
    values = elf.global_initial_values(load(name)[1])
    assert values == {"g_table": bytes(1024), "g_counter": struct.pack("<i", 7),
                      "c_coeffs": bytes(64), "c_scale": struct.pack("<i", 3)}


@pytest.mark.parametrize("name", CUBINS)
def test_check_cubin_finds_kernels_by_section(load, name):
    data = load(name)[1]
    kernels = elf.cubin_info(data).kernels
    sections = {s.name for s in elf.ElfFile(data).sections}
    assert all(f".text.{k}" in sections for k in kernels)
    assert elf.check_cubin(data, kernels) == []
    # ".rel.text.<k>"-style suffixes in the string table are not sections of that name.
    assert elf.check_cubin(data, ["_Z7missingv", "ext." + kernels[0]]) == ["_Z7missingv", "ext." + kernels[0]]


def test_check_cubin_rejects_broken_tables(load):
    data = bytearray(load("kernels.sm_90.cubin")[1])
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    with pytest.raises(BinaryFormatError, match="section header table"):
        elf.check_cubin(bytes(data[:shoff + 10]), ["x"])
    bad = bytearray(data)
    struct.pack_into("<I", bad, shoff + 64, 0xFFFFFF)       # section 1's name offset
    with pytest.raises(BinaryFormatError, match="section name"):
        elf.check_cubin(bytes(bad), ["x"])
    with pytest.raises(BinaryFormatError, match="not a CUDA cubin"):
        elf.check_cubin(load("libkernels.so")[1], ["x"])
    # No section table at all (count 0, name index "in section 0"): every kernel is missing.
    empty = bytearray(data)
    struct.pack_into("<HH", empty, 0x3C, 0, elf.SHN_XINDEX)     # e_shnum, e_shstrndx
    struct.pack_into("<Q", empty, shoff + 32, 0)                # section 0's sh_size
    assert elf.check_cubin(bytes(empty), ["a", "b"]) == ["a", "b"]


@pytest.mark.parametrize("name", CUBINS)
def test_cubin_arch_matches_cuobjdump(load, name):
    path, data = load(name)
    assert _cuobjdump_archs(path)["cubin"] == [elf.cubin_info(data).arch_name]


def test_old_and_new_elf_abi_fixtures(load):
    old = elf.ElfFile(load("kernels.ptxas12.sm_90a.cubin")[1])
    new = elf.ElfFile(load("kernels.sm_90a.cubin")[1])
    assert (old.abiversion, old.e_flags) == (7, 0x5A0D5A)
    assert new.abiversion == 8 and new.e_flags & 0xFF00 == 90 << 8 and not new.e_flags & 0x8
    assert elf.ElfFile(load("kernels.ptxas12.sm_100a.cubin")[1]).e_flags & elf.EF_CUDA_ACCELERATORS


def test_cubin_info_rejects_host_elf(load):
    with pytest.raises(BinaryFormatError, match="not a CUDA cubin"):
        elf.cubin_info(load("libkernels.so")[1])


# --- fatbin containers ------------------------------------------------------------------------

@pytest.mark.parametrize("name", FATBINS)
def test_fatbin_entries(load, name):
    data = load(name)[1]
    containers = list(fatbin.iter_containers(data))
    assert len(containers) == 1 and containers[0].offset == 0 and containers[0].size == len(data)
    entries = containers[0].entries
    assert [(e.kind, e.arch_name, e.compression) for e in entries] == FATBINS[name]
    for e in entries:
        if e.kind == "ltoir":
            continue  # nvcc encodes LTO-IR payloads; see FLAG_ENCODED
        payload = e.payload()
        if e.kind == "cubin":
            info = elf.cubin_info(payload)
            assert info.arch == e.arch and set(info.kernels) == KERNELS
            assert len(payload) == e.uncompressed_size
        else:
            text = payload.decode()
            assert f".target sm_{e.arch}{e.variant}" in text and ".visible .entry axpy(" in text
            assert not text.endswith("\0")


@pytest.mark.parametrize("name", FATBINS)
def test_fatbin_matches_cuobjdump(load, name):
    path, data = load(name)
    listed = _cuobjdump_archs(path)
    entries = _all_entries(data)
    assert listed["ptx"] == [e.arch_name for e in entries if e.kind == "ptx"]
    # A family ('f') cubin is listed without its suffix: the cubin itself cannot show it.
    assert listed["cubin"] == [e.arch_name.rstrip("f") for e in entries if e.kind == "cubin"]


def test_compression_flags(load):
    """nvcc 13.0: default == balance (zstd, PTX only); size: zstd for all; speed: LZ4, PTX only."""
    def shape(name):
        entries = _all_entries(load(name)[1])
        return [(e.kind, e.flags, e.payload_size, e.uncompressed_size) for e in entries]
    assert shape("kernels.fatbin") == shape("kernels.balance.fatbin")
    for e in _all_entries(load("kernels.size.fatbin")[1]):
        assert e.flags & fatbin.FLAG_COMPRESSED_ZSTD and not e.flags & fatbin.FLAG_COMPRESSED_LZ4
    for e in _all_entries(load("kernels.speed_all.fatbin")[1]):
        assert e.flags & fatbin.FLAG_COMPRESSED_LZ4 and not e.flags & fatbin.FLAG_COMPRESSED_ZSTD
    for e in _all_entries(load("kernels.none.fatbin")[1]):
        assert e.flags & 0xFFFF == fatbin.FLAG_64BIT | fatbin.FLAG_HOST_LINUX


def test_payload_views_and_sizes(load):
    data = load("kernels.speed_all.fatbin")[1]
    for e in _all_entries(data):
        raw = e.raw()
        assert raw.obj is data and len(raw) <= e.payload_size < len(raw) + 8
        payload = e.payload()
        if e.kind == "cubin":
            assert len(payload) == e.uncompressed_size
        else:  # PTX text without its terminating NUL
            assert len(payload) < e.uncompressed_size
    plain = _all_entries(load("kernels.none.fatbin")[1])
    assert all(len(e.raw()) == e.payload_size == e.uncompressed_size for e in plain)


def test_variant_flags(load):
    entries = _all_entries(load("kernels.variants.fatbin")[1])
    assert [e.variant for e in entries] == ["a", "a", "f"]
    assert entries[0].flags & fatbin.FLAG_ARCH_SPECIFIC
    assert entries[2].flags & fatbin.FLAG_FAMILY_SPECIFIC


def test_encoded_ltoir_payload_is_refused(load):
    (entry,) = _all_entries(load("kernels.lto.fatbin")[1])
    assert entry.flags & fatbin.FLAG_ENCODED
    with pytest.raises(BinaryFormatError, match="encoded"):
        entry.payload()


def test_host_library_sections(load):
    lib = elf.ElfFile(load("libkernels.so")[1])
    (section,) = fatbin.fatbin_sections(lib)
    containers = list(fatbin.iter_containers(section))
    # The device-link stub, then one container per object file.
    assert len(containers) == 3
    assert containers[1].offset == containers[0].size
    kernels = [set(elf.cubin_info(e.payload()).kernels) for c in containers[1:] for e in c.entries
               if e.kind == "cubin"]
    assert kernels == [KERNELS, KERNELS, {"fill"}, {"fill"}]
    rdc = elf.ElfFile(load("libkernels_rdc.so")[1])
    assert [len(list(fatbin.iter_containers(v))) for v in fatbin.fatbin_sections(rdc)] == [1, 2]


# --- list_binary ------------------------------------------------------------------------------

def test_list_binary_shared_library(load):
    path = load("libkernels.so")[0]
    records = binaries.list_binary(path)
    assert [(r["container"], r["entry"], r["kind"], r["arch"]) for r in records] == [
        (0, 0, "cubin", "sm_80"), (0, 1, "cubin", "sm_90"),
        (1, 0, "cubin", "sm_80"), (1, 1, "cubin", "sm_90"), (1, 2, "ptx", "sm_90"),
        (2, 0, "cubin", "sm_80"), (2, 1, "cubin", "sm_90"), (2, 2, "ptx", "sm_90")]
    assert {r["section"] for r in records} == {".nv_fatbin"}
    for r in records[2:5]:
        assert set(r["kernels"]) == KERNELS
        assert sorted((g["name"], g["size"], g["space"]) for g in r["globals"]) == sorted(GLOBALS)
    assert records[-1]["kernels"] == ["fill"] and records[-1]["compression"] == "zstd"
    json.dumps(records)


def test_list_binary_rdc_library(load):
    records = binaries.list_binary(load("libkernels_rdc.so")[0])
    relocatable = [r for r in records if r["section"] == "__nv_relfatbin"]
    assert {r["container"] for r in relocatable} == {0, 1}
    assert any("axpy" in r["kernels"] for r in relocatable if r["kind"] == "cubin")


def test_list_binary_fatbin_and_cubin(load):
    records = binaries.list_binary(load("kernels.speed_all.fatbin")[0])
    assert [(r["kind"], r["arch"], r["compression"]) for r in records] == _sm80_sm90_ptx90("lz4", "lz4")
    assert all(r["section"] is None and r["size"] > r["stored_size"] for r in records)
    ptx = records[2]
    assert set(ptx["kernels"]) == KERNELS
    assert sorted((g["name"], g["size"], g["space"]) for g in ptx["globals"]) == sorted(GLOBALS)
    (cubin,) = binaries.list_binary(load("kernels.sm_90a.cubin")[0])
    assert (cubin["container"], cubin["entry"]) == (None, None)
    assert (cubin["arch"], cubin["compression"]) == ("sm_90a", "none")
    assert set(cubin["kernels"]) == KERNELS


@pytest.mark.parametrize("arch", [90, "sm_90", "SM_90a", "compute_90", "90"])
def test_list_binary_arch_filter(load, arch):
    records = binaries.list_binary(load("kernels.fatbin")[0], arch=arch)
    assert [(r["kind"], r["arch"]) for r in records] == [("cubin", "sm_90"), ("ptx", "sm_90")]
    assert binaries.list_binary(load("kernels.sm_80.cubin")[0], arch=arch) == []


def test_list_binary_matches_cuobjdump_on_library(load):
    path = load("libkernels.so")[0]
    listed = _cuobjdump_archs(path)
    records = binaries.list_binary(path)
    for kind in ("cubin", "ptx"):
        assert listed[kind] == [r["arch"] for r in records if r["kind"] == kind]


def test_bad_arch_and_bad_files(tmp_path):
    with pytest.raises(CgsnapError):
        binaries.parse_arch("hopper")
    empty, text = tmp_path / "empty", tmp_path / "text"
    empty.write_bytes(b"")
    text.write_bytes(b"#!/bin/sh\necho not a binary\n")
    for path in (empty, text):
        with pytest.raises(BinaryFormatError, match=re.escape(str(path))):
            binaries.list_binary(path)


def _ptx_fatbin(text: str, arch: int = 90) -> bytes:
    """A one-entry fatbin holding ``text`` as uncompressed PTX, laid out as nvcc does."""
    payload = text.encode() + b"\0" * (8 - len(text) % 8)
    entry = fatbin.ENTRY_HEADER.struct.pack(1, 0x0101, 64, len(payload), 0, 0, 0, 9, arch, 0, 0,
                                            fatbin.FLAG_64BIT | fatbin.FLAG_HOST_LINUX, 0, 0)
    header = fatbin.CONTAINER_HEADER.struct.pack(fatbin.FATBIN_MAGIC, 1, 16, len(entry) + len(payload))
    return header + entry + payload


def test_ptx_declarations():
    text = "\n".join([
        ".extern .func (.param .b32 func_retval0) vprintf",
        ".extern .global .align 4 .b8 other_module[16];",
        ".global .attribute(.managed) .align 4 .u32 m_val;",
        ".global .align 1 .b8 $str[3] = {104, 105};",
        ".visible .global .align 16 .v4 .f32 quads[2][3];",
        ".const .align 8 .f16x2 pair;",
        ".global .align 4 .b8 unsized[];",
        "// .visible .entry commented_out(",
        ".entry _Z13static_kernelPi(",
        ".weak .entry _Z5scaleIfLi128EEvPT_S0_(",
        "\t.visible .entry axpy(",
    ])
    (record,) = binaries.list_image(_ptx_fatbin(text))
    assert (record["kind"], record["arch"], record["size"]) == ("ptx", "sm_90", len(text) // 8 * 8 + 8)
    assert record["kernels"] == ["_Z13static_kernelPi", "_Z5scaleIfLi128EEvPT_S0_", "axpy"]
    assert record["globals"] == [
        {"name": "m_val", "size": 4, "space": "global"},
        {"name": "quads", "size": 96, "space": "global"},
        {"name": "pair", "size": 4, "space": "constant"},
        {"name": "unsized", "size": None, "space": "global"},
    ]


def test_format_listing(load):
    records = binaries.list_binary(load("libkernels.so")[0])
    text = binaries.format_listing(records, demangle=lambda s: s.upper())
    assert ".nv_fatbin container 1 entry 2: ptx sm_90, " in text
    assert "kernel    AXPY" in text and "constant  C_COEFFS (64 bytes)" in text
    assert "(zstd, " in text
    cubin_text = binaries.format_listing(binaries.list_binary(load("kernels.sm_90.cubin")[0]))
    assert cubin_text.startswith("cubin sm_90, ") and "global    g_table (1024 bytes)" in cubin_text
    assert binaries.format_listing([]) == "no GPU code found"


# --- corrupt input ----------------------------------------------------------------------------

def _parse_everything(data) -> None:
    """Drive every parser over ``data`` the way ``cgsnap kernels`` would."""
    binaries.list_image(data)


def _expect_format_error(data, match: str | None = None) -> None:
    with pytest.raises(BinaryFormatError, match=match):
        _parse_everything(data)


def _elf_boundaries(data: bytes) -> list[int]:
    image = elf.ElfFile(data)
    h = image.header
    table_end = h.e_shoff + h.e_shnum * h.e_shentsize
    cuts = {1, 4, 16, 18, 20, 48, 52, 58, 62, 63, h.e_shoff, table_end - 1}
    cuts.update(h.e_shoff + i * h.e_shentsize + delta for i in range(h.e_shnum) for delta in (0, 20, 63))
    for sec in image.sections:
        cuts.update((sec.offset, sec.offset + sec.size // 2, sec.offset + sec.size - 1))
    return sorted(c for c in cuts if 0 < c < table_end)


@pytest.mark.parametrize("name", ["kernels.sm_90.cubin", "kernels.ptxas12.sm_90a.cubin"])
def test_truncated_cubin(load, name):
    data = load(name)[1]
    for cut in _elf_boundaries(data):
        _expect_format_error(data[:cut])


def test_truncated_host_library(load):
    data = load("libkernels.so")[1]
    image = elf.ElfFile(data)
    for cut in (1, 40, 63, image.header.e_shoff, image.header.e_shoff + 100, len(data) - 1):
        _expect_format_error(data[:cut])
    # A .nv_fatbin section that ends inside its last container.
    section = image.section(".nv_fatbin")
    shrunk = _patched(data, image.header.e_shoff + section.index * 64 + 32, "Q", section.size - 8)
    _expect_format_error(shrunk, ".nv_fatbin: fatbin container at offset")


def _entry_boundaries(data: bytes) -> list[int]:
    cuts = set(range(1, 17))
    for e in _all_entries(data):
        cuts.update((e.offset, e.offset + 1, e.offset + 8, e.offset + 63, e.offset + e.header_size,
                     e.offset + e.header_size + e.payload_size // 2))
    cuts.add(len(data) - 1)
    return sorted(c for c in cuts if 0 < c < len(data))


@pytest.mark.parametrize("name", ["kernels.fatbin", "kernels.speed_all.fatbin",
                                  "kernels.variants.fatbin"])
def test_truncated_fatbin(load, name):
    data = load(name)[1]
    for cut in _entry_boundaries(data):
        _expect_format_error(data[:cut])


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def test_fatbin_header_corruption(load):
    data = load("kernels.fatbin")[1]
    flipped = _patched(data, 0, "I", 0xBA55ED51)
    _expect_format_error(flipped, "neither an ELF file nor a fatbin")
    with pytest.raises(BinaryFormatError, match="bad fatbin magic 0xba55ed51 at offset 0"):
        list(fatbin.iter_containers(flipped))
    _expect_format_error(_patched(data, 4, "H", 2), "version")
    _expect_format_error(_patched(data, 6, "H", 8), "header size")
    _expect_format_error(_patched(data, 8, "Q", 2**63), "runs past the end")
    # A container too short for its entries: the last one would run into whatever follows.
    _expect_format_error(_patched(data, 8, "Q", len(data) - 16 - 8), "runs past the end")
    _expect_format_error(data + b"\x01" * 16, f"bad fatbin magic 0x01010101 at offset {len(data)}")
    assert binaries.list_image(data + b"\0" * 24) == binaries.list_image(data)  # linker padding


def test_fatbin_entry_corruption(load):
    data = load("kernels.fatbin")[1]
    first, _, ptx = _all_entries(data)
    _expect_format_error(_patched(data, first.offset + 4, "I", 0), "too small")
    _expect_format_error(_patched(data, first.offset + 4, "I", 0xFFFFFFFF), "runs past the end")
    _expect_format_error(_patched(data, first.offset + 8, "Q", 2**63), "runs past the end")
    # Payload sizes that make an entry overlap the next one.
    _expect_format_error(_patched(data, first.offset + 8, "Q", first.payload_size + 8))
    _expect_format_error(_patched(data, first.offset + 8, "Q", first.payload_size - 8))
    both = first.flags | fatbin.FLAG_COMPRESSED_LZ4 | fatbin.FLAG_COMPRESSED_ZSTD
    _expect_format_error(_patched(data, first.offset + 40, "Q", both), "both LZ4 and zstd")
    _expect_format_error(_patched(data, ptx.offset + 56, "Q", 2**40), "uncompressed size")
    _expect_format_error(_patched(data, ptx.offset + 56, "Q", 0), "uncompressed size")
    _expect_format_error(_patched(data, ptx.offset + 56, "Q", ptx.uncompressed_size + 1), "zstd")
    _expect_format_error(_patched(data, ptx.offset + 16, "I", ptx.payload_size + 1), "compressed size")
    _expect_format_error(_patched(data, ptx.offset + 16, "I", 0), "compressed size")
    _expect_format_error(_patched(data, ptx.offset + 16, "I", len(ptx.raw()) // 2), "zstd")
    # The payload of a cubin entry that is no ELF.
    _expect_format_error(_patched(data, first.offset + first.header_size, "I", 0), "container 0 entry 0")


def test_lz4_corruption(load):
    data = load("kernels.speed_all.fatbin")[1]
    entry = _all_entries(data)[0]
    _expect_format_error(_patched(data, entry.offset + 56, "Q", entry.uncompressed_size + 1), "lz4")
    _expect_format_error(_patched(data, entry.offset + 16, "I", len(entry.raw()) - 7), "lz4")
    garbled = bytearray(data)
    garbled[entry.offset + entry.header_size:entry.offset + entry.header_size + 64] = b"\xff" * 64
    _expect_format_error(bytes(garbled), "lz4")


def test_elf_header_corruption(load):
    data = load("kernels.sm_90.cubin")[1]
    h = elf.ElfFile(data).header
    _expect_format_error(b"\x7fELG" + data[4:], "neither")
    _expect_format_error(data[:4] + b"\x01" + data[5:], "ELF64")
    _expect_format_error(data[:5] + b"\x02" + data[6:], "little-endian")
    _expect_format_error(_patched(data, 58, "H", 40), "section header size")
    _expect_format_error(_patched(data, 40, "Q", 2**63), "section header table")
    _expect_format_error(_patched(data, 60, "H", 0xFFFE), "section header table")
    _expect_format_error(_patched(data, 62, "H", h.e_shnum), "out of range")
    shstrtab = elf.ElfFile(data).sections[h.e_shstrndx]
    _expect_format_error(_patched(data, h.e_shoff + 64, "I", shstrtab.size + 5), "section name")


def test_elf_symbol_table_corruption(load):
    data = load("kernels.sm_90.cubin")[1]
    image = elf.ElfFile(data)
    symtab = image.section(".symtab")
    header = image.header.e_shoff + symtab.index * 64
    _expect_format_error(_patched(data, header + 40, "I", 999), "missing section")  # sh_link
    _expect_format_error(_patched(data, header + 24, "Q", len(data)), "symbol table")  # sh_offset
    _expect_format_error(_patched(data, header + 56, "Q", 16), "entry size")
    _expect_format_error(_patched(data, symtab.offset + 24, "I", 10**6), "symbol name")  # st_name
    _expect_format_error(_patched(data, symtab.offset + 24 + 6, "H", 999), "missing section")  # st_shndx
    compat = image.section(".nv.compat")
    _expect_format_error(_patched(data, compat.offset, "I", 0xFFFF0904), ".nv.compat")  # 64 KiB value


# A few headers and payload bytes are where parsers break, so mutations favour the first bytes.
_POSITIONS = st.one_of(st.integers(0, 255), st.integers(0, 2**20))
_MUTATIONS = st.lists(st.tuples(_POSITIONS, st.integers(0, 255)), min_size=1, max_size=6)


@pytest.mark.parametrize("name", ["kernels.ptx.fatbin", "kernels.speed_all.fatbin",
                                  "kernels.sm_75.cubin"])
def test_fuzzed_input_raises_only_format_errors(load, name):
    data = load(name)[1]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(mutations=_MUTATIONS, cut=st.one_of(st.none(), st.integers(0, len(data))))
    def check(mutations, cut):
        mutated = bytearray(data[:cut])
        for position, value in mutations:
            if mutated:
                mutated[position % len(mutated)] = value
        try:
            _parse_everything(bytes(mutated))
        except BinaryFormatError:
            pass

    check()
