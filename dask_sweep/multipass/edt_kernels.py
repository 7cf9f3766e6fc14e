"""Numba kernels of the exact Euclidean distance transform.

Axis 0 (the sweep axis) is handled by two scans per column that saturate at
:data:`INF` rows; every other axis by the lower envelope of parabolas of
Felzenszwalb & Huttenlocher (2012), in physical units (``sampling``)::

    f(q) + (x - q*s)^2 for each sample q     lower envelope, left to right
      \\   /\\      /                        v[k]: parabola of segment k
       \\_/  \\____/                          z[k]..z[k+1]: where it is lowest
      ---z1-----z2------> x

All kernels release the GIL so a slab task can run them on several threads.
"""

from __future__ import annotations

import numpy as np

from dask_sweep.runtime.jit import kernel

#: Saturation value of a row distance: "no background voxel in this direction".
INF = 1 << 30


@kernel
def forward_carry(fg: np.ndarray, carry_in: np.ndarray, carry_out: np.ndarray) -> None:
    """Rows from the last row of a slab up to the nearest background above it.

    ``fg`` is ``(rows, plane)`` foreground (nonzero) flags; ``carry_in`` the same
    distance for the row just above the slab (``INF``: none seen yet).
    """
    rows, n = fg.shape
    for p in range(n):
        carry_out[p] = carry_in[p]
    for i in range(rows):
        for p in range(n):
            if fg[i, p]:
                v = carry_out[p] + 1
                carry_out[p] = v if v < INF else INF
            else:
                carry_out[p] = 0


@kernel
def down_edge(fg: np.ndarray, out: np.ndarray) -> None:
    """Rows from the first row of a slab down to the nearest background inside it
    (``INF``: none): the first background row's index, found in row order (the
    reversed scan, on a reversed view of the slab, took 6x as long)."""
    rows, n = fg.shape
    for p in range(n):
        out[p] = INF
    for i in range(rows):
        for p in range(n):
            if out[p] == INF and not fg[i, p]:
                out[p] = i


@kernel
def finite_max(plane: np.ndarray) -> int:
    """The largest value of ``plane`` below ``INF`` (-1: none)."""
    top = -1
    for p in range(plane.shape[0]):
        v = plane[p]
        if v < INF and v > top:
            top = v
    return top


@kernel
def narrow_into(plane: np.ndarray, out: np.ndarray, big: int) -> None:
    """``plane`` into a narrower unsigned ``out`` whose ``big`` stands for ``INF``."""
    for p in range(plane.shape[0]):
        v = plane[p]
        out[p] = big if v >= INF else v


@kernel
def widen_into(narrow: np.ndarray, out: np.ndarray, big: int) -> None:
    """The inverse of :func:`narrow_into`."""
    for p in range(narrow.shape[0]):
        v = narrow[p]
        out[p] = INF if v == big else v


@kernel
def chain_carry(carry: np.ndarray, edge: np.ndarray, rows: int, out: np.ndarray) -> None:
    """A scan's carry after a slab of ``rows`` rows whose own edge distance is ``edge``.

    Where the slab has background (``edge < INF``) the carry restarts from it;
    elsewhere the slab's rows are added to the carry before it, saturating at ``INF``.
    """
    for p in range(edge.shape[0]):
        e = edge[p]
        if e < INF:
            out[p] = e
        else:
            v = carry[p] + rows
            out[p] = v if v < INF else INF


@kernel
def axis0_squared(
    fg: np.ndarray,
    f_in: np.ndarray,
    b_in: np.ndarray,
    s0: float,
    d2: np.ndarray,
    b_out: np.ndarray,
) -> None:
    """Squared distance along axis 0 to the nearest background of the same column.

    Parameters
    ----------
    fg
        ``(rows, plane)`` foreground flags of the slab.
    f_in
        Rows from the row above the slab to the nearest background above (``INF``: none).
    b_in
        Rows from the row below the slab to the nearest background below (``INF``: none).
    s0
        Sampling along axis 0.
    d2
        Output ``(rows, plane)`` float64: ``(min(up, down) * s0)**2`` or ``inf``.
    b_out
        Rows from the first row of the slab to the nearest background below.
    """
    rows, n = fg.shape
    # Forward scan: store the "up" distance in d2 itself (as a float) so the slab
    # needs no extra int array; the backward scan then takes the minimum.
    for p in range(n):
        b_out[p] = f_in[p]
    for i in range(rows):
        for p in range(n):
            if fg[i, p]:
                v = b_out[p] + 1
                b_out[p] = v if v < INF else INF
            else:
                b_out[p] = 0
            d2[i, p] = b_out[p]
    for p in range(n):
        b_out[p] = b_in[p]
    for i in range(rows - 1, -1, -1):
        for p in range(n):
            if fg[i, p]:
                v = b_out[p] + 1
                b_out[p] = v if v < INF else INF
            else:
                b_out[p] = 0
            up = d2[i, p]
            d = b_out[p] if b_out[p] < up else up
            if d >= INF:
                d2[i, p] = np.inf
            else:
                x = d * s0
                d2[i, p] = x * x


@kernel
def envelope_axis1(a: np.ndarray, s: float) -> None:
    """In place: ``a[i, q, j] = min_r a[i, r, j] + ((q - r) * s)**2`` (exact).

    ``a`` is a C-contiguous ``(outer, n, inner)`` float64 view; ``inf`` entries
    are "no candidate" and are skipped.
    """
    outer, n, inner = a.shape
    f = np.empty(n)
    v = np.empty(n, dtype=np.int64)
    z = np.empty(n + 1)
    for i in range(outer):
        for j in range(inner):
            for q in range(n):
                f[q] = a[i, q, j]
            k = -1
            for q in range(n):
                fq = f[q]
                if fq == np.inf:
                    continue
                pq = q * s
                sq = 0.0
                while k >= 0:
                    r = v[k]
                    pr = r * s
                    # Where parabola q becomes lower than parabola v[k].
                    sq = ((fq + pq * pq) - (f[r] + pr * pr)) / (2.0 * (pq - pr))
                    if sq <= z[k]:
                        k -= 1
                    else:
                        break
                k += 1
                v[k] = q
                z[k] = -np.inf if k == 0 else sq
                z[k + 1] = np.inf
            if k < 0:
                continue  # no finite value on this line: leave it infinite
            m = 0
            for q in range(n):
                x = q * s
                while z[m + 1] < x:
                    m += 1
                d = (q - v[m]) * s
                a[i, q, j] = f[v[m]] + d * d
