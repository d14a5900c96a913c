"""Every crafted input of the attack review (issue #19) ends in a typed error or a bounded
success: each case runs in a fresh process (tests/zygote.py) whose peak RSS and time are
measured -- at most 512 MiB and 10 s each, the defaults of cgsnap.Limits unchanged unless the
case says otherwise. The inputs are built from the specs in tests/crafted.py."""
from __future__ import annotations

import os

import pytest

import crafted

RSS_MIB, SECONDS = 512, 10


def bounded(result: dict) -> dict:
    assert result["outcome"] != "crash", result.get("trace") or result
    assert result["maxrss_mib"] <= RSS_MIB, f"peak RSS {result['maxrss_mib']:.0f} MiB: {result}"
    assert result["seconds"] <= SECONDS, f"took {result['seconds']:.1f} s: {result}"
    return result


def refused(result: dict, budget: str | None = None, kind: str = "LimitError") -> dict:
    bounded(result)
    assert result["outcome"] == "error" and result["type"] == kind, result
    if budget is not None:
        assert result["budget"] == budget and budget in result["message"], result
    return result


def cli(measured, *argv) -> dict:
    return bounded(measured("zygote:cli", *map(str, argv)))


@pytest.fixture
def write(tmp_path):
    def write(name: str, data: bytes) -> str:
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)
    return write


# ---- decompression bombs in snapshot files ---------------------------------------------------

def test_a_kernel_image_claiming_4_gib_in_128_kib_is_refused_by_every_reader(measured, write):
    path = write("image-bomb.cgsnap", crafted.image_bomb(4 * crafted.GiB))
    assert os.path.getsize(path) < 256 * crafted.KiB
    for call in ("crafted:run_read", "crafted:run_load"):
        refused(measured(call, path), "image_bytes")
    verify = cli(measured, "verify", path)
    assert verify["value"] == 1 and "image_bytes" in verify["stderr"], verify
    for command in ("info", "show", "dot"):      # they never decompress an image
        assert cli(measured, command, path)["value"] == 0


def test_five_images_of_2_gib_are_refused_before_any_gpu_work(measured, write):
    path = write("five.cgsnap", crafted.image_bomb(2 * crafted.GiB, images=5))
    refused(measured("crafted:run_load", path), "image_bytes")
    # Raising the per-image budget alone leaves the per-file one: still nothing decompressed.
    refused(measured("crafted:run_load", path, {"image_bytes": 4 * crafted.GiB}), "image_total")


def test_a_region_of_4_gib_in_128_kib_verifies_in_bounded_memory(measured, write):
    path = write("region-bomb.cgsnap", crafted.region_bomb(4 * crafted.GiB))
    result = cli(measured, "verify", path)
    assert result["value"] == 0 and ": OK (" in result["stdout"], result
    assert result["maxrss_mib"] < 256          # decoded through one 16 MiB buffer


@pytest.mark.parametrize("corrupt", ["short", "long", "declared"])
def test_verify_decodes_zstd_regions_and_catches_corrupt_data(measured, write, corrupt):
    path = write(f"{corrupt}.cgsnap", crafted.region_bomb(64 * crafted.MiB, corrupt))
    result = cli(measured, "verify", path)
    assert result["value"] == 1 and "bad zstd data" in result["stderr"], result


def test_verify_checks_decoded_contents_against_the_manifest(measured, write):
    def edit(manifest, blobs):
        manifest["regions"][2]["content_hash"] = "0" * 32
    path = write("wrong-hash.cgsnap", crafted.snapshot_bytes(edit))
    result = cli(measured, "verify", path)
    assert result["value"] == 1 and "content hash" in result["stderr"], result


def test_a_64_mib_manifest_of_empty_maps_is_refused_by_its_object_budget(measured, write):
    path = write("maps.cgsnap", crafted.assemble(crafted.empty_maps_manifest(), []))
    result = cli(measured, "info", path)
    assert result["value"] == 1 and "manifest_objects" in result["stderr"], result


# ---- GPU binaries (cgsnap kernels, the loaded-object scan) -----------------------------------

def test_a_ptx_entry_claiming_1_gib_in_a_32_kb_fatbin_is_refused(measured, write):
    data = crafted.ptx_bomb(1 * crafted.GiB)
    assert len(data) < 40 * crafted.KiB
    path = write("bomb.fatbin", data)
    refused(measured("crafted:run_list_binary", path), "fatbin_entry_bytes")
    result = cli(measured, "kernels", path)
    assert result["value"] == 1 and "fatbin_entry_bytes" in result["stderr"], result


def test_many_section_headers_naming_one_long_string(measured, write):
    # 4096 headers naming the same 1 MB string: each name is decoded once.
    same = write("same.so", crafted.strtab_elf(4096, crafted.MiB, distinct=False))
    assert "no GPU code found" in cli(measured, "kernels", same)["stdout"]
    # ... at 4096 offsets into it: 4 GB of names, refused by the name budget.
    distinct = write("distinct.so", crafted.strtab_elf(4096, crafted.MiB, distinct=True))
    refused(measured("crafted:run_list_binary", distinct), "elf_name_bytes")


def test_a_section_count_over_budget_is_refused_before_the_table_is_read(measured, write):
    data = bytearray(crafted.elf([(0, 0, 0, 0)], b"", count=0))
    table = int.from_bytes(data[40:48], "little")
    data[table + 32:table + 40] = (1 << 30).to_bytes(8, "little")   # section 0's sh_size
    refused(measured("crafted:run_list_binary", write("sections.so", bytes(data))),
            "elf_sections")


def test_overlapping_fatbin_sections_are_refused(measured, write):
    path = write("overlap.so", crafted.overlapping_fatbin_sections(2048))
    result = refused(measured("crafted:run_list_binary", path), kind="BinaryFormatError")
    assert "fatbin sections overlap" in result["message"]


def test_the_fatbin_entry_budget(measured, write):
    path = write("entries.fatbin", crafted.many_entries_fatbin(1001))
    assert bounded(measured("crafted:run_list_binary", path))["value"] == "1001 images"
    refused(measured("crafted:run_list_binary", path, {"fatbin_entries": 1000}),
            "fatbin_entries")
    result = cli(measured, "kernels", path, "--limit", "fatbin_entries=1000")
    assert result["value"] == 1 and "fatbin_entries" in result["stderr"]
