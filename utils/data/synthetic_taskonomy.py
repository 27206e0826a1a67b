"""The synthetic scenes written in the Taskonomy layout (see :mod:`utils.data.taskonomy`), with the
split CSVs ``tiny_{train,val,test}.csv`` in the data root, so every Taskonomy config runs with
``run_finetuning_taskonomy.py --data_path D`` and no real data.

Files per view, in the Taskonomy formats and units:

* rgb: the rendered image; normal: camera-frame normals (8-bit colour); mask_valid: 8-bit, 255 = valid;
* depth_zbuffer, depth_euclidean: 16-bit z-buffer depth in 1/512 m (the Taskonomy unit); the synthetic
  scenes have no Euclidean depth, so both hold the z-buffer depth;
* stand-ins with the right file kind and value range (the scenes do not model these): principal_curvature =
  the normal image (8-bit colour, 2 channels used), reshading = the grey-scale shading of rgb (8-bit),
  edge_texture = Sobel magnitude of the grey image (16-bit, within the 0..0.25 range that
  ``TASKONOMY_SCALING`` clamps to),
  edge_occlusion = Sobel magnitude of the depth (16-bit), keypoints2d / keypoints3d = the texture / occlusion
  edge maps (16-bit).

Each split has its own buildings (``synthetic_<split>_<k>``, ``views_per_building`` points each).
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

from utils.data.synthetic import DEPTH_UNITS_PER_METRE, _SPLIT_CODES, SCENE_CATEGORIES, render_scene
from utils.data.taskonomy import SPLIT_COLUMNS, taskonomy_file
from utils.io import atomic_open

__all__ = ["TASKONOMY_SYNTHETIC_TASKS", "make_taskonomy_dataset"]

TASKONOMY_SYNTHETIC_TASKS = ("rgb", "mask_valid", "depth_zbuffer", "depth_euclidean", "normal", "principal_curvature",
                             "reshading", "edge_texture", "edge_occlusion", "keypoints2d", "keypoints3d")
_TASKONOMY_UNITS_PER_METRE = 512.0


def _sobel(x: np.ndarray) -> np.ndarray:
    """Gradient magnitude (S, S) of a float image (edge padding)."""
    p = np.pad(x, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return np.hypot(gx, gy)


def _u16(x: np.ndarray, top: float) -> np.ndarray:
    """Scale ``x`` so that its maximum maps to ``top`` (a 16-bit value)."""
    return np.clip(x / max(float(x.max()), 1e-12) * top, 0, 65535).astype(np.uint16)


def _views(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One scene's arrays -> the file array of every Taskonomy task."""
    metres = arrays["depth"].astype(np.float64) / DEPTH_UNITS_PER_METRE
    zbuffer = np.clip(metres * _TASKONOMY_UNITS_PER_METRE, 0, 65535).astype(np.uint16)
    grey = arrays["rgb"].astype(np.float64).mean(axis=2)
    texture = _u16(_sobel(grey / 255.0), 0.25 * 65535)
    occlusion = _u16(_sobel(metres), 65535)
    return {"rgb": arrays["rgb"], "mask_valid": arrays["mask_valid"], "depth_zbuffer": zbuffer,
            "depth_euclidean": zbuffer, "normal": arrays["normal"], "principal_curvature": arrays["normal"],
            "reshading": np.repeat(grey.round().astype(np.uint8)[..., None], 3, axis=2),
            "edge_texture": texture, "edge_occlusion": occlusion, "keypoints2d": texture, "keypoints3d": occlusion}


def _write_csv(path: str, rows: list[tuple[str, int, int]]) -> None:
    with atomic_open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(rows)


def make_taskonomy_dataset(output_dir: str, num_train: int = 32, num_val: int = 8, num_test: int = 8,
                           image_size: int = 64, seed: int = 0, views_per_building: int = 8) -> dict[str, int]:
    """Write the Taskonomy-layout synthetic data set to ``output_dir``; returns the rows per split."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, n in counts.items():
        if n < 1:
            raise ValueError(f"num_{split} must be >= 1, got {n}")
        rows = []
        for i in range(n):
            building, point = f"synthetic_{split}_{i // views_per_building}", i % views_per_building
            category = i % len(SCENE_CATEGORIES)
            arrays = render_scene((seed, _SPLIT_CODES[split], i), category, image_size, with_normals=True)
            for task, array in _views(arrays).items():
                path = taskonomy_file(output_dir, task, building, str(point), "0")
                with atomic_open(path, fsync=False) as f:
                    Image.fromarray(array).save(f, format="PNG", compress_level=1)
            rows.append((building, point, 0))
        _write_csv(os.path.join(output_dir, f"tiny_{split}.csv"), rows)
    return counts
