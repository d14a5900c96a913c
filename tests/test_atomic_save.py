"""A save killed at any moment leaves the previous file intact and valid (CPU)."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

from cgsnap.format import fileformat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[3])
from cgsnap.format import fileformat
size = int(sys.argv[2])
blobs = [fileformat.BlobSource(os.urandom(size // 4), compress=(i % 2 == 1)) for i in range(4)]
print("ready", flush=True)
while True:
    fileformat.write_file(sys.argv[1], {"generation": os.getpid()}, blobs)
"""


def test_sigkill_at_random_moments_never_damages_the_previous_file(tmp_path):
    path = tmp_path / "target.cgsnap"
    fileformat.write_file(path, {"generation": 0}, [b"first"])
    rng = random.Random(1234)
    kills, writers = 0, {0}
    for _ in range(100):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(8 << 20), ROOT],
                                stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0, 0.25))
        proc.kill()
        proc.wait()
        kills += 1
        writers.add(proc.pid)
        with fileformat.open_file(path, verify_blobs=True) as f:   # intact and valid
            assert f.manifest["generation"] in writers
    assert kills == 100
    assert any(name.startswith(".target.cgsnap.tmp-") for name in os.listdir(tmp_path)), \
        "some kills should have interrupted a write (else the test proves nothing)"
    fileformat.write_file(path, {"generation": "last"}, [b"last"])
    assert sorted(os.listdir(tmp_path)) == ["target.cgsnap"], "stale temporaries are cleaned"
    assert fileformat.read_manifest(path)["generation"] == "last"
