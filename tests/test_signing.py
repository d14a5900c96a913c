"""Detached signatures: HMAC-SHA256 and Ed25519 over a SHA-256 piece tree of the whole file, the
scheme and the file name; the attacks of issue #19 (verify-then-reopen, empty and public keys
used as HMAC secrets, substituted .sig files) fail."""
import hashlib
import hmac
import json
import os
import shutil

import pytest

import cgsnap
from cgsnap.errors import SignatureError
from cgsnap.format import fileformat, signing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "cgsnap", "tools", "data", "sample.cgsnap")
SECRET = b"a shared secret of enough length"

ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
from cryptography.hazmat.primitives import serialization  # noqa: E402

PRIVATE = ed25519.Ed25519PrivateKey.generate()
PRIVATE_PEM = PRIVATE.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
PUBLIC = PRIVATE.public_key()
PUBLIC_PEM = PUBLIC.public_bytes(serialization.Encoding.PEM,
                                 serialization.PublicFormat.SubjectPublicKeyInfo)
PUBLIC_FORMATS = {
    "pem": PUBLIC_PEM,
    "pem after a comment line": b"# deploy key, do not share\n" + PUBLIC_PEM,
    "pem after a BOM": b"\xef\xbb\xbf" + PUBLIC_PEM,
    "openssh": PUBLIC.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH) + b" user@host\n",
    "der": PUBLIC.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo),
}


@pytest.fixture
def snap(tmp_path):
    path = tmp_path / "s.cgsnap"
    shutil.copy(SAMPLE, path)
    return path


def forge(path, key: bytes, scheme: str = "hmac-sha256", name=None) -> None:
    """Write a .sig an attacker could make with ``key`` as the HMAC secret."""
    name = name or os.path.basename(path)
    digest = signing.file_digest(path)
    message = signing._message(scheme, name, 1, digest)
    doc = {"cgsnap_signature": 2, "scheme": scheme, "file": name, "signed_at": 1,
           "digest": digest.hex(), "signature": hmac.new(key, message, hashlib.sha256).hexdigest()}
    with open(signing.signature_path(path), "w") as f:
        json.dump(doc, f)


def test_hmac_sign_and_verify(snap):
    cgsnap.sign(snap, SECRET)
    info = signing.verify(snap, SECRET)
    assert (info.scheme, info.file) == ("hmac-sha256", "s.cgsnap")
    assert info.digest == signing.file_digest(snap).hex() and info.signed_at > 0
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
    sig = snap.parent / "s.cgsnap.sig"
    sig.write_text("{not json")
    with pytest.raises(SignatureError, match="unreadable"):
        signing.verify(snap, SECRET)
    sig.write_text('{"cgsnap_signature": 2, "scheme": "rot13"}')
    with pytest.raises(SignatureError, match="not a cgsnap signature"):
        signing.verify(snap, SECRET)
    cgsnap.sign(snap, SECRET)
    doc = json.loads(sig.read_text())
    sig.write_text(json.dumps(dict(doc, signed_at=float("nan"))))
    with pytest.raises(SignatureError):
        signing.verify(snap, SECRET)
    sig.write_text(json.dumps({"cgsnap_signature": 1, "scheme": "hmac-sha256", "digest": "00",
                               "signature": "00", "file": "s.cgsnap"}))
    with pytest.raises(SignatureError, match="version 1 signature, which does not bind"):
        signing.verify(snap, SECRET)
    os.unlink(sig)
    os.mkfifo(sig)      # a FIFO would block a plain open() forever
    with pytest.raises(SignatureError, match="not a regular file"):
        signing.verify(snap, SECRET)


def test_short_hmac_keys_are_refused_on_sign_and_on_verify(snap):
    with pytest.raises(SignatureError, match="at least 16 bytes"):
        cgsnap.sign(snap, b"short")
    for key in (b"", b"\n".strip(), b"x" * 15):
        forge(snap, key)                      # a signature anyone can make
        with pytest.raises(SignatureError, match="at least 16 bytes"):
            signing.verify(snap, key)


def test_an_empty_key_file_is_refused_by_the_cli(snap, tmp_path, measured):
    forge(snap, b"")
    key = tmp_path / "empty.key"
    key.write_bytes(b"\n")
    result = measured("zygote:cli", "verify", str(snap), "--key", str(key))
    assert result["value"] == 1 and "at least 16 bytes" in result["stderr"], result


def test_ed25519_in_every_key_format(snap):
    cgsnap.sign(snap, PRIVATE_PEM)
    for name, public in PUBLIC_FORMATS.items():
        assert signing.verify(snap, public).scheme == "ed25519", name
    assert signing.verify(snap, PUBLIC).scheme == "ed25519"          # a key object
    assert signing.verify(snap, PRIVATE_PEM).scheme == "ed25519"     # its public half
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(snap, other)
    with pytest.raises(SignatureError, match="the key given is an HMAC secret"):
        signing.verify(snap, SECRET)
    with pytest.raises(SignatureError, match="cannot sign with a public key"):
        cgsnap.sign(snap, PUBLIC_PEM)


@pytest.mark.parametrize("fmt", sorted(PUBLIC_FORMATS))
def test_a_public_key_is_never_an_hmac_secret(snap, fmt):
    """(c): the .sig names hmac-sha256 and is an HMAC made with the public key, which anyone
    has. The scheme is the key's, so the forgery is refused in every format of the key."""
    public = PUBLIC_FORMATS[fmt]
    forge(snap, public)
    with pytest.raises(SignatureError, match="an hmac-sha256 signature, but the key given is an "
                                             "Ed25519 key"):
        signing.verify(snap, public)


def test_key_material_is_not_an_hmac_secret_even_without_cryptography(snap, monkeypatch):
    monkeypatch.setattr(signing, "_crypto", lambda: None)
    for fmt in ("pem after a comment line", "openssh", "der"):
        forge(snap, PUBLIC_FORMATS[fmt])
        with pytest.raises(SignatureError, match="looks like a public or private key"):
            signing.verify(snap, PUBLIC_FORMATS[fmt])
    forge(snap, SECRET)
    assert signing.verify(snap, SECRET).scheme == "hmac-sha256"
    assert signing.verify(snap, signing.HmacKey(SECRET)).scheme == "hmac-sha256"
    for secret in (b"0" * 50, b"00" + b"ab" * 24, bytes(range(48))):   # no DER look-alikes
        forge(snap, secret)
        assert signing.verify(snap, secret).scheme == "hmac-sha256"


def test_the_signed_file_name_is_checked(snap, tmp_path):
    """(d): another signed file and its .sig put in this one's place are refused."""
    other = tmp_path / "other.cgsnap"
    shutil.copy(SAMPLE, other)
    data = bytearray(other.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    cgsnap.sign(other, SECRET)
    shutil.copy(other, snap)
    shutil.copy(signing.signature_path(other), signing.signature_path(snap))
    with pytest.raises(SignatureError, match="for a file named 'other.cgsnap', not 's.cgsnap'"):
        signing.verify(snap, SECRET)
    # Editing the name in the .sig breaks the signature, which covers it.
    sig = json.loads(open(signing.signature_path(snap)).read())
    with open(signing.signature_path(snap), "w") as f:
        json.dump(dict(sig, file="s.cgsnap"), f)
    with pytest.raises(SignatureError, match="does not match"):
        signing.verify(snap, SECRET)


def test_the_verified_descriptor_is_what_is_read_even_if_the_path_is_swapped(snap, tmp_path,
                                                                              monkeypatch):
    """(a) verify-then-reopen: the path is replaced right after the check; what the reader
    parses is still the file that was verified."""
    cgsnap.sign(snap, SECRET)
    evil = tmp_path / "evil.cgsnap"
    fileformat.write_file(evil, {"evil": True}, [])
    real_verify = signing.verify_fd

    def verify_then_swap(fd, path, key):
        info = real_verify(fd, path, key)
        os.replace(evil, snap)
        return info
    monkeypatch.setattr(signing, "verify_fd", verify_then_swap)
    with fileformat.open_file(snap, signature_key=SECRET, verify_blobs=True) as f:
        assert "evil" not in f.manifest and f.signature.file == "s.cgsnap"
        assert not f.private_copy


def test_a_file_others_can_write_is_read_from_a_sealed_private_copy(snap, monkeypatch):
    """(a) in-place edits after the check: a file someone else could change is copied into
    sealed memory before it is verified; the edit does not reach the reader."""
    cgsnap.sign(snap, SECRET)
    os.chmod(snap, 0o666)
    original = snap.read_bytes()
    real_verify = signing.verify_fd

    def verify_then_edit(fd, path, key):
        info = real_verify(fd, path, key)
        with open(path, "r+b") as f:       # same inode, new bytes
            f.seek(64)
            f.write(b"\xff" * 256)
        return info
    monkeypatch.setattr(signing, "verify_fd", verify_then_edit)
    with fileformat.open_file(snap, signature_key=SECRET, verify_blobs=True) as f:
        assert f.private_copy
        address, length = f.mapping_address()
        assert length == len(original)
    assert snap.read_bytes() != original            # the edit happened, to the file only
    # The same file owned by another user (this suite runs as root, which can give it away;
    # elsewhere the uid check is simulated) is copied too.
    os.chmod(snap, 0o644)
    monkeypatch.setattr(signing, "verify_fd", real_verify)
    snap.write_bytes(original)
    if os.geteuid() == 0:
        os.chown(snap, 4242, 4242)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with fileformat.open_file(snap, signature_key=SECRET) as f:
        assert f.private_copy


def test_load_reads_what_it_verified(snap, tmp_path, monkeypatch):
    """``cgsnap.load(require_signature=)``: the model the restore plans from is the verified
    file's, though the path was swapped after the check (stopped before any GPU work)."""
    from cgsnap.restore.restored import Restored
    cgsnap.sign(snap, SECRET)
    expected = cgsnap.read(snap).meta
    evil = tmp_path / "evil.cgsnap"
    fileformat.write_file(evil, {"evil": True}, [])
    real_verify = signing.verify_fd
    seen = {}

    def verify_then_swap(fd, path, key):
        info = real_verify(fd, path, key)
        os.replace(evil, snap)
        return info

    def stop(self, device):
        seen["meta"] = self.snapshot.meta
        raise cgsnap.CompatibilityError("stop before the GPU")
    monkeypatch.setattr(signing, "verify_fd", verify_then_swap)
    monkeypatch.setattr(Restored, "_setup_gpu", stop)
    with pytest.raises(cgsnap.CompatibilityError, match="stop before the GPU"):
        cgsnap.load(snap, require_signature=SECRET)
    assert seen["meta"] == expected


def test_load_refuses_an_unsigned_file_before_gpu_work(snap):
    with pytest.raises(SignatureError, match="no signature"):
        cgsnap.load(snap, require_signature=SECRET)


def test_sign_never_follows_a_planted_temporary(snap, tmp_path, monkeypatch):
    """A symlink at the temporary name the writer will use (once predictable: .sig.tmp-PID)
    does not redirect the write: temporaries are made with O_EXCL | O_NOFOLLOW."""
    from cgsnap import _fs
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    sig = signing.signature_path(snap)
    os.symlink(victim, f"{sig}.tmp-{os.getpid()}")
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(_fs.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim, f"{os.path.dirname(sig)}/.s.cgsnap.sig.tmp-{os.getpid()}-{'0' * 16}")
    cgsnap.sign(snap, SECRET)
    assert victim.read_bytes() == b"precious"
    assert signing.verify(snap, SECRET).scheme == "hmac-sha256"


def test_cli_sign_and_verify(snap, tmp_path, measured):
    key = tmp_path / "secret.key"
    key.write_bytes(SECRET + b"\n")
    assert measured("zygote:cli", "sign", str(snap), "--key", str(key))["value"] == 0
    ok = measured("zygote:cli", "verify", str(snap), "--key", str(key))
    assert ok["value"] == 0 and "signature OK" in ok["stdout"], ok
    key.write_bytes(b"x" * 32)
    bad = measured("zygote:cli", "verify", str(snap), "--key", str(key))
    assert bad["value"] == 1 and "does not match" in bad["stderr"]
    pem = tmp_path / "private.key"          # key material keeps its bytes (no .pem needed)
    pem.write_bytes(PRIVATE_PEM)
    assert measured("zygote:cli", "sign", str(snap), "--key", str(pem))["value"] == 0
    public = tmp_path / "id.pub"
    public.write_bytes(PUBLIC_FORMATS["openssh"])
    ok = measured("zygote:cli", "verify", str(snap), "--key", str(public))
    assert ok["value"] == 0 and "ed25519" in ok["stdout"], ok
