"""Detached signatures: HMAC-SHA256 and Ed25519 over a SHA-256 piece tree of the whole file."""
import os
import shutil
import subprocess
import sys

import pytest

import cgsnap
from cgsnap.errors import SignatureError
from cgsnap.format import signing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "cgsnap", "tools", "data", "sample.cgsnap")
SECRET = b"a shared secret of enough length"


@pytest.fixture
def snap(tmp_path):
    path = tmp_path / "s.cgsnap"
    shutil.copy(SAMPLE, path)
    return path


def test_hmac_sign_and_verify(snap):
    cgsnap.sign(snap, SECRET)
    signing.verify(snap, SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(snap, b"another secret of enough length")


def test_any_changed_byte_breaks_the_signature(snap):
    cgsnap.sign(snap, SECRET)
    data = bytearray(snap.read_bytes())
    for pos in (0, 100, len(data) // 2, len(data) - 1):
        changed = bytearray(data)
        changed[pos] ^= 1
        snap.write_bytes(bytes(changed))
        with pytest.raises(SignatureError):
            signing.verify(snap, SECRET)


def test_missing_or_garbled_signature(snap):
    with pytest.raises(SignatureError, match="no signature"):
        signing.verify(snap, SECRET)
    (snap.parent / "s.cgsnap.sig").write_text("{not json")
    with pytest.raises(SignatureError, match="unreadable"):
        signing.verify(snap, SECRET)
    (snap.parent / "s.cgsnap.sig").write_text('{"cgsnap_signature": 1, "scheme": "rot13"}')
    with pytest.raises(SignatureError, match="not a cgsnap signature"):
        signing.verify(snap, SECRET)


def test_short_hmac_key_refused(snap):
    with pytest.raises(SignatureError, match="at least 16 bytes"):
        cgsnap.sign(snap, b"short")


def test_ed25519(snap):
    crypto = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    from cryptography.hazmat.primitives import serialization
    key = crypto.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    cgsnap.sign(snap, private)
    signing.verify(snap, public)
    other = crypto.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(snap, other)
    with pytest.raises(SignatureError, match="needs a PEM public key"):
        signing.verify(snap, SECRET)


def test_load_refuses_an_unsigned_file_before_gpu_work(snap):
    # No GPU needed: the signature is checked before anything else.
    with pytest.raises(SignatureError, match="no signature"):
        cgsnap.load(snap, require_signature=SECRET)


def test_cli_sign_and_verify(snap, tmp_path):
    key = tmp_path / "secret.key"
    key.write_bytes(SECRET)
    run = lambda *a: subprocess.run([sys.executable, "-m", "cgsnap", *a], capture_output=True,
                                    text=True, cwd=ROOT)
    assert run("sign", str(snap), "--key", str(key)).returncode == 0
    ok = run("verify", str(snap), "--key", str(key))
    assert ok.returncode == 0 and "signature OK" in ok.stdout
    key.write_bytes(b"x" * 32)
    bad = run("verify", str(snap), "--key", str(key))
    assert bad.returncode == 1 and "does not match" in bad.stderr
