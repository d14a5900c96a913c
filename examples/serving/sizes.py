"""Batch sizes a serving engine captures (no torch here: scripts/bench.py and the CPU tests use
it too)."""
from __future__ import annotations

# vLLM's default capture sizes: 1, 2, 4, then every 8 up to 512 -- 67 graphs.
DEFAULT_SIZES = (1, 2, 4) + tuple(range(8, 513, 8))
QUICK_SIZES = (1, 2, 4, 8, 16)


def parse_sizes(text: str) -> list:
    """``"1,2,4,8"`` -> ``[1, 2, 4, 8]``; ``"default"`` (or empty) -> the 67 default sizes."""
    if text.strip() in ("", "default"):
        return list(DEFAULT_SIZES)
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"sizes {text!r}: comma-separated batch sizes expected") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes {text!r}: positive, distinct batch sizes expected")
    return sizes


def check_sizes(sizes) -> list:
    """The sizes whose logits are compared bit for bit: smallest, 64, middle, largest."""
    s = sorted(sizes)
    return sorted({s[0], s[len(s) // 2], s[-1]} | ({64} & set(s)))
