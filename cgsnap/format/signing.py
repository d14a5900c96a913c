"""Detached signatures of snapshot files: ``FILE.sig`` next to ``FILE``.

The checksums inside a snapshot (XXH3) catch corruption, not tampering: XXH3 is not
collision-resistant. A signature covers a cryptographic digest of every byte of the file:
SHA-256 over the concatenated SHA-256 digests of its 64 MiB pieces (pieces hashed in parallel;
hashlib releases the GIL, so a multi-GB file verifies at several GB/s), together with the
scheme, the file's name and the signing time.

Schemes: ``hmac-sha256`` (a shared secret of at least 16 bytes; Python's ``hmac``) and
``ed25519`` (a key pair, through the ``cryptography`` package, which is optional). The scheme
is the one of the key the *caller* gives, never the one the ``.sig`` names: a key that
``cryptography`` parses (PEM with or without leading text or a BOM, DER, OpenSSH), or that
looks like one, is an Ed25519 key and never an HMAC secret. :class:`HmacKey` says "secret"
explicitly. The ``.sig`` file is JSON (docs/FORMAT.md, "Signatures").

:func:`verify_fd` checks an open descriptor, so that what is verified is what the caller then
reads (:func:`cgsnap.format.fileformat.open_file` with ``signature_key``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import _fs
from ..errors import SignatureError

SIG_VERSION = 2
PIECE = 64 << 20
MIN_HMAC_KEY = 16
MAX_SIG_FILE = 64 << 10
MAX_KEY_FILE = 1 << 20
_CONTEXT = b"cgsnap-signature-v2\0"
_SCHEMES = ("hmac-sha256", "ed25519")


@dataclass(frozen=True)
class SignatureInfo:
    """What a verified signature says: the scheme, the file name it was made for, the
    SHA-256 piece digest (hex) and the signing time (Unix seconds). The signature binds all
    four; it does not say that no *newer* signed version of the file exists: compare
    ``signed_at`` or ``digest`` with what you expect where a rollback matters."""
    scheme: str
    file: str
    digest: str
    signed_at: int


class HmacKey:
    """An HMAC-SHA256 secret, named as such (bytes given to :func:`sign` / :func:`verify` are
    classified: anything that is or looks like a public or private key is not a secret)."""

    __slots__ = ("secret",)

    def __init__(self, secret: bytes):
        self.secret = bytes(secret)

    def __repr__(self) -> str:
        return "HmacKey(<secret>)"


# ---- digests -----------------------------------------------------------------------------------

def fd_digest(fd: int) -> bytes:
    """SHA-256 of the concatenated SHA-256 digests of the 64 MiB pieces of the file open as
    ``fd`` (read through that descriptor, not by name)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return hashlib.sha256(b"").digest()
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                digests = list(pool.map(
                    lambda off: hashlib.sha256(view[off:off + PIECE]).digest(),
                    range(0, size, PIECE)))
        finally:
            view.release()
    return hashlib.sha256(b"".join(digests)).digest()


def file_digest(path) -> bytes:
    """:func:`fd_digest` of the regular file at ``path``."""
    fd = _fs.open_regular(path)
    try:
        return fd_digest(fd)
    finally:
        os.close(fd)


def signature_path(path) -> str:
    return os.fspath(path) + ".sig"


def _message(scheme: str, name: str, signed_at: int, digest: bytes) -> bytes:
    return (_CONTEXT + scheme.encode() + b"\0" + name.encode("utf-8", "surrogateescape") + b"\0"
            + signed_at.to_bytes(8, "little", signed=True) + digest)


# ---- keys --------------------------------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"
_KEY_MARKERS = re.compile(rb"-----BEGIN|PRIVATE KEY|PUBLIC KEY|^\s*(ssh-|ecdsa-|sk-ssh-|sk-ecdsa-)",
                          re.M)


def _looks_like_key(data: bytes) -> bool:
    """Key material that ``cryptography`` may be unable to parse (absent, or another type):
    text markers of PEM / OpenSSH, or DER: a SEQUENCE spanning exactly the data that opens
    like a SubjectPublicKeyInfo (SEQUENCE, then an OID) or a PKCS#8 key (INTEGER version) --
    bytes no text secret holds."""
    if _KEY_MARKERS.search(data):
        return True
    body = _der_body(data, 0)
    if body is None or body != len(data) - _der_header(data, 0):
        return False
    p = _der_header(data, 0)
    if data[p:p + 3] in (b"\x02\x01\x00", b"\x02\x01\x01"):
        return True
    if data[p:p + 1] == b"\x30" and _der_body(data, p) is not None:
        q = p + _der_header(data, p)
        return data[q:q + 1] == b"\x06"
    return False


def _der_header(data: bytes, p: int) -> int:
    """Bytes of the tag and length of the DER item at ``p``."""
    n = data[p + 1] if p + 1 < len(data) else 0
    return 2 if n < 0x80 else 2 + (n & 0x7F)


def _der_body(data: bytes, p: int):
    """The length of the DER SEQUENCE at ``p``, or None if there is none."""
    if len(data) < p + 2 or data[p] != 0x30:
        return None
    n = data[p + 1]
    if n < 0x80:
        return n
    width = n & 0x7F
    if not 1 <= width <= 4 or len(data) < p + 2 + width:
        return None
    return int.from_bytes(data[p + 2:p + 2 + width], "big")


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        return None
    return ed25519, serialization


def _parse_key_material(data: bytes):
    """A ``cryptography`` key object parsed from ``data`` in any format it reads, or None."""
    crypto = _crypto()
    if crypto is None:
        return None
    _, ser = crypto
    text = data[len(_BOM):] if data.startswith(_BOM) else data
    begin = text.find(b"-----BEGIN")
    pem = text[begin:] if begin >= 0 else None
    attempts = []
    if pem is not None:
        attempts += [lambda: ser.load_pem_public_key(pem),
                     lambda: ser.load_pem_private_key(pem, password=None)]
    attempts += [lambda: ser.load_der_public_key(data),
                 lambda: ser.load_der_private_key(data, password=None)]
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(b"#"):
            attempts.append(lambda line=line: ser.load_ssh_public_key(line.strip()))
    if pem is not None:
        attempts.append(lambda: ser.load_ssh_private_key(pem, password=None))
    for attempt in attempts:
        try:
            return attempt()
        except TypeError as exc:           # an encrypted private key
            raise SignatureError(f"cannot use an encrypted private key: {exc}") from None
        except (ValueError, IndexError, AssertionError) + _unsupported():
            continue
    return None


def _unsupported() -> tuple:
    try:
        from cryptography.exceptions import UnsupportedAlgorithm
    except ImportError:
        return ()
    return (UnsupportedAlgorithm,)


def _classify(key, want: str):
    """``(scheme, material)`` of the caller's key: ``want`` is "sign" (a secret or a private
    key) or "verify" (a secret, or a public key; a private key gives its public half)."""
    crypto = _crypto()
    if isinstance(key, HmacKey):
        secret = key.secret
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
        obj = _parse_key_material(data)
        if obj is None:
            if _looks_like_key(data):
                why = ("the 'cryptography' package is not installed (pip install cryptography)"
                       if crypto is None else "cryptography cannot parse it")
                raise SignatureError(f"the key looks like a public or private key, but {why}; it "
                                     "is not used as an HMAC secret (pass HmacKey(secret) if it "
                                     "is one)")
            secret = data
        else:
            return _asymmetric(obj, want)
    elif crypto is not None:
        return _asymmetric(key, want)
    else:
        raise SignatureError(f"a key must be bytes, an HmacKey or a cryptography Ed25519 key, "
                             f"not {type(key).__name__}")
    if len(secret) < MIN_HMAC_KEY:
        raise SignatureError(f"an HMAC key must be at least {MIN_HMAC_KEY} bytes (this one has "
                             f"{len(secret)})")
    return "hmac-sha256", secret


def _asymmetric(obj, want: str):
    ed25519, _ = _crypto()
    if isinstance(obj, ed25519.Ed25519PrivateKey):
        return "ed25519", obj if want == "sign" else obj.public_key()
    if isinstance(obj, ed25519.Ed25519PublicKey):
        if want == "sign":
            raise SignatureError("cannot sign with a public key: give the Ed25519 private key")
        return "ed25519", obj
    raise SignatureError(f"the key is a {type(obj).__name__.lstrip('_')}, not an Ed25519 key "
                         "(cgsnap signs with Ed25519 or HMAC-SHA256)")


def read_key(path) -> bytes:
    """A key file's bytes as :func:`sign` / :func:`verify` take them: a secret loses the
    surrounding whitespace (a trailing newline), key material is kept exactly."""
    try:
        data = _fs.read_regular(path, MAX_KEY_FILE)
    except _fs.UnsafePathError as exc:
        raise SignatureError(f"{path}: cannot read the key: {exc.why}") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the key: {exc.strerror or exc}") from None
    if _looks_like_key(data) or _parse_key_material(data) is not None:
        return data
    return data.strip()


# ---- signing and verifying ---------------------------------------------------------------------

def sign(path, key) -> str:
    """Write ``path.sig``. ``key``: an Ed25519 private key (PEM, DER, OpenSSH, or a
    ``cryptography`` object), or an HMAC secret (bytes or :class:`HmacKey`, >= 16 bytes).
    Returns the signature file's path (written atomically)."""
    scheme, material = _classify(key, "sign")
    fd = _fs.open_regular(path)
    try:
        digest = fd_digest(fd)
    finally:
        os.close(fd)
    name = os.path.basename(os.fspath(path))
    signed_at = int(time.time())
    message = _message(scheme, name, signed_at, digest)
    if scheme == "ed25519":
        sig = material.sign(message)
    else:
        sig = hmac.new(material, message, hashlib.sha256).digest()
    doc = {"cgsnap_signature": SIG_VERSION, "scheme": scheme, "file": name,
           "signed_at": signed_at, "digest": digest.hex(), "signature": sig.hex()}
    out = signature_path(path)
    with _fs.atomic_write(out) as f:
        f.write((json.dumps(doc, indent=1) + "\n").encode())
    return out


def _read_signature(path: str, sig_path: str) -> dict:
    try:
        raw = _fs.read_regular(sig_path, MAX_SIG_FILE)
    except FileNotFoundError:
        raise SignatureError(f"{path}: no signature ({sig_path} is missing)") from None
    except _fs.UnsafePathError as exc:
        raise SignatureError(f"{sig_path}: unreadable signature: {exc.why}") from None
    except OSError as exc:
        raise SignatureError(f"{sig_path}: unreadable signature: {exc.strerror or exc}") from None
    try:
        doc = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:
        raise SignatureError(f"{sig_path}: unreadable signature: {exc}") from None
    if isinstance(doc, dict) and doc.get("cgsnap_signature") == 1:
        raise SignatureError(f"{sig_path}: a version 1 signature, which does not bind the file "
                             "name; sign the file again with this cgsnap")
    fields = {"cgsnap_signature": int, "scheme": str, "file": str, "signed_at": int,
              "digest": str, "signature": str}
    if not isinstance(doc, dict) or set(doc) != set(fields) or \
            any(type(doc[k]) is not t for k, t in fields.items()) or \
            doc["cgsnap_signature"] != SIG_VERSION or doc["scheme"] not in _SCHEMES:
        raise SignatureError(f"{sig_path}: not a cgsnap signature of version {SIG_VERSION}")
    if not re.fullmatch(r"[0-9a-f]{64}", doc["digest"]) or \
            not re.fullmatch(r"(?:[0-9a-f]{2}){1,256}", doc["signature"]):
        raise SignatureError(f"{sig_path}: the digest or signature is not lowercase hex")
    return doc


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def verify_fd(fd: int, path, key) -> SignatureInfo:
    """Check ``path.sig`` against the bytes of the open file ``fd`` (the file at ``path``,
    read through ``fd`` only) with ``key`` (an Ed25519 public key in any format, or the HMAC
    secret). The scheme is the key's; the ``.sig`` must be for the same scheme and for the file
    name ``basename(path)``. Raises :class:`SignatureError` naming the file and the problem."""
    path = os.fspath(path)
    sig_path = signature_path(path)
    scheme, material = _classify(key, "verify")
    doc = _read_signature(path, sig_path)
    if doc["scheme"] != scheme:
        given = "an Ed25519 key" if scheme == "ed25519" else "an HMAC secret"
        raise SignatureError(f"{sig_path}: an {doc['scheme']} signature, but the key given is "
                             f"{given}")
    name = os.path.basename(path)
    if doc["file"] != name:
        raise SignatureError(f"{sig_path}: the signature is for a file named {doc['file']!r}, "
                             f"not {name!r}")
    digest = fd_digest(fd)
    message = _message(scheme, name, doc["signed_at"], digest)
    sig = bytes.fromhex(doc["signature"])
    if scheme == "ed25519":
        from cryptography.exceptions import InvalidSignature
        try:
            material.verify(sig, message)
            ok = True
        except InvalidSignature:
            ok = False
    else:
        ok = hmac.compare_digest(sig, hmac.new(material, message, hashlib.sha256).digest())
    if not ok:
        raise SignatureError(f"{path}: the signature does not match the file or the key")
    return SignatureInfo(scheme, name, digest.hex(), doc["signed_at"])


def verify(path, key) -> SignatureInfo:
    """:func:`verify_fd` of the file at ``path`` (opened once). To read the file you verified,
    open it with ``cgsnap.format.fileformat.open_file(path, signature_key=key)`` instead: a
    second open by name may see another file."""
    try:
        fd = _fs.open_regular(path)
    except _fs.UnsafePathError as exc:
        raise SignatureError(f"{path}: cannot verify: {exc.why}") from None
    except OSError as exc:
        raise SignatureError(f"{path}: cannot verify: {exc.strerror or exc}") from None
    try:
        return verify_fd(fd, path, key)
    finally:
        os.close(fd)
