"""Small pure helpers shared by several layers."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Human-readable binary size.

    >>> format_bytes(1536)
    '1.50 KiB'
    """
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"  # pragma: no cover
