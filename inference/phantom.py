"""Synthetic chest CT phantoms with known ground truth, for training and measuring the
reference models (no real CT data or weights can be downloaded for this project).

A phantom is a seeded, deterministic HU volume of an axial chest CT:

- body (soft tissue, a subcutaneous fat layer), the table under it;
- two lungs around -850 HU, narrowing toward the apices, with the diaphragm's dome
  cutting into the bases and the heart into the left lung;
- the airway tree (trachea, main bronchi, bronchi: air lumen inside a soft-tissue wall);
- pulmonary vessel trees from each hilum, branching and tapering from about 5 mm to
  under 1 mm (tubes that look like nodules on a single slice: the main source of false
  positives);
- spine (vertebral bodies with cortical bone, discs, canal) and ribs along the chest wall;
- solid, part-solid and ground-glass nodules of 3 to 30 mm, spherical or lobulated,
  some against the pleura (juxtapleural) and some touching a vessel;
- Gaussian noise, with pixel spacing 0.6-0.9 mm, slice spacing 1-2.5 mm and 80-400 slices.

Everything is in patient coordinates (LPS, mm) and the volume follows the conventions of
:mod:`inference.volume`. Nothing here reads or writes DICOM: ``dicom_node.ct_writer``
encodes a phantom as a CT series.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .volume import AXIAL_DIRECTION, Volume

MATRIX = 512
AIR_HU = -1000.0
LUNG_HU = -850.0
FAT_HU = -100.0
SOFT_HU = 40.0
BLOOD_HU = 40.0
BONE_CORTICAL_HU = 700.0
BONE_CANCELLOUS_HU = 230.0
TABLE_HU = 150.0

NODULE_TYPES = ("solid", "part-solid", "ground-glass")
MIN_DIAMETER_MM = 3.0
MAX_DIAMETER_MM = 30.0


@dataclass
class Nodule:
    """One nodule's ground truth. ``diameter_mm`` is the nominal diameter (twice the mean radius)."""

    center_lps_mm: list[float]
    diameter_mm: float
    volume_mm3: float
    type: str
    lobulated: bool = False
    juxtapleural: bool = False
    touches_vessel: bool = False
    laterality: str = ""  # "right" or "left" lung (patient's side)

    def truth(self) -> dict:
        d = asdict(self)
        d["center_lps_mm"] = [round(float(c), 3) for c in self.center_lps_mm]
        d["diameter_mm"] = round(float(self.diameter_mm), 3)
        d["volume_mm3"] = round(float(self.volume_mm3), 2)
        return d


@dataclass
class Phantom:
    seed: int
    volume: Volume
    nodules: list[Nodule]
    noise_hu: float
    labels: np.ndarray | None = None  # uint8, 0 = background, n = nodule n (1-based); only when asked
    lung_mask: np.ndarray | None = field(default=None, repr=False)

    def truth(self) -> dict:
        """The content of ``truth.json`` (DESIGN.md section 5) plus the acquisition parameters."""
        v = self.volume
        return {
            "seed": self.seed,
            "shape": list(v.shape),
            "spacing_mm": [round(s, 4) for s in v.spacing],
            "noise_hu": round(self.noise_hu, 2),
            "nodules": [n.truth() for n in self.nodules],
        }


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


_SPHERE_DIRS = _fibonacci_sphere(2000)


class _Shape:
    """A star-shaped blob: radius as a function of direction (lobulated) or constant (sphere)."""

    def __init__(self, radius: float, rng: np.random.Generator | None, lobulated: bool):
        self.radius = radius
        if lobulated and rng is not None:
            self.normals = rng.normal(size=(5, 3))
            self.normals /= np.linalg.norm(self.normals, axis=1, keepdims=True)
            self.weights = rng.uniform(-1.0, 1.0, size=5) * 0.35
        else:
            self.normals = None
        # normalise so that the mean radius over all directions is exactly `radius`
        self.scale = 1.0
        self.scale = radius / float(self.radius_along(_SPHERE_DIRS).mean())

    def radius_along(self, unit: np.ndarray) -> np.ndarray:
        if self.normals is None:
            return np.full(unit.shape[:-1], self.radius * self.scale)
        mod = 1.0 + (np.maximum(unit @ self.normals.T, 0.0) ** 3) @ self.weights
        return self.radius * self.scale * np.maximum(mod, 0.5)

    def volume(self) -> float:
        r = self.radius_along(_SPHERE_DIRS)
        return float(4.0 * math.pi * np.mean(r**3) / 3.0)

    def max_radius(self) -> float:
        return float(self.radius_along(_SPHERE_DIRS).max())


class _Builder:
    def __init__(self, seed: int, slices: int | None, pixel_spacing: float | None, slice_spacing: float | None):
        self.rng = rng = np.random.default_rng(seed)
        self.ps = float(pixel_spacing or rng.uniform(0.6, 0.9))
        self.st = float(slice_spacing or rng.uniform(1.0, 2.5))
        extent = rng.uniform(220.0, 400.0)
        self.nz = int(slices or np.clip(round(extent / self.st), 80, 400))
        extent = self.nz * self.st
        self.noise = float(rng.uniform(8.0, 28.0))
        fov = MATRIX * self.ps
        # body ellipse (mm), centred a little off the isocentre
        self.a = rng.uniform(125.0, min(172.0, fov / 2 - 14.0))
        self.b = self.a * rng.uniform(0.62, 0.74)
        self.cx = rng.uniform(-8, 8)
        self.cy = rng.uniform(-15, 5)
        self.fat = rng.uniform(6.0, 22.0)
        # patient coordinates of voxel centres
        self.x = (np.arange(MATRIX) - (MATRIX - 1) / 2) * self.ps
        self.y = (np.arange(MATRIX) - (MATRIX - 1) / 2) * self.ps
        z_top = rng.uniform(-50.0, 50.0)  # table position of the first slice's neighbourhood
        self.z0 = z_top - extent  # slices go up (direction[0] = +S)
        self.z = self.z0 + np.arange(self.nz) * self.st
        # lungs along z: apex below the top of the scan, bases above the bottom (or cut off)
        lung_len = min(extent - 10.0, rng.uniform(230.0, 300.0))
        slack = extent - lung_len
        self.lung_bottom = self.z0 + rng.uniform(0.15, 0.85) * slack
        self.lung_top = self.lung_bottom + lung_len
        self.lungs = []
        for side in (-1, 1):  # -1: patient's right (x < 0 in LPS), +1: left
            self.lungs.append(
                dict(
                    side=side,
                    cx=self.cx + side * self.a * rng.uniform(0.44, 0.50),
                    cy=self.cy + self.b * rng.uniform(-0.04, 0.06),
                    ax=self.a * rng.uniform(0.33, 0.38),
                    ay=self.b * rng.uniform(0.70, 0.78),
                )
            )

    # --- per-slice anatomy -------------------------------------------------

    def lung_scale(self, z: float) -> tuple[float, float]:
        """(in-plane scale, diaphragm dome radius fraction) of the lungs at height z."""
        u = (z - self.lung_bottom) / (self.lung_top - self.lung_bottom) * 2 - 1  # -1 base .. 1 apex
        if u > 1 or u < -1:
            return 0.0, 0.0
        if u > 0:
            return math.sqrt(max(0.0, 1 - u**1.6)) * 0.95 + 0.05 * (1 - u), 0.0
        dome = 0.0 if u > -0.6 else ((-0.6 - u) / 0.4) ** 0.7 * 0.93
        return 1.0, dome

    def build_slices(self, vol: np.ndarray, lung: np.ndarray) -> None:
        X, Y = np.meshgrid(self.x - self.cx, self.y - self.cy)  # [j, i]
        rho = np.sqrt((X / self.a) ** 2 + (Y / self.b) ** 2)
        theta = np.arctan2(Y / self.b, X / self.a)  # sin(theta) > 0: posterior
        body = rho <= 1.0
        fat = body & (rho > 1.0 - self.fat / self.a)
        rib_ring = (rho > 0.86) & (rho < 0.93)
        # table: a slab under the back, slightly curved
        yt = self.cy + self.b + self.rng.uniform(4.0, 20.0)
        Xa, Ya = np.meshgrid(self.x, self.y)
        table = (Ya > yt + 0.0008 * Xa**2) & (Ya < yt + 7.0 + 0.0008 * Xa**2) & (np.abs(Xa) < 0.95 * self.a + 20)
        # spine
        sy = self.cy + self.b * 0.66
        vb_r = self.a * 0.11
        dvb = np.hypot(Xa - self.cx, Ya - sy)
        canal = np.hypot(Xa - self.cx, Ya - (sy + vb_r + 8.0)) < 7.0
        posterior = (np.abs(Xa - self.cx) < vb_r * 1.4) & (Ya > sy + vb_r) & (Ya < sy + vb_r + 22.0) & ~canal
        heart_c = (self.cx + self.a * 0.12, self.cy - self.b * 0.28)
        heart_r = (self.a * 0.30, self.b * 0.36)
        heart = ((Xa - heart_c[0]) / heart_r[0]) ** 2 + ((Ya - heart_c[1]) / heart_r[1]) ** 2 < 1.0
        rib_period = 26.0
        rib_phase = self.rng.uniform(0, rib_period)
        disc_phase = self.rng.uniform(0, 28.0)
        base = np.full(X.shape, AIR_HU, dtype=np.float32)
        base[table] = TABLE_HU
        base[body] = SOFT_HU
        base[fat] = FAT_HU
        heart_lo = self.lung_bottom + 0.05 * (self.lung_top - self.lung_bottom)
        heart_hi = self.lung_bottom + 0.5 * (self.lung_top - self.lung_bottom)
        for k, z in enumerate(self.z):
            sl = base.copy()
            # ribs: bands along the wall, lower in front than at the back
            zr = (z - rib_phase - 18.0 * (1 - np.sin(theta))) % rib_period
            ribs = rib_ring & (zr < 9.0)
            sl[ribs] = BONE_CANCELLOUS_HU
            sl[ribs & ((rho < 0.875) | (rho > 0.915) | (zr < 1.5) | (zr > 7.5))] = BONE_CORTICAL_HU
            # spine: vertebral bodies separated by discs
            if (z - disc_phase) % 28.0 < 5.0:
                sl[dvb < vb_r] = 80.0
            else:
                sl[dvb < vb_r] = BONE_CANCELLOUS_HU
                sl[(dvb < vb_r) & (dvb > vb_r - 2.0)] = BONE_CORTICAL_HU
                sl[posterior] = BONE_CORTICAL_HU * 0.8
            sl[canal] = 15.0
            scale, dome = self.lung_scale(z)
            if scale > 0:
                m = np.zeros(X.shape, dtype=bool)
                for L in self.lungs:
                    ax, ay = L["ax"] * scale, L["ay"] * scale
                    m |= ((Xa - L["cx"]) / ax) ** 2 + ((Ya - L["cy"]) / ay) ** 2 < 1.0
                    if dome > 0:
                        d = ((Xa - L["cx"]) / (L["ax"] * dome)) ** 2 + ((Ya - L["cy"]) / (L["ay"] * dome)) ** 2
                        m &= ~(d < 1.0) | (np.abs(Xa - L["cx"]) > L["ax"] * dome)
                if heart_lo < z < heart_hi:
                    m &= ~heart
                m &= rho < 0.86
                sl[m] = LUNG_HU
                lung[k] = m
            vol[k] = sl

    # --- tubes: vessels and airways ---------------------------------------

    def index_of(self, p: np.ndarray) -> tuple[int, int, int]:
        return (
            int(round((p[2] - self.z0) / self.st)),
            int(round((p[1] - self.y[0]) / self.ps)),
            int(round((p[0] - self.x[0]) / self.ps)),
        )

    def inside(self, lung: np.ndarray, p: np.ndarray) -> bool:
        k, j, i = self.index_of(p)
        return 0 <= k < self.nz and 0 <= j < MATRIX and 0 <= i < MATRIX and bool(lung[k, j, i])

    def _box(self, lo: np.ndarray, hi: np.ndarray):
        k0 = max(0, int(math.floor((lo[2] - self.z0) / self.st)))
        k1 = min(self.nz, int(math.ceil((hi[2] - self.z0) / self.st)) + 1)
        j0 = max(0, int(math.floor((lo[1] - self.y[0]) / self.ps)))
        j1 = min(MATRIX, int(math.ceil((hi[1] - self.y[0]) / self.ps)) + 1)
        i0 = max(0, int(math.floor((lo[0] - self.x[0]) / self.ps)))
        i1 = min(MATRIX, int(math.ceil((hi[0] - self.x[0]) / self.ps)) + 1)
        if k0 >= k1 or j0 >= j1 or i0 >= i1:
            return None
        zz = (self.z0 + np.arange(k0, k1) * self.st)[:, None, None]
        yy = self.y[j0:j1][None, :, None]
        xx = self.x[i0:i1][None, None, :]
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1)), (xx, yy, zz)

    def segment_distance(self, a: np.ndarray, b: np.ndarray, pad: float):
        lo = np.minimum(a, b) - pad
        hi = np.maximum(a, b) + pad
        box = self._box(lo, hi)
        if box is None:
            return None
        sl, (xx, yy, zz) = box
        ab = b - a
        L2 = float(ab @ ab) or 1e-9
        t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (zz - a[2]) * ab[2]) / L2
        t = np.clip(t, 0.0, 1.0)
        dx = xx - (a[0] + t * ab[0])
        dy = yy - (a[1] + t * ab[1])
        dz = zz - (a[2] + t * ab[2])
        return sl, np.sqrt(dx * dx + dy * dy + dz * dz)

    def draw_vessel(self, vol, lung, a, b, r, soft) -> None:
        res = self.segment_distance(a, b, r + 2 * soft)
        if res is None:
            return
        sl, d = res
        w = np.clip((r - d) / soft + 0.5, 0.0, 1.0).astype(np.float32)
        inside = lung[sl]
        sub = vol[sl]
        val = LUNG_HU + (BLOOD_HU - LUNG_HU) * w
        np.copyto(sub, np.maximum(sub, val), where=inside)

    def draw_airway(self, vol, lung, a, b, r, soft, clip_to_lung=True) -> None:
        wall = max(0.6, 0.22 * r)
        res = self.segment_distance(a, b, r + wall + 2 * soft)
        if res is None:
            return
        sl, d = res
        w_out = np.clip((r + wall - d) / soft + 0.5, 0.0, 1.0)
        w_in = np.clip((r - d) / soft + 0.5, 0.0, 1.0)
        sub = vol[sl]
        region = w_out > 0
        if clip_to_lung:
            region &= lung[sl]
        val = (sub * (1 - w_out) + SOFT_HU * (w_out - w_in) + AIR_HU * w_in).astype(np.float32)
        np.copyto(sub, val, where=region)

    def grow_tree(self, lung, start, direction, radius, length, depth, out, min_radius=0.7) -> None:
        rng = self.rng
        stack = [(np.asarray(start, float), np.asarray(direction, float), radius, length, depth)]
        while stack:
            p, d, r, ln, dep = stack.pop()
            if r < min_radius or dep > 9:
                continue
            end = p + d * ln
            tries = 0
            while not self.inside(lung, end) and tries < 4:
                # bend away from the pleura (or shorten) before giving up on the branch
                tries += 1
                d = d + rng.normal(size=3) * 0.6
                d /= np.linalg.norm(d)
                end = p + d * ln * (0.5 if tries == 4 else 1.0)
            if not self.inside(lung, end):
                continue
            out.append((p, end, r))
            for sgn in (-1, 1):
                axis = np.cross(d, rng.normal(size=3))
                axis /= np.linalg.norm(axis) + 1e-9
                ang = math.radians(rng.uniform(20, 42)) * sgn
                nd = d * math.cos(ang) + np.cross(axis, d) * math.sin(ang) + axis * (axis @ d) * (1 - math.cos(ang))
                nd /= np.linalg.norm(nd)
                shrink = rng.uniform(0.72, 0.86)
                stack.append((end, nd, r * shrink, ln * rng.uniform(0.8, 0.95), dep + 1))

    def hilum(self, L, z: float) -> np.ndarray:
        return np.array([L["cx"] - L["side"] * L["ax"] * 0.55, L["cy"] + L["ay"] * 0.05, z])

    # --- nodules ----------------------------------------------------------

    def draw_nodule(self, vol, labels, lung, n_index, center, shape: _Shape, kind, rng, soft) -> None:
        rmax = shape.max_radius()
        box = self._box(center - rmax - 2 * soft, center + rmax + 2 * soft)
        if box is None:
            return
        sl, (xx, yy, zz) = box
        dx, dy, dz = xx - center[0], yy - center[1], zz - center[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        unit = np.stack(np.broadcast_arrays(dx, dy, dz), axis=-1) / np.maximum(dist, 1e-6)[..., None]
        rad = shape.radius_along(unit)
        w = np.clip((rad - dist) / soft + 0.5, 0.0, 1.0).astype(np.float32)
        if kind == "solid":
            hu = np.float32(rng.uniform(0.0, 60.0))
        elif kind == "ground-glass":
            hu = np.float32(rng.uniform(-650.0, -420.0))
        else:  # part-solid: a ground-glass halo around a solid core
            ggo = rng.uniform(-620.0, -430.0)
            core = rng.uniform(0.35, 0.6)
            wc = np.clip((rad * core - dist) / soft + 0.5, 0.0, 1.0)
            hu = (ggo + (rng.uniform(10.0, 50.0) - ggo) * wc).astype(np.float32)
        sub = vol[sl]
        # a nodule replaces lung and tissue alike (it is denser than lung; vessels it touches
        # stay bright where they are brighter)
        val = sub * (1 - w) + hu * w
        np.copyto(sub, np.maximum(sub, val) if kind == "solid" else val, where=w > 0)
        if labels is not None:
            lab = labels[sl]
            lab[w >= 0.5] = n_index


def _sample_diameter(rng: np.random.Generator) -> float:
    """Log-uniform between 3 and 30 mm: small nodules are the common ones."""
    return float(math.exp(rng.uniform(math.log(MIN_DIAMETER_MM), math.log(MAX_DIAMETER_MM))))


def generate_phantom(
    seed: int,
    nodules: int | None = None,
    *,
    slices: int | None = None,
    pixel_spacing: float | None = None,
    slice_spacing: float | None = None,
    with_labels: bool = False,
    with_lung_mask: bool = False,
) -> Phantom:
    """A synthetic chest CT in HU (int16) with its nodules' ground truth.

    ``nodules`` fixes how many nodules to place (0 gives a normal scan); by default 0 to 6,
    a fifth of the scans having none. ``slices`` and the spacings override the randomly
    drawn acquisition. ``with_labels`` also returns a uint8 mask: nodule n (1-based) where
    its partial-volume weight is at least one half.
    """
    if nodules is not None and not 0 <= nodules <= 20:
        raise ValueError(f"nodules must be between 0 and 20, got {nodules}")
    if slices is not None and not 8 <= slices <= 1000:
        raise ValueError(f"slices must be between 8 and 1000, got {slices}")
    b = _Builder(seed, slices, pixel_spacing, slice_spacing)
    rng = b.rng
    vol = np.empty((b.nz, MATRIX, MATRIX), dtype=np.float32)
    lung = np.zeros(vol.shape, dtype=bool)
    b.build_slices(vol, lung)
    soft = max(b.ps, 0.6)

    # airways: trachea down the midline to the carina, main bronchi to each hilum, then a tree
    z_carina = b.lung_bottom + 0.62 * (b.lung_top - b.lung_bottom)
    trachea_top = np.array([b.cx, b.cy - b.b * 0.05, b.z[-1] + 10])
    carina = np.array([b.cx, b.cy + b.b * 0.02, z_carina])
    b.draw_airway(vol, lung, trachea_top, carina, 8.0, soft, clip_to_lung=False)
    vessels: list = []
    airways: list = []
    for L in b.lungs:
        hil = b.hilum(L, z_carina - 20.0)
        b.draw_airway(vol, lung, carina, hil, 5.5, soft, clip_to_lung=False)
        for _ in range(2):
            d = np.array([L["side"] * 0.3, rng.uniform(-0.3, 0.3), rng.uniform(-1, 0.6)])
            d = d / np.linalg.norm(d)
            b.grow_tree(lung, hil, d, 3.5, 22.0, 1, airways, min_radius=1.0)
        for tree in range(10):  # arteries and veins, up toward the apex and down toward the base
            zh = z_carina - 20.0 + rng.uniform(-25, 15)
            start = b.hilum(L, zh)
            up = 1.0 if tree % 2 == 0 else -1.0
            # lateral (away from the midline), forward or back, and up or down
            d = np.array([L["side"] * rng.uniform(0.3, 1.0), rng.uniform(-0.5, 0.5), up * rng.uniform(0.4, 1.0)])
            d /= np.linalg.norm(d)
            b.grow_tree(lung, start, d, rng.uniform(3.5, 5.5), rng.uniform(20.0, 30.0), 1, vessels)
    for p, q, r in airways:
        b.draw_airway(vol, lung, p, q, r, soft)
    for p, q, r in vessels:
        b.draw_vessel(vol, lung, p, q, r, soft)

    # nodules
    count = nodules if nodules is not None else int(rng.choice(7, p=[0.2, 0.2, 0.18, 0.15, 0.12, 0.1, 0.05]))
    labels = np.zeros(vol.shape, dtype=np.uint8) if with_labels else None
    placed: list[Nodule] = []
    centers: list[tuple[np.ndarray, float]] = []
    lung_idx = np.flatnonzero(lung[:: max(1, int(4 / b.st)), ::4, ::4])
    sub_shape = lung[:: max(1, int(4 / b.st)), ::4, ::4].shape
    step = (max(1, int(4 / b.st)), 4, 4)
    if lung_idx.size == 0:
        count = 0
    attempts = 0
    while len(placed) < count and attempts < 400:
        attempts += 1
        diameter = _sample_diameter(rng)
        kind = str(rng.choice(NODULE_TYPES, p=[0.6, 0.2, 0.2]))
        lobulated = bool(rng.random() < 0.35)
        shape = _Shape(diameter / 2, rng, lobulated)
        mode = rng.choice(3, p=[0.7, 0.15, 0.15])  # free, juxtapleural, next to a vessel
        k, j, i = np.unravel_index(int(rng.choice(lung_idx)), sub_shape)
        c = np.array([b.x[i * step[2]], b.y[j * step[1]], b.z[k * step[0]]])
        juxta = touches = False
        r = shape.radius
        if mode == 1:
            # walk outward until leaving the lung, then step back in by 0.6 radius
            L = min(b.lungs, key=lambda L: abs(L["cx"] - c[0]))
            out = np.array([c[0] - L["cx"], c[1] - L["cy"], 0.0])
            out /= np.linalg.norm(out) + 1e-9
            for _ in range(200):
                if not b.inside(lung, c + out):
                    break
                c = c + out
            c = c - out * 0.6 * r
            juxta = True
        elif mode == 2 and vessels:
            p, q, vr = vessels[int(rng.integers(len(vessels)))]
            t = rng.uniform(0.2, 0.8)
            perp = np.cross(q - p, rng.normal(size=3))
            perp /= np.linalg.norm(perp) + 1e-9
            c = p + (q - p) * t + perp * (r + vr * 0.6)
            touches = True
        # the nodule must lie in a lung (centre and most of its surface), away from others
        if not b.inside(lung, c):
            continue
        probe = c + _SPHERE_DIRS[::100] * r * 0.9
        inside = np.mean([b.inside(lung, p) for p in probe])
        if inside < (0.45 if juxta else 0.8):
            continue
        if any(np.linalg.norm(c - c2) < r + r2 + 4.0 for c2, r2 in centers):
            continue
        kind_hu_rng = np.random.default_rng(rng.integers(2**63))
        b.draw_nodule(vol, labels, lung, len(placed) + 1, c, shape, kind, kind_hu_rng, soft)
        centers.append((c, r))
        side = "right" if c[0] < b.cx else "left"
        placed.append(
            Nodule(
                center_lps_mm=[float(v) for v in c],
                diameter_mm=diameter,
                volume_mm3=shape.volume(),
                type=kind,
                lobulated=lobulated,
                juxtapleural=juxta,
                touches_vessel=touches,
                laterality=side,
            )
        )

    noise = rng.standard_normal(size=vol.shape, dtype=np.float32)
    noise *= np.float32(b.noise)
    vol += noise
    del noise
    np.clip(vol, -1024, 3071, out=vol)
    hu = np.rint(vol).astype(np.int16)
    del vol
    origin = (float(b.x[0]), float(b.y[0]), float(b.z0))
    volume = Volume(hu=hu, spacing=(b.st, b.ps, b.ps), origin=origin, direction=AXIAL_DIRECTION.copy())
    return Phantom(
        seed=seed,
        volume=volume,
        nodules=placed,
        noise_hu=b.noise,
        labels=labels,
        lung_mask=lung if with_lung_mask else None,
    )
