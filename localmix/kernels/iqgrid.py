"""The IQ3 and IQ2_S grids, built as ggml builds them in iq3xs_init_impl and iq2xs_init_impl (ggml-quants.c).

An IQ3 quant is a point of a 4-dimensional grid: each coordinate is one of the odd levels
1, 3, ..., 15 (3 bits), and of the 4096 such points only 256 (IQ3_XXS) or 512 (IQ3_S) are
allowed, listed in KGRID_256 / KGRID_512 as 12-bit codes (3 bits per coordinate, the first
in the low bits). `iq3_tables(grid_size)` returns what the quantizers search:
  grid        int8 (grid_size, 4): each allowed point's coordinates
  kmap        int32 (4096,): code -> index in the grid, or -(offset + 1) for a code off the grid
  neighbours  uint16: at each off-grid code's offset, a count n, then the n grid points
              nearest to it (all those within the 2 (IQ3_XXS) or 3 (IQ3_S) smallest
              distances), ordered by distance then index, as ggml's qsort orders them.
The stored quants are read through other grids (ggml-common.h's iq3xxs_grid and iq3s_grid,
which gguf carries): `iq3_grid(qtype)`, and KSIGNS, which expands 7 stored sign bits to 8.

An IQ2_S quant is a point of an 8-dimensional grid whose coordinates are 1, 3 or 5 (the levels
0..2 of 2 bits; 0..3 in the codes), 1024 of them allowed: ggml's kgrid_2bit_1024, 16-bit codes (2 bits
per coordinate, the first in the low bits), which are exactly the packed iq2s_grid that gguf
carries (gguf.quants.IQ2_S.grid_hex). `iq2s_tables()` returns (grid int8 (1024, 8), kmap int32
(43692,), neighbours uint16) as above, each off-grid code listing the grid points at the one
smallest distance (ggml's nwant = 1 for IQ2_S), by index.

Building the tables takes a good part of a second (the IQ2_S distances are 43 million pairs),
and every `localmix` command imports the kernels: so each is built once and kept as an .npz in
numba's cache folder, which kernels/__init__.py names by a digest of the kernels' sources (an
edit here builds them again), written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path
from typing import Callable

import numba
import numpy as np
from gguf import GGMLQuantizationType, quants

KMAP_SIZE = 4096
KMAP_SIZE_IQ2 = 43692  # ggml's kmap_size: every code whose levels are at most 2, 0xAAAA, and two more

KGRID_256 = np.array([
    0, 2, 4, 9, 11, 15, 16, 18, 25, 34, 59, 61, 65, 67, 72, 74,
    81, 85, 88, 90, 97, 108, 120, 128, 130, 132, 137, 144, 146, 153, 155, 159,
    169, 175, 189, 193, 199, 200, 202, 213, 248, 267, 287, 292, 303, 315, 317, 321,
    327, 346, 362, 413, 436, 456, 460, 462, 483, 497, 513, 515, 520, 522, 529, 531,
    536, 538, 540, 551, 552, 576, 578, 585, 592, 594, 641, 643, 648, 650, 657, 664,
    698, 704, 706, 720, 729, 742, 758, 769, 773, 808, 848, 852, 870, 889, 901, 978,
    992, 1024, 1026, 1033, 1035, 1040, 1042, 1046, 1049, 1058, 1089, 1091, 1093, 1096, 1098, 1105,
    1112, 1139, 1143, 1144, 1152, 1154, 1161, 1167, 1168, 1170, 1183, 1184, 1197, 1217, 1224, 1228,
    1272, 1276, 1309, 1323, 1347, 1367, 1377, 1404, 1473, 1475, 1486, 1509, 1537, 1544, 1546, 1553,
    1555, 1576, 1589, 1594, 1600, 1602, 1616, 1625, 1636, 1638, 1665, 1667, 1672, 1685, 1706, 1722,
    1737, 1755, 1816, 1831, 1850, 1856, 1862, 1874, 1901, 1932, 1950, 1971, 2011, 2032, 2052, 2063,
    2077, 2079, 2091, 2095, 2172, 2192, 2207, 2208, 2224, 2230, 2247, 2277, 2308, 2345, 2356, 2389,
    2403, 2424, 2501, 2504, 2506, 2520, 2570, 2593, 2616, 2624, 2630, 2646, 2669, 2700, 2714, 2746,
    2754, 2795, 2824, 2835, 2839, 2874, 2882, 2905, 2984, 3028, 3042, 3092, 3108, 3110, 3124, 3153,
    3185, 3215, 3252, 3288, 3294, 3364, 3397, 3434, 3483, 3523, 3537, 3587, 3589, 3591, 3592, 3610,
    3626, 3670, 3680, 3722, 3749, 3754, 3776, 3789, 3803, 3824, 3857, 3873, 3904, 3906, 3924, 3992,
], dtype=np.int64)

KGRID_512 = np.array([
    0, 1, 2, 5, 7, 8, 9, 10, 12, 14, 16, 17, 21, 27, 32, 34,
    37, 39, 41, 43, 48, 50, 57, 60, 63, 64, 65, 66, 68, 72, 73, 77,
    80, 83, 87, 89, 93, 100, 113, 117, 122, 128, 129, 133, 135, 136, 139, 142,
    145, 149, 152, 156, 162, 165, 167, 169, 171, 184, 187, 195, 201, 205, 208, 210,
    217, 219, 222, 228, 232, 234, 247, 249, 253, 256, 267, 271, 273, 276, 282, 288,
    291, 297, 312, 322, 324, 336, 338, 342, 347, 353, 357, 359, 374, 379, 390, 393,
    395, 409, 426, 441, 448, 450, 452, 464, 466, 470, 475, 488, 492, 512, 513, 514,
    516, 520, 521, 523, 525, 527, 528, 530, 537, 540, 542, 556, 558, 561, 570, 576,
    577, 579, 582, 584, 588, 593, 600, 603, 609, 616, 618, 632, 638, 640, 650, 653,
    655, 656, 660, 666, 672, 675, 685, 688, 698, 705, 708, 711, 712, 715, 721, 727,
    728, 732, 737, 754, 760, 771, 773, 778, 780, 793, 795, 802, 806, 808, 812, 833,
    840, 843, 849, 856, 858, 873, 912, 916, 919, 932, 934, 961, 963, 968, 970, 977,
    989, 993, 1010, 1016, 1024, 1025, 1027, 1029, 1031, 1032, 1034, 1036, 1038, 1041, 1043, 1047,
    1048, 1050, 1057, 1059, 1061, 1064, 1066, 1079, 1080, 1083, 1085, 1088, 1090, 1096, 1099, 1103,
    1106, 1109, 1113, 1116, 1122, 1129, 1153, 1156, 1159, 1169, 1171, 1176, 1183, 1185, 1195, 1199,
    1209, 1212, 1216, 1218, 1221, 1225, 1234, 1236, 1241, 1243, 1250, 1256, 1270, 1281, 1287, 1296,
    1299, 1306, 1309, 1313, 1338, 1341, 1348, 1353, 1362, 1375, 1376, 1387, 1400, 1408, 1410, 1415,
    1425, 1453, 1457, 1477, 1481, 1494, 1496, 1507, 1512, 1538, 1545, 1547, 1549, 1551, 1554, 1561,
    1563, 1565, 1570, 1572, 1575, 1577, 1587, 1593, 1601, 1603, 1605, 1612, 1617, 1619, 1632, 1648,
    1658, 1662, 1664, 1674, 1680, 1690, 1692, 1704, 1729, 1736, 1740, 1745, 1747, 1751, 1752, 1761,
    1763, 1767, 1773, 1787, 1795, 1801, 1806, 1810, 1817, 1834, 1840, 1844, 1857, 1864, 1866, 1877,
    1882, 1892, 1902, 1915, 1934, 1953, 1985, 1987, 2000, 2002, 2013, 2048, 2052, 2058, 2064, 2068,
    2071, 2074, 2081, 2088, 2104, 2114, 2119, 2121, 2123, 2130, 2136, 2141, 2147, 2153, 2157, 2177,
    2179, 2184, 2189, 2193, 2203, 2208, 2223, 2226, 2232, 2244, 2249, 2251, 2256, 2258, 2265, 2269,
    2304, 2306, 2324, 2335, 2336, 2361, 2373, 2375, 2385, 2418, 2443, 2460, 2480, 2504, 2509, 2520,
    2531, 2537, 2562, 2568, 2572, 2578, 2592, 2596, 2599, 2602, 2614, 2620, 2625, 2627, 2629, 2634,
    2641, 2650, 2682, 2688, 2697, 2707, 2712, 2718, 2731, 2754, 2759, 2760, 2775, 2788, 2793, 2805,
    2811, 2817, 2820, 2832, 2842, 2854, 2890, 2902, 2921, 2923, 2978, 3010, 3012, 3026, 3081, 3083,
    3085, 3097, 3099, 3120, 3136, 3152, 3159, 3188, 3210, 3228, 3234, 3245, 3250, 3256, 3264, 3276,
    3281, 3296, 3349, 3363, 3378, 3392, 3395, 3420, 3440, 3461, 3488, 3529, 3531, 3584, 3588, 3591,
    3600, 3602, 3614, 3616, 3628, 3634, 3650, 3657, 3668, 3683, 3685, 3713, 3716, 3720, 3726, 3729,
    3736, 3753, 3778, 3802, 3805, 3819, 3841, 3845, 3851, 3856, 3880, 3922, 3938, 3970, 3993, 4032,
], dtype=np.int64)


def _points(codes: np.ndarray) -> np.ndarray:
    """12-bit codes -> (n, 4) coordinates 2l + 1."""
    return (2 * ((codes[:, None] >> (3 * np.arange(4))) & 7) + 1).astype(np.int64)


def _kept(name: str, build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """build()'s arrays, read from numba's cache folder when an earlier run kept them there."""
    folder = Path(numba.config.CACHE_DIR) / "tables" if numba.config.CACHE_DIR else None
    path = folder / f"{name}.npz" if folder else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                return tuple(z[f"a{i}"] for i in range(len(z.files)))
        except (OSError, ValueError, KeyError):  # a damaged file: build again
            pass
    arrays = build()
    if path is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=folder)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})
            os.replace(tmp, path)
        except OSError:  # a read-only cache: build every time
            pass
    return arrays


@cache
def iq3_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) for the 256- or 512-point grid."""
    assert grid_size in (256, 512)
    return _kept(f"iq3-{grid_size}", lambda: _build_iq3(grid_size))


def _build_iq3(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = KGRID_256 if grid_size == 256 else KGRID_512
    nwant = 2 if grid_size == 256 else 3
    grid = _points(codes)
    kmap = np.full(KMAP_SIZE, -1, dtype=np.int64)
    kmap[(((grid - 1) // 2) << (3 * np.arange(4))).sum(axis=1)] = np.arange(grid_size)
    off = np.nonzero(kmap < 0)[0]
    d2 = ((_points(off)[:, None, :] - grid[None, :, :]) ** 2).sum(axis=-1)  # (off-grid codes, grid points)
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then index: ggml's comparator
    dist = np.take_along_axis(d2, order, axis=1)
    kept = np.cumsum(np.diff(dist, axis=1, prepend=dist[:, :1]) > 0, axis=1) < nwant  # the nwant nearest shells
    counts = kept.sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(1 + counts)[:-1]])
    kmap[off] = -(starts + 1)
    neighbours = np.zeros(int((1 + counts).sum()), dtype=np.int64)
    neighbours[starts] = counts
    is_entry = np.ones(neighbours.size, dtype=bool)
    is_entry[starts] = False
    neighbours[is_entry] = order[kept]  # row by row, nearest first
    return grid.astype(np.int8), kmap.astype(np.int32), neighbours.astype(np.uint16)


@cache
def iq2s_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid, kmap, neighbours) for IQ2_S's 1024-point grid."""
    return _kept("iq2s", _build_iq2s)


def _build_iq2s() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = np.frombuffer(bytes.fromhex(quants.IQ2_S.grid_hex.decode()), dtype="<u2").astype(np.int64)
    assert codes.size == 1024

    def points(c):
        return 2 * ((c[:, None] >> (2 * np.arange(8))) & 3) + 1

    grid = points(codes)
    kmap = np.full(KMAP_SIZE_IQ2, -1, dtype=np.int64)
    kmap[codes] = np.arange(codes.size)
    off = np.nonzero(kmap < 0)[0]
    # |p - g|^2 - |p|^2 = |g|^2 - 2 p.g: small integers, exact in float32 (whose BLAS makes this fast)
    p = points(off).astype(np.float32)
    g = grid.astype(np.float32)
    d2 = (g * g).sum(1)[None, :] - 2 * (p @ g.T)  # (off-grid codes, grid points)
    kept = d2 == d2.min(axis=1, keepdims=True)  # the nearest shell, in index order (ggml's qsort)
    counts = kept.sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(1 + counts)[:-1]])
    kmap[off] = -(starts + 1)
    neighbours = np.zeros(int((1 + counts).sum()), dtype=np.int64)
    neighbours[starts] = counts
    is_entry = np.ones(neighbours.size, dtype=bool)
    is_entry[starts] = False
    neighbours[is_entry] = np.nonzero(kept)[1]  # row by row, by index
    return grid.astype(np.int8), kmap.astype(np.int32), neighbours.astype(np.uint16)


def iq2s_grid() -> np.ndarray:
    """IQ2_S's dequantization grid, as ggml-common.h's iq2s_grid has it (8, 25, 43): int64 (1024, 8)."""
    quants.IQ2_S.init_grid()
    return np.asarray(quants.IQ2_S.grid, dtype=np.float32).reshape(quants.IQ2_S.grid_shape).astype(np.int64)


def iq3_grid(qtype: GGMLQuantizationType) -> np.ndarray:
    """IQ3_XXS's or IQ3_S's dequantization grid, as ggml-common.h has it: int64 (points, 4)."""
    cls = quants.IQ3_XXS if qtype == GGMLQuantizationType.IQ3_XXS else quants.IQ3_S
    cls.init_grid()
    return np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape).astype(np.int64)


KSIGNS = np.frombuffer(quants.IQ2_XXS.ksigns, dtype=np.uint8).copy()  # ggml's ksigns_iq2xs: even parity
