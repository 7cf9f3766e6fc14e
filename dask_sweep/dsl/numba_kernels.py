"""Numba kernels for ``window`` stages (here: a 3-D bilateral filter).

A window kernel is called on a slab padded by its footprint radius; voxels
within ``r`` of the slab's cut faces are cropped afterwards, so the kernel only
has to be *local*: it may simply skip neighbours outside the block it is given::

    block given:   [ halo r | planes [a, b) | halo r ]
    kept:                   [ planes [a, b) ]
"""

from __future__ import annotations

import math

import numpy as np

from dask_sweep.runtime.jit import kernel


@kernel
def _bilateral3(x, r, inv2ss, inv2sr):  # pragma: no cover - compiled
    nz, ny, nx = x.shape
    out = np.empty((nz, ny, nx), dtype=np.float32)
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                c = np.float64(x[k, j, i])
                wsum = 0.0
                vsum = 0.0
                for dk in range(-r, r + 1):
                    kk = k + dk
                    if kk < 0 or kk >= nz:
                        continue
                    for dj in range(-r, r + 1):
                        jj = j + dj
                        if jj < 0 or jj >= ny:
                            continue
                        for di in range(-r, r + 1):
                            ii = i + di
                            if ii < 0 or ii >= nx:
                                continue
                            v = np.float64(x[kk, jj, ii])
                            d2 = dk * dk + dj * dj + di * di
                            w = math.exp(-d2 * inv2ss - (v - c) * (v - c) * inv2sr)
                            wsum += w
                            vsum += w * v
                out[k, j, i] = vsum / wsum
    return out


class BilateralKernel:
    """Picklable callable ``block -> float32 block`` (the numba function is cached)."""

    def __init__(self, radius: int, sigma_spatial: float, sigma_range: float) -> None:
        self.radius = int(radius)
        self.sigma_spatial = sigma_spatial
        self.sigma_range = sigma_range

    def __call__(self, block: np.ndarray) -> np.ndarray:
        inv2ss = 1.0 / (2.0 * self.sigma_spatial**2)
        inv2sr = 1.0 / (2.0 * self.sigma_range**2)
        return _bilateral3(np.ascontiguousarray(block), self.radius, inv2ss, inv2sr)
