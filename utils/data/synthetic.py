"""Procedurally generated multi-modal indoor scenes (rgb, depth, semseg, mask_valid[, normal]).

Each scene is a small room seen through a pinhole camera: a chequered floor, a back wall and two side
walls, and 3-6 objects (boxes, spheres, cylinders, cones) standing on the floor. Every pixel is ray cast
(vectorised numpy, one pass per primitive), so all modalities come from the same geometry:

* depth: z-buffer depth along the optical axis, written as a 16-bit PNG in units of
  1/``DEPTH_UNITS_PER_METRE`` m (6000 units per metre: 0..65535 <-> 0..10.9 m; scenes span about
  1-10 m, i.e. 6000-60000). Depth is dense, like the in-painted NYUv2 depth maps.
* mask_valid: 8-bit, 255 where a depth sensor would have measured, 0 where it would not: beyond
  ``MAX_VALID_DEPTH_M``, a 1-pixel parallax shadow left of foreground edges, and a few random
  elliptic drop-out holes (as in raw Kinect / NYUv2 data).
* semseg: 8-bit class ids, ``SYNTHETIC_CLASSES`` (0 floor, 1 wall, 2 box, 3 sphere, 4 cylinder, 5 cone).
* rgb: Lambertian shading from the surface normals with a directional light and cast shadows; albedo
  colour family and texture depend on the class (floor: checker tiles, wall: plain pastel, box: face
  checker, sphere: latitude bands, cylinder: vertical stripes, cone: spiral stripes).
* normal (optional): camera-frame normals (x right, y down, z forward) encoded as (n + 1) / 2 * 255.

The scene category (folder name) is the object class that is in the strict majority, so the same files
serve image classification (4 balanced categories). Scenes are deterministic for (seed, split, index).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

__all__ = [
    'SYNTHETIC_CLASSES', 'SCENE_CATEGORIES', 'DEPTH_UNITS_PER_METRE', 'MAX_VALID_DEPTH_M',
    'render_scene', 'make_synthetic_dataset', 'register_normal_modality',
]

SYNTHETIC_CLASSES = ('floor', 'wall', 'box', 'sphere', 'cylinder', 'cone')
SCENE_CATEGORIES = ('boxes', 'spheres', 'cylinders', 'cones')  # category k is dominated by class k + 2
DEPTH_UNITS_PER_METRE = 6000.0
MAX_VALID_DEPTH_M = 8.5
MODALITIES = ('rgb', 'depth', 'semseg', 'mask_valid')

_FLOOR, _WALL, _BOX, _SPHERE, _CYLINDER, _CONE = range(6)
_EPS = 1e-4
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}
# (hue range, saturation range, value range) of the albedo per class
_COLOUR_FAMILY = {
    _FLOOR: ((0.05, 0.12), (0.15, 0.45), (0.35, 0.65)),
    _WALL: ((0.0, 1.0), (0.0, 0.15), (0.65, 0.9)),
    _BOX: ((-0.03, 0.07), (0.55, 0.9), (0.6, 0.95)),
    _SPHERE: ((0.55, 0.65), (0.5, 0.9), (0.6, 0.95)),
    _CYLINDER: ((0.26, 0.38), (0.5, 0.9), (0.5, 0.85)),
    _CONE: ((0.76, 0.86), (0.4, 0.8), (0.6, 0.95)),
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    h = (h % 1.0) * 6.0
    i = int(h) % 6
    f = h - int(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _soft_square(x: np.ndarray) -> np.ndarray:
    """Square wave in [0, 1] with soft edges (less aliasing than a hard step at 96 px)."""
    return 0.5 + 0.5 * np.tanh(3.0 * x)


@dataclass
class _Primitive:
    cls: int
    kind: str  # 'plane', 'sphere', 'box', 'cylinder', 'cone'
    params: Dict[str, np.ndarray | float]
    albedo: np.ndarray
    contrast: float
    period: float
    extra: Dict[str, float] = field(default_factory=dict)

    # --- intersection: rays o + t d, o (P,3) or (3,), d (P,3); returns t (P,), inf where missed ---
    def intersect(self, o: np.ndarray, d: np.ndarray) -> np.ndarray:
        return getattr(self, '_hit_' + self.kind)(np.broadcast_to(o, d.shape), d)

    def _hit_plane(self, o, d):
        n, off = self.params['n'], self.params['offset']
        den = d @ n
        with np.errstate(divide='ignore', invalid='ignore'):
            t = (off - o @ n) / den
        return np.where((t > _EPS) & (den < 0), t, np.inf)

    def _hit_sphere(self, o, d):
        oc = o - self.params['c']
        a = np.einsum('ij,ij->i', d, d)
        b = np.einsum('ij,ij->i', oc, d)
        c = np.einsum('ij,ij->i', oc, oc) - self.params['r'] ** 2
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0, t1 = (-b - sq) / a, (-b + sq) / a
        t = np.where(t0 > _EPS, t0, t1)
        return np.where((disc >= 0) & (t > _EPS), t, np.inf)

    def _local(self, o, d):
        rot = self.params['rot']  # world -> local rotation (3,3)
        return (o - self.params['c']) @ rot.T, d @ rot.T

    def _hit_box(self, o, d):
        ol, dl = self._local(o, d)
        half = self.params['half']
        with np.errstate(divide='ignore', invalid='ignore'):
            inv = 1.0 / dl
            t1, t2 = (-half - ol) * inv, (half - ol) * inv
        near, far = np.minimum(t1, t2), np.maximum(t1, t2)
        # fmax/fmin skip the NaNs of rays parallel to a slab that start on its boundary
        tmin = np.fmax(np.fmax(near[:, 0], near[:, 1]), near[:, 2])
        tmax = np.fmin(np.fmin(far[:, 0], far[:, 1]), far[:, 2])
        t = np.where(tmin > _EPS, tmin, tmax)
        return np.where((tmax >= tmin) & (t > _EPS), t, np.inf)

    def _hit_cylinder(self, o, d):
        c, r, h = self.params['c'], self.params['r'], self.params['h']
        ox, oz = o[:, 0] - c[0], o[:, 2] - c[2]
        a = d[:, 0] ** 2 + d[:, 2] ** 2
        b = ox * d[:, 0] + oz * d[:, 2]
        cc = ox * ox + oz * oz - r * r
        disc = b * b - a * cc
        sq = np.sqrt(np.maximum(disc, 0.0))
        with np.errstate(divide='ignore', invalid='ignore'):
            t_side = (-b - sq) / a
            y = o[:, 1] + t_side * d[:, 1]
            side_ok = (disc >= 0) & (t_side > _EPS) & (y >= 0) & (y <= h)
            t_cap = (h - o[:, 1]) / d[:, 1]
            px, pz = ox + t_cap * d[:, 0], oz + t_cap * d[:, 2]
        cap_ok = (t_cap > _EPS) & (px * px + pz * pz <= r * r) & (d[:, 1] < 0)
        return np.minimum(np.where(side_ok, t_side, np.inf), np.where(cap_ok, t_cap, np.inf))

    def _hit_cone(self, o, d):
        c, r, h = self.params['c'], self.params['r'], self.params['h']
        k2 = (r / h) ** 2
        qx, qy, qz = o[:, 0] - c[0], o[:, 1] - h, o[:, 2] - c[2]
        a = d[:, 0] ** 2 + d[:, 2] ** 2 - k2 * d[:, 1] ** 2
        b = qx * d[:, 0] + qz * d[:, 2] - k2 * qy * d[:, 1]
        cc = qx * qx + qz * qz - k2 * qy * qy
        disc = b * b - a * cc
        sq = np.sqrt(np.maximum(disc, 0.0))
        best = np.full(a.shape, np.inf)
        with np.errstate(divide='ignore', invalid='ignore'):
            for root in ((-b - sq) / a, (-b + sq) / a):
                y = o[:, 1] + root * d[:, 1]
                ok = (disc >= 0) & (root > _EPS) & (y >= 0) & (y <= h)
                best = np.where(ok & (root < best), root, best)
        return best

    # --- surface attributes at hit points p (K,3): unit normal (K,3) and albedo (K,3) ---
    def surface(self, p: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kind, prm = self.kind, self.params
        if kind == 'plane':
            n = np.broadcast_to(prm['n'], p.shape)
            if self.cls == _FLOOR:
                u, v = p[:, 0] / self.period, p[:, 2] / self.period
                pattern = _soft_square(np.sin(np.pi * u) * np.sin(np.pi * v) * 2)
            else:
                pattern = 0.5 + 0.5 * np.clip(p[:, 1] / 4.0, 0, 1)  # gentle vertical gradient
        elif kind == 'sphere':
            n = (p - prm['c']) / prm['r']
            pattern = _soft_square(np.sin(2 * np.pi * n[:, 1] * prm['r'] / self.period))
        elif kind == 'box':
            pl = (p - prm['c']) @ prm['rot'].T
            rel = np.abs(pl) / prm['half']
            axis = np.argmax(rel, axis=1)
            nl = np.zeros_like(pl)
            nl[np.arange(len(pl)), axis] = np.sign(pl[np.arange(len(pl)), axis])
            n = nl @ prm['rot']
            uv = np.where(nl != 0, 1.0, np.sin(2 * np.pi * (pl + prm['half']) / self.period + 0.5))
            pattern = _soft_square(np.prod(uv, axis=1) * 2)
        elif kind == 'cylinder':
            rx, rz = p[:, 0] - prm['c'][0], p[:, 2] - prm['c'][2]
            on_cap = p[:, 1] > prm['h'] - 1e-6
            n = np.stack([rx, np.zeros_like(rx), rz], 1) / prm['r']
            n[on_cap] = (0.0, 1.0, 0.0)
            ang = np.arctan2(rz, rx)
            pattern = np.where(on_cap, 0.3, _soft_square(np.sin(self.extra['stripes'] * ang)))
        else:  # cone
            rx, rz = p[:, 0] - prm['c'][0], p[:, 2] - prm['c'][2]
            k2 = (prm['r'] / prm['h']) ** 2
            n = np.stack([rx, -k2 * (p[:, 1] - prm['h']), rz], 1)
            n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
            ang = np.arctan2(rz, rx)
            pattern = _soft_square(np.sin(self.extra['stripes'] * ang + 2 * np.pi * p[:, 1] / self.period))
        # fade texture contrast with distance so far-away tiles do not alias into noise
        fade = np.clip(1.3 - depth / 8.0, 0.3, 1.0)
        albedo = self.albedo[None, :] * (1.0 - self.contrast * fade * pattern)[:, None]
        return np.asarray(n, dtype=np.float64), albedo


def _random_albedo(rng: np.random.Generator, cls: int) -> np.ndarray:
    (h0, h1), (s0, s1), (v0, v1) = _COLOUR_FAMILY[cls]
    return _hsv_to_rgb(rng.uniform(h0, h1), rng.uniform(s0, s1), rng.uniform(v0, v1))


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def _make_object(rng: np.random.Generator, cls: int, x: float, z: float, size: float) -> _Primitive:
    albedo, contrast = _random_albedo(rng, cls), rng.uniform(0.25, 0.5)
    period = rng.uniform(0.25, 0.45)
    if cls == _SPHERE:
        return _Primitive(cls, 'sphere', {'c': np.array([x, size, z]), 'r': size}, albedo, contrast, period)
    if cls == _BOX:
        half = np.array([size, rng.uniform(0.6, 1.4) * size, rng.uniform(0.7, 1.0) * size])
        prm = {'c': np.array([x, half[1], z]), 'half': half, 'rot': _rot_y(rng.uniform(0, np.pi / 2))}
        return _Primitive(cls, 'box', prm, albedo, contrast, period)
    height = rng.uniform(1.5, 3.0) * size
    prm = {'c': np.array([x, 0.0, z]), 'r': size, 'h': height}
    kind = 'cylinder' if cls == _CYLINDER else 'cone'
    return _Primitive(cls, kind, prm, albedo, contrast, period, {'stripes': float(rng.integers(6, 11))})


def _plane(cls: int, normal, offset: float, rng: np.random.Generator, albedo=None) -> _Primitive:
    n = np.asarray(normal, dtype=np.float64)
    alb = _random_albedo(rng, cls) if albedo is None else albedo
    contrast = rng.uniform(0.3, 0.5) if cls == _FLOOR else 0.15
    return _Primitive(cls, 'plane', {'n': n, 'offset': offset}, alb, contrast, rng.uniform(0.4, 0.7))


def _sample_scene(rng: np.random.Generator, category: int) -> dict:
    """Draw camera, room and objects for one scene whose majority object class is ``category + 2``."""
    cam = {
        'height': rng.uniform(1.2, 1.8), 'pitch': np.deg2rad(rng.uniform(12, 24)),
        'yaw': np.deg2rad(rng.uniform(-12, 12)), 'fov': np.deg2rad(60.0),
    }
    back, left, right = rng.uniform(4.5, 9.0), rng.uniform(2.5, 4.5), rng.uniform(2.5, 4.5)
    wall_albedo = _random_albedo(rng, _WALL)
    prims = [
        _plane(_FLOOR, (0, 1, 0), 0.0, rng),
        _plane(_WALL, (0, 0, -1), -back, rng, wall_albedo),
        _plane(_WALL, (1, 0, 0), -left, rng, wall_albedo * 0.92),
        _plane(_WALL, (-1, 0, 0), -right, rng, wall_albedo * 0.92),
    ]
    n_obj = int(rng.integers(3, 7))
    dominant = _BOX + category
    others = [c for c in range(_BOX, _CONE + 1) if c != dominant]
    n_other = int(rng.integers(0, n_obj // 2))
    classes = [dominant] * (n_obj - n_other) + list(rng.choice(others, size=n_other))
    placed: List[tuple] = []
    for cls in classes:
        size = rng.uniform(0.25, 0.55)
        for _ in range(30):
            z = rng.uniform(2.2, back - 0.8)
            x = rng.uniform(-0.5, 0.5) * z + cam['yaw'] * z * 0.8
            x = float(np.clip(x, -left + size * 1.5, right - size * 1.5))
            if all((x - px) ** 2 + (z - pz) ** 2 > (size * 1.45 + pr + 0.1) ** 2 for px, pz, pr in placed):
                placed.append((x, z, size * 1.45))
                prims.append(_make_object(rng, int(cls), x, z, size))
                break
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.8, 1.4), rng.uniform(-0.9, -0.3)])
    return {
        'camera': cam, 'primitives': prims, 'light': light / np.linalg.norm(light),
        'ambient': rng.uniform(0.25, 0.35), 'n_holes': int(rng.integers(0, 4)),
    }


def _camera_rays(cam: dict, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray origin (3,), directions (P,3) scaled so that t equals z-depth, camera basis (3,3) rows r/down/f."""
    cp, sp, cy, sy = math.cos(cam['pitch']), math.sin(cam['pitch']), math.cos(cam['yaw']), math.sin(cam['yaw'])
    fwd = np.array([sy * cp, -sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    down = np.cross(right, fwd)
    focal = (size / 2) / math.tan(cam['fov'] / 2)
    coords = (np.arange(size) + 0.5 - size / 2) / focal
    yy, xx = np.meshgrid(coords, coords, indexing='ij')
    dirs = fwd[None] + xx.reshape(-1, 1) * right[None] + yy.reshape(-1, 1) * down[None]
    return np.array([0.0, cam['height'], 0.0]), dirs, np.stack([right, down, fwd])


def _invalid_mask(depth: np.ndarray, n_holes: int, rng: np.random.Generator) -> np.ndarray:
    size = depth.shape[0]
    invalid = depth > MAX_VALID_DEPTH_M
    # parallax shadow: with the projector right of the camera, the background pixel left of a
    # foreground edge is not lit by the pattern
    jump = np.diff(depth, axis=1)
    big = np.abs(jump) > 0.35
    invalid[:, :-1] |= big & (jump < 0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n_holes):
        cy, cx = rng.uniform(0, 1, size=2)
        ry, rx = rng.uniform(0.03, 0.09, size=2)
        invalid |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return ~invalid


def render_scene(seed: int | Sequence[int], category: int, image_size: int = 96,
                 with_normals: bool = False) -> Dict[str, np.ndarray]:
    """Render one scene.

    Returns numpy arrays: ``rgb`` uint8 (S,S,3), ``depth`` uint16 (S,S) in 1/6000 m, ``semseg`` uint8
    (S,S) class ids, ``mask_valid`` uint8 (S,S) in {0,255}, and ``normal`` uint8 (S,S,3) if asked.
    """
    if not 0 <= category < len(SCENE_CATEGORIES):
        raise ValueError(f"category must be in [0, {len(SCENE_CATEGORIES)}), got {category}")
    rng = np.random.default_rng(seed)
    scene = _sample_scene(rng, category)
    origin, dirs, basis = _camera_rays(scene['camera'], image_size)
    prims: List[_Primitive] = scene['primitives']
    hits = np.stack([p.intersect(origin, dirs) for p in prims])  # (n_prims, P)
    owner = np.argmin(hits, axis=0)
    depth = hits[owner, np.arange(dirs.shape[0])]
    if not np.all(np.isfinite(depth)):  # cannot happen inside a closed room; guard against regressions
        raise RuntimeError('synthetic renderer produced a ray that hit nothing')
    points = origin[None] + depth[:, None] * dirs
    normals = np.zeros_like(points)
    albedo = np.zeros_like(points)
    for i, prim in enumerate(prims):
        sel = owner == i
        if sel.any():
            normals[sel], albedo[sel] = prim.surface(points[sel], depth[sel])
    light = scene['light']
    lambert = np.clip(normals @ light, 0.0, None)
    lit = lambert > 0
    shadow_o = points[lit] + 1e-3 * normals[lit]
    shadow_d = np.broadcast_to(light, shadow_o.shape)
    blocked = np.zeros(lit.sum(), dtype=bool)
    for prim in prims[4:]:  # only objects cast shadows; the room is open towards the light
        blocked |= np.isfinite(prim.intersect(shadow_o, shadow_d))
    lambert[np.flatnonzero(lit)[blocked]] *= 0.15
    shading = scene['ambient'] + (1.0 - scene['ambient']) * lambert
    rgb = albedo * shading[:, None] + rng.normal(0.0, 0.012, size=albedo.shape)
    s = image_size
    depth_img = depth.reshape(s, s)
    out = {
        'rgb': (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(s, s, 3),
        'depth': np.clip(depth_img * DEPTH_UNITS_PER_METRE + 0.5, 0, 65535).astype(np.uint16),
        'semseg': np.array([p.cls for p in prims], dtype=np.uint8)[owner].reshape(s, s),
        'mask_valid': _invalid_mask(depth_img, scene['n_holes'], rng).astype(np.uint8) * 255,
    }
    if with_normals:
        n_cam = normals @ basis.T  # columns: x right, y down, z forward
        out['normal'] = (np.clip((n_cam + 1) / 2, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(s, s, 3)
    return out


def register_normal_modality(name: str = 'normal'):
    """The registry entry of the generator's normal modality (defined in :mod:`utils.data.modalities`)."""
    from utils.data.modalities import get_modality
    return get_modality(name)


def _write_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def _remove_stale(output_dir: str, modalities: tuple, counts: dict) -> None:
    """Regenerating into an existing folder: drop the completeness marker first, then the scenes and
    generator modalities the new set does not have, so the folder holds exactly what ``info.json`` says."""
    marker = os.path.join(output_dir, 'info.json')
    if os.path.exists(marker):
        os.remove(marker)
    for split, count in counts.items():
        for mod in MODALITIES + ('normal',):
            folder = os.path.join(output_dir, split, mod)
            if not os.path.isdir(folder):
                continue
            if mod not in modalities:
                shutil.rmtree(folder)
                continue
            for cat in os.listdir(folder):
                for name in os.listdir(os.path.join(folder, cat)):
                    stem = name.rsplit('.', 1)[0]
                    if stem.startswith(f'{split}_') and stem[len(split) + 1:].isdigit() and \
                            int(stem[len(split) + 1:]) >= count:
                        os.remove(os.path.join(folder, cat, name))


def make_synthetic_dataset(output_dir: str, num_train: int = 256, num_val: int = 64, image_size: int = 96,
                           seed: int = 0, with_normals: bool = False, verbose: bool = False) -> dict:
    """Write ``output_dir/{train,val}/<modality>/<category>/<split>_<index>.png`` and ``info.json``.

    Scene ``i`` of a split has category ``i % 4`` (balanced) and depends only on (seed, split, i), so
    a larger dataset extends a smaller one. ``info.json`` is written last and marks a complete dataset.
    Returns the metadata dict stored in ``info.json`` (plus the elapsed seconds).
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    modalities = MODALITIES + (('normal',) if with_normals else ())
    start = time.perf_counter()
    for split, count in (('train', num_train), ('val', num_val)):
        if count < 0:
            raise ValueError(f"num_{split} must be >= 0, got {count}")
    _remove_stale(output_dir, modalities, {'train': num_train, 'val': num_val})
    for split, count in (('train', num_train), ('val', num_val)):
        for mod in modalities:
            for cat in SCENE_CATEGORIES:
                os.makedirs(os.path.join(output_dir, split, mod, cat), exist_ok=True)
        for i in range(count):
            category = i % len(SCENE_CATEGORIES)
            arrays = render_scene((seed, _SPLIT_CODES[split], i), category, image_size, with_normals)
            name = f'{split}_{i:06d}.png'
            for mod in modalities:
                _write_png(arrays[mod], os.path.join(output_dir, split, mod, SCENE_CATEGORIES[category], name))
            if verbose and (i + 1) % 100 == 0:
                print(f'{split}: {i + 1}/{count} scenes', flush=True)
    info = {
        'classes': list(SYNTHETIC_CLASSES), 'categories': list(SCENE_CATEGORIES),
        'modalities': list(modalities), 'image_size': image_size, 'num_train': num_train,
        'num_val': num_val, 'seed': seed, 'depth_units_per_metre': DEPTH_UNITS_PER_METRE,
        'max_valid_depth_m': MAX_VALID_DEPTH_M,
        'normal_encoding': 'camera frame (x right, y down, z forward), (n + 1) / 2 * 255',
    }
    tmp = os.path.join(output_dir, 'info.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, 'info.json'))
    return {**info, 'seconds': time.perf_counter() - start}
