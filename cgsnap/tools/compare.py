"""How two versions of one buffer differ: the one comparison behind ``diff``, ``replay --check``
and ``bisect``.

Bytes are compared exactly; a buffer with a dtype is also compared element by element
(bit-exact: ``-0.0`` and ``0.0`` differ, two NaNs with the same bits do not), and for float
dtypes the size of the differences (max abs, max rel) and the NaN / Inf counts of each side are
reported. The input is two streams of chunks, read in bounded windows: a region of many GB is
never held whole. bfloat16 and the float8 formats have no numpy dtype and are decoded here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

WINDOW = 4 << 20           # bytes compared at a time (decoded to float64: 8x that per side)


# ---- element decoding ------------------------------------------------------------------------

def _fp8_table(exp_bits: int, bias: int, fnuz: bool, ieee: bool) -> np.ndarray:
    """float64 value of each of the 256 codes of an 8-bit float format."""
    man_bits = 7 - exp_bits
    out = np.empty(256, dtype=np.float64)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        e = (code >> man_bits) & ((1 << exp_bits) - 1)
        m = code & ((1 << man_bits) - 1)
        if fnuz and code == 0x80:
            out[code] = np.nan
            continue
        if ieee and e == (1 << exp_bits) - 1:
            out[code] = sign * np.inf if m == 0 else np.nan
            continue
        if not ieee and not fnuz and e == (1 << exp_bits) - 1 and m == (1 << man_bits) - 1:
            out[code] = np.nan            # e4m3fn: S.1111.111 is NaN, there is no Inf
            continue
        if e == 0:
            out[code] = sign * m / (1 << man_bits) * 2.0 ** (1 - bias)
        else:
            out[code] = sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
    return out


_FP8 = {
    "float8_e4m3fn": (4, 7, False, False),
    "float8_e5m2": (5, 15, False, True),
    "float8_e4m3fnuz": (4, 8, True, False),
    "float8_e5m2fnuz": (5, 16, True, False),
}
_fp8_tables: dict = {}


@dataclass(frozen=True)
class Elements:
    """How a dtype's elements are read: ``kind`` float / int / bytes."""
    name: str
    itemsize: int
    kind: str
    word: np.dtype          # unsigned integer of itemsize bytes: bit-exact comparison

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """float64 (float kind) or int64 / float64 (int kind) values of ``raw`` (uint8)."""
        name = self.name
        if name == "bfloat16":
            return (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32) \
                .astype(np.float64)
        if name in _FP8:
            table = _fp8_tables.get(name)
            if table is None:
                table = _fp8_tables[name] = _fp8_table(*_FP8[name])
            return table[raw]
        dt = np.dtype(name)
        if dt.kind == "c":
            dt = np.dtype(f"<f{dt.itemsize // 2}")
        values = raw.view(dt.newbyteorder("<"))
        if dt.kind == "u" and dt.itemsize == 8:
            return values.astype(np.float64)
        return values.astype(np.float64 if self.kind == "float" else np.int64)


def elements(dtype: Optional[str]) -> Elements:
    """How buffers of ``dtype`` (numpy / torch names, as regions record them) are compared."""
    if dtype == "bfloat16":
        return Elements(dtype, 2, "float", np.dtype("<u2"))
    if dtype in _FP8:
        return Elements(dtype, 1, "float", np.dtype("u1"))
    if dtype:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            dt = None
        if dt is not None and dt.kind in "fc" and dt.itemsize in (2, 4, 8, 16):
            item = dt.itemsize // 2 if dt.kind == "c" else dt.itemsize
            if item in (2, 4, 8):
                return Elements(dtype, item, "float", np.dtype(f"<u{item}"))
        if dt is not None and dt.kind in "iub" and dt.itemsize in (1, 2, 4, 8):
            return Elements(dtype, dt.itemsize, "int", np.dtype(f"<u{dt.itemsize}"))
    return Elements("bytes", 1, "bytes", np.dtype("u1"))


# ---- the comparison ------------------------------------------------------------------------------

@dataclass
class Comparison:
    """A (reference) against B. Element counts and indices are in elements of ``dtype``
    (complex: of its real and imaginary parts); for ``bytes``, in bytes."""
    dtype: str
    itemsize: int
    size_a: int
    size_b: int
    differing_bytes: int = 0
    first_byte: int = -1
    elements: int = 0
    differing: int = 0
    first_index: int = -1
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None        # |b - a| / |a| over differing elements with a != 0
    nan: list = field(default_factory=lambda: [0, 0])    # in A, in B
    inf: list = field(default_factory=lambda: [0, 0])

    @property
    def equal(self) -> bool:
        return self.size_a == self.size_b and self.differing_bytes == 0

    @property
    def is_float(self) -> bool:
        return elements(self.dtype).kind == "float"

    def to_json(self) -> dict:
        out = {"dtype": self.dtype, "size": [self.size_a, self.size_b], "equal": self.equal,
               "differing_bytes": self.differing_bytes, "first_byte": self.first_byte,
               "elements": self.elements, "differing_elements": self.differing,
               "first_index": self.first_index}
        if self.is_float:
            out.update(max_abs=_json_float(self.max_abs), max_rel=_json_float(self.max_rel),
                       nan=list(self.nan), inf=list(self.inf))
        elif self.max_abs is not None:
            out["max_abs"] = _json_float(self.max_abs)
        return out

    def summary(self, a: str = "A", b: str = "B") -> str:
        """One line, e.g. ``12 of 4096 float32 elements differ, first at index 17 (byte 0x44);
        max abs 0.0015, max rel 0.00021; NaN 0 / 3, Inf 0 / 0 (A / B)``."""
        parts = []
        if self.size_a != self.size_b:
            parts.append(f"sizes differ: {self.size_a} vs {self.size_b} bytes, "
                         f"the first {min(self.size_a, self.size_b)} compared")
        if self.differing_bytes == 0:
            parts.append("contents equal" if not parts else "the common bytes are equal")
            return "; ".join(parts)
        if self.dtype == "bytes":
            parts.append(f"{self.differing_bytes} of {self.elements} bytes differ, first at "
                         f"byte {self.first_byte:#x}")
            return "; ".join(parts)
        unit = f"{self.dtype} elements"
        line = f"{self.differing} of {self.elements} {unit} differ ({self.differing_bytes} " \
               f"byte{'s' if self.differing_bytes != 1 else ''})"
        if self.first_index >= 0:
            line += f", first at index {self.first_index} (byte offset " \
                    f"{self.first_index * self.itemsize:#x})"
        else:
            line += f"; the {self.differing_bytes} differing bytes lie after the last whole " \
                    f"element, first at byte {self.first_byte:#x}"
        parts.append(line)
        if self.max_abs is not None:
            line = f"max abs {_num(self.max_abs)}"
            if self.max_rel is not None:
                line += f", max rel {_num(self.max_rel)}"
            parts.append(line)
        if self.is_float and (any(self.nan) or any(self.inf)):
            parts.append(f"NaN {self.nan[0]} / {self.nan[1]}, Inf {self.inf[0]} / {self.inf[1]} "
                         f"({a} / {b})")
        return "; ".join(parts)


def _num(x: float) -> str:
    return f"{x:.6g}"


def _json_float(x):
    if x is None:
        return None
    return x if np.isfinite(x) else str(x)


class _Reader:
    """Reads exactly ``n`` bytes at a time (fewer at the end) from chunks of any size."""

    def __init__(self, chunks: Iterable):
        self._it = iter(chunks)
        self._rest = np.zeros(0, dtype=np.uint8)

    def read(self, n: int) -> np.ndarray:
        parts, have = [], 0
        if len(self._rest):
            parts.append(self._rest[:n])
            have = len(parts[0])
            self._rest = self._rest[have:]
        while have < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            view = np.frombuffer(chunk, dtype=np.uint8) if not isinstance(chunk, np.ndarray) \
                else chunk.reshape(-1).view(np.uint8)
            take = view[:n - have]
            parts.append(take)
            have += len(take)
            self._rest = view[len(take):]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)


def compare_streams(a_chunks: Iterable, b_chunks: Iterable, size_a: int, size_b: int,
                    dtype: Optional[str] = None, window: int = WINDOW) -> Comparison:
    """Compare two buffers given as chunk streams (bytes-like or numpy), ``a`` the reference."""
    el = elements(dtype)
    window = max(el.itemsize, window - window % el.itemsize)
    out = Comparison(el.name, el.itemsize, size_a, size_b)
    ra, rb = _Reader(a_chunks), _Reader(b_chunks)
    common = min(size_a, size_b)
    pos = 0
    while pos < common:
        n = min(window, common - pos)
        a, b = ra.read(n), rb.read(n)
        if len(a) != n or len(b) != n:
            raise ValueError(f"a stream ended at byte {pos + min(len(a), len(b))}, before its "
                             f"declared size")
        _window(out, el, a, b, pos)
        pos += n
    if el.kind == "bytes":
        out.elements = common
    return out


def compare_arrays(a, b, dtype: Optional[str] = None) -> Comparison:
    """:func:`compare_streams` of two buffers in memory."""
    a = np.frombuffer(a, dtype=np.uint8) if not isinstance(a, np.ndarray) else a.reshape(-1).view(np.uint8)
    b = np.frombuffer(b, dtype=np.uint8) if not isinstance(b, np.ndarray) else b.reshape(-1).view(np.uint8)
    return compare_streams([a], [b], a.nbytes, b.nbytes, dtype)


def _window(out: Comparison, el: Elements, a: np.ndarray, b: np.ndarray, base: int) -> None:
    ne = a != b
    nbytes = int(np.count_nonzero(ne))
    if nbytes and out.first_byte < 0:
        out.first_byte = base + int(np.argmax(ne))
    out.differing_bytes += nbytes
    if el.kind == "bytes":
        if nbytes and out.first_index < 0:
            out.first_index = out.first_byte
        out.differing += nbytes
        return
    whole = len(a) - len(a) % el.itemsize
    count = whole // el.itemsize
    first_element = base // el.itemsize
    out.elements += count
    if not count:
        return
    aw, bw = a[:whole].view(el.word), b[:whole].view(el.word)
    diff = aw != bw
    nd = int(np.count_nonzero(diff))
    if nd and out.first_index < 0:
        out.first_index = first_element + int(np.argmax(diff))
    out.differing += nd
    if el.kind == "float":
        fa, fb = el.decode(a[:whole]), el.decode(b[:whole])
        out.nan[0] += int(np.count_nonzero(np.isnan(fa)))
        out.nan[1] += int(np.count_nonzero(np.isnan(fb)))
        out.inf[0] += int(np.count_nonzero(np.isinf(fa)))
        out.inf[1] += int(np.count_nonzero(np.isinf(fb)))
        if not nd:
            return
        da, db = fa[diff], fb[diff]
        finite = np.isfinite(da) & np.isfinite(db)
        if finite.any():
            d = np.abs(db[finite] - da[finite])
            _raise_max(out, "max_abs", float(d.max()))
            ref = np.abs(da[finite])
            nz = ref != 0
            if nz.any():
                _raise_max(out, "max_rel", float((d[nz] / ref[nz]).max()))
    elif nd:
        va, vb = el.decode(a[:whole])[diff], el.decode(b[:whole])[diff]
        d = np.abs(vb.astype(np.float64) - va.astype(np.float64))
        _raise_max(out, "max_abs", float(d.max()))


def _raise_max(out: Comparison, name: str, value: float) -> None:
    old = getattr(out, name)
    if old is None or value > old:
        setattr(out, name, value)


def format_values(raw: np.ndarray, dtype: Optional[str], start: int, count: int) -> list:
    """Text of elements ``start .. start+count`` of ``raw`` (uint8), per ``dtype``."""
    el = elements(dtype)
    lo, hi = start * el.itemsize, (start + count) * el.itemsize
    chunk = raw[lo:hi]
    chunk = chunk[:len(chunk) - len(chunk) % el.itemsize]
    if el.kind == "bytes":
        return [f"{int(x):#04x}" for x in chunk]
    values = el.decode(chunk)
    if el.kind == "float":
        return [_num(float(v)) for v in values]
    return [str(int(v)) for v in values]
