"""load() switches the cyclic garbage collector off while it works (a full collection in a
process with a large heap costs more than the whole manifest) and must always put it back."""
import gc
from pathlib import Path

import pytest

import cgsnap
from cgsnap.errors import CgsnapError

SAMPLE = Path(__file__).resolve().parent.parent / "cgsnap" / "tools" / "data" / "sample.cgsnap"


@pytest.mark.parametrize("enabled", [True, False])
def test_load_restores_the_collector_state(enabled, tmp_path):
    bad = tmp_path / "bad.cgsnap"
    bad.write_bytes(SAMPLE.read_bytes()[:-100])
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        for path in (SAMPLE, bad):
            try:
                cgsnap.load(path).close()     # restores where there is a GPU, raises elsewhere
            except CgsnapError:
                pass
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
