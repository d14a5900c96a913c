"""Detached signatures of snapshot files: ``FILE.sig`` next to ``FILE``.

The checksums inside a snapshot (XXH3) catch corruption, not tampering: XXH3 is not
collision-resistant. A signature covers a cryptographic digest of every byte of the file:
SHA-256 over the concatenated SHA-256 digests of its 64 MiB pieces (pieces hashed in parallel;
hashlib releases the GIL, so a multi-GB file verifies at several GB/s).

Schemes: ``hmac-sha256`` (a shared secret; Python's ``hmac``) and ``ed25519`` (a key pair,
through the ``cryptography`` package, which is optional). The ``.sig`` file is JSON.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor

from ..errors import SignatureError

SIG_VERSION = 1
PIECE = 64 << 20
_CONTEXT = b"cgsnap-signature-v1\0"


def file_digest(path) -> bytes:
    """SHA-256 of the concatenated SHA-256 digests of the file's 64 MiB pieces."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return hashlib.sha256(b"").digest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                    digests = list(pool.map(
                        lambda off: hashlib.sha256(view[off:off + PIECE]).digest(),
                        range(0, size, PIECE)))
            finally:
                view.release()
    return hashlib.sha256(b"".join(digests)).digest()


def signature_path(path) -> str:
    return os.fspath(path) + ".sig"


def _message(digest: bytes) -> bytes:
    return _CONTEXT + digest


def _ed25519():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("ed25519 signatures need the 'cryptography' package "
                             "(pip install cryptography)") from None
    return ed25519, serialization


def _load_private(key: bytes):
    ed25519, serialization = _ed25519()
    try:
        k = serialization.load_pem_private_key(key, password=None)
    except ValueError as exc:
        raise SignatureError(f"not a PEM private key: {exc}") from None
    if not isinstance(k, ed25519.Ed25519PrivateKey):
        raise SignatureError("the private key is not an Ed25519 key")
    return k


def _load_public(key: bytes):
    ed25519, serialization = _ed25519()
    try:
        k = serialization.load_pem_public_key(key)
    except ValueError as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from None
    if not isinstance(k, ed25519.Ed25519PublicKey):
        raise SignatureError("the public key is not an Ed25519 key")
    return k


def _is_pem(key: bytes) -> bool:
    return key.lstrip().startswith(b"-----BEGIN")


def sign(path, key: bytes) -> str:
    """Write ``path.sig``. ``key``: a PEM Ed25519 private key, else an HMAC secret (>= 16 bytes).
    Returns the signature file's path (written atomically)."""
    digest = file_digest(path)
    if _is_pem(key):
        scheme, sig = "ed25519", _load_private(key).sign(_message(digest))
    else:
        if len(key) < 16:
            raise SignatureError("an HMAC key must be at least 16 bytes")
        scheme, sig = "hmac-sha256", hmac.new(key, _message(digest), hashlib.sha256).digest()
    doc = {"cgsnap_signature": SIG_VERSION, "scheme": scheme, "digest": digest.hex(),
           "signature": sig.hex(), "file": os.path.basename(os.fspath(path))}
    out = signature_path(path)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def verify(path, key: bytes) -> None:
    """Check ``path.sig`` against ``path`` with ``key`` (a PEM Ed25519 public key, else the
    HMAC secret). Raises :class:`SignatureError` naming the file and the problem."""
    sig_path = signature_path(path)
    try:
        with open(sig_path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise SignatureError(f"{path}: no signature ({sig_path} is missing)") from None
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{sig_path}: unreadable signature: {exc}") from None
    if not isinstance(doc, dict) or doc.get("cgsnap_signature") != SIG_VERSION or \
            not isinstance(doc.get("signature"), str) or doc.get("scheme") not in (
                "hmac-sha256", "ed25519"):
        raise SignatureError(f"{sig_path}: not a cgsnap signature of version {SIG_VERSION}")
    try:
        sig = bytes.fromhex(doc["signature"])
    except ValueError:
        raise SignatureError(f"{sig_path}: the signature is not hex") from None
    digest = file_digest(path)
    message = _message(digest)
    if doc["scheme"] == "ed25519":
        if not _is_pem(key):
            raise SignatureError(f"{sig_path}: an ed25519 signature needs a PEM public key")
        from cryptography.exceptions import InvalidSignature
        try:
            _load_public(key).verify(sig, message)
        except InvalidSignature:
            raise SignatureError(f"{path}: the signature does not match the file or the key") \
                from None
    else:
        if _is_pem(key):
            raise SignatureError(f"{sig_path}: an hmac-sha256 signature needs the shared secret")
        if not hmac.compare_digest(sig, hmac.new(key, message, hashlib.sha256).digest()):
            raise SignatureError(f"{path}: the signature does not match the file or the key")
