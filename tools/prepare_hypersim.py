#!/usr/bin/env python
"""Turn the Hypersim release (apple/ml-hypersim) into the multi-modal folder layout.

    python tools/prepare_hypersim.py --source /data/hypersim --split_csv metadata_images_split_scene_v1.csv \
        --save_path /data/hypersim_mm [--splits train val test] [--skip_missing_scenes]

Source: the per-scene archives `ai_VVV_NNN.zip` of the Hypersim data set (ml-hypersim project page on
GitHub; about 1.9 TB for all 461 scenes, 1-10 GB per scene), unpacked side by side, and the official split
file `metadata_images_split_scene_v1.csv` from the same repository (columns scene_name, camera_name,
frame_id, included_in_public_release, exclude_reason, split_partition_name). Per frame the tool reads::

    <scene>/images/scene_<camera>_final_hdf5/frame.NNNN.color.hdf5          HDR linear RGB, float (H, W, 3)
    <scene>/images/scene_<camera>_geometry_hdf5/frame.NNNN.depth_meters.hdf5  float (H, W), metres, NaN = none
    <scene>/images/scene_<camera>_geometry_hdf5/frame.NNNN.semantic.hdf5      int (H, W), NYU-40 ids, -1 = none

(each file holds one array named `dataset`) and writes, for the rows of the CSV with
`included_in_public_release` True, in the split named by `split_partition_name`::

    save_path/<split>/rgb/<scene>/<camera>_NNNN.png         8-bit sRGB, tone-mapped (below)
    save_path/<split>/depth/<scene>/<camera>_NNNN.png       16-bit, planar depth x --depth_scale (mm by default)
    save_path/<split>/mask_valid/<scene>/<camera>_NNNN.png  8-bit, 255 where the depth is finite and > 0
    save_path/<split>/semseg/<scene>/<camera>_NNNN.png      8-bit NYU-40 ids, 0 = unlabelled (was -1), 1..40

The Hypersim configs (cfgs/finetune/semseg/hypersim/) set `num_classes: 40` and `seg_reduce_zero_label`:
label 0 is ignored, 1..40 become 0..39.

Tone mapping (a simple global rule): every channel is multiplied by one exposure chosen so that the 90th
percentile of the luminance (0.2126 R + 0.7152 G + 0.0722 B) becomes 0.8 after the display gamma, then
raised to 1 / 2.2, clipped to [0, 1] and rounded to 8 bits. Non-finite values become black.

Depth: `depth_meters` is the distance from the camera centre along each pixel's ray, not the planar depth
(z) that NYUv2-style depth maps hold. `--depth_type planar` (default) converts it with a pinhole camera at
the image centre whose horizontal field of view is `--fov_deg` (60 degrees, Hypersim's standard camera):
z = distance * f / sqrt(x^2 + y^2 + f^2), x and y the pixel centre's offset from the image centre in
pixels, f = (W / 2) / tan(fov / 2). A few scenes use a modified (tilt-shift) camera, listed in the
release's metadata_camera_parameters.csv; for them this conversion is approximate. `--depth_type distance`
keeps the ray distance. Depth beyond 65535 / depth_scale (65.5 m at millimetres) is clipped.

All inputs (every scene folder and every file of every selected frame) are checked before anything is
written; a missing one is named. `--skip_missing_scenes` skips CSV scenes with no folder at all under
--source (for a partial download) and says how many.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np

from tools.lib.prepare import PrepareError, prepare_parser, read_csv, require, require_dirs, require_files, run_jobs
from utils.io import save_png

CSV_COLUMNS = ("scene_name", "camera_name", "frame_id", "included_in_public_release", "split_partition_name")
NYU40_CLASSES = 40
TOOL = "tools/prepare_hypersim.py"


def tone_map(hdr: np.ndarray, percentile: float = 90.0, target: float = 0.8, gamma: float = 2.2) -> np.ndarray:
    """HDR linear RGB (H, W, 3) float -> 8-bit sRGB (H, W, 3) uint8 with the exposure rule of the module doc."""
    rgb = np.nan_to_num(hdr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    lum = rgb @ np.array([0.2126, 0.7152, 0.0722])
    level = float(np.percentile(lum, percentile)) if lum.size else 0.0
    exposure = target ** gamma / level if level > 0 else 1.0
    return np.round((rgb * exposure).clip(0.0, 1.0) ** (1.0 / gamma) * 255.0).astype(np.uint8)


def ray_to_planar(distance: np.ndarray, fov_deg: float) -> np.ndarray:
    """Distance along each pixel's ray (H, W) -> planar depth z (H, W), pinhole camera at the image centre."""
    h, w = distance.shape
    f = (w / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    x = np.arange(w) + 0.5 - w / 2.0
    y = np.arange(h) + 0.5 - h / 2.0
    return distance * (f / np.sqrt(x[None, :] ** 2 + y[:, None] ** 2 + f ** 2))


def frame_paths(source: str, scene: str, camera: str, frame: int) -> dict[str, str]:
    """The three release files of one frame."""
    images = os.path.join(source, scene, "images")
    name = f"frame.{frame:04d}"
    return {"color": os.path.join(images, f"scene_{camera}_final_hdf5", f"{name}.color.hdf5"),
            "depth": os.path.join(images, f"scene_{camera}_geometry_hdf5", f"{name}.depth_meters.hdf5"),
            "semantic": os.path.join(images, f"scene_{camera}_geometry_hdf5", f"{name}.semantic.hdf5")}


def _read(h5py, path: str, ndim: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        if "dataset" not in f:
            raise PrepareError(f"{path}: array 'dataset' missing (found {sorted(f.keys())})")
        a = np.asarray(f["dataset"])
    if a.ndim != ndim or (ndim == 3 and a.shape[2] != 3):
        raise PrepareError(f"{path}: array of shape {a.shape}; expected {'(H, W, 3)' if ndim == 3 else '(H, W)'}")
    return a


def convert_frame(paths: dict[str, str], fov_deg: float | None, depth_scale: float) -> dict[str, np.ndarray]:
    """Release files of one frame -> {'rgb', 'depth', 'mask_valid', 'semseg'} arrays of one size."""
    h5py = require("h5py", TOOL)
    rgb = tone_map(_read(h5py, paths["color"], 3))
    dist = _read(h5py, paths["depth"], 2).astype(np.float64)
    labels = _read(h5py, paths["semantic"], 2).astype(np.int64)
    if not rgb.shape[:2] == dist.shape == labels.shape:
        raise PrepareError(f"frame files of different sizes: colour {rgb.shape[:2]}, depth {dist.shape}, "
                           f"semantic {labels.shape} ('{paths['color']}')")
    bad = (labels < -1) | (labels > NYU40_CLASSES)
    if bad.any():
        raise PrepareError(f"{paths['semantic']}: ids {sorted(set(labels[bad].tolist()))[:5]} out of range; "
                           f"expected NYU-40 ids 1..{NYU40_CLASSES} or -1 (unlabelled)")
    valid = np.isfinite(dist) & (dist > 0)
    dist = np.where(valid, dist, 0.0)
    depth = ray_to_planar(dist, fov_deg) if fov_deg is not None else dist
    depth_png = np.clip(np.round(depth * depth_scale), 0, 2 ** 16 - 1).astype(np.uint16)
    valid &= depth_png > 0
    return {"rgb": rgb, "depth": depth_png, "mask_valid": np.where(valid, 255, 0).astype(np.uint8),
            "semseg": np.where(labels < 0, 0, labels).astype(np.uint8)}


def select_frames(rows: list[dict], source: str, splits, skip_missing_scenes: bool) -> list[tuple]:
    """(split, scene, camera, frame) of every public frame of ``splits`` whose scene is present."""
    frames, absent = [], set()
    for i, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header = line 1)
        if row["included_in_public_release"].lower() != "true" or row["split_partition_name"] not in splits:
            continue
        try:
            frame = int(row["frame_id"])
        except ValueError:
            raise PrepareError(f"split CSV line {i}: frame_id {row['frame_id']!r} is not an integer") from None
        if not os.path.isdir(os.path.join(source, row["scene_name"])):
            absent.add(row["scene_name"])
            continue
        frames.append((row["split_partition_name"], row["scene_name"], row["camera_name"], frame))
    if absent and not skip_missing_scenes:
        names = sorted(absent)
        raise PrepareError(f"{len(names)} scene folder(s) of the split CSV missing under --source '{source}': "
                           f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} (download them, or pass "
                           "--skip_missing_scenes to prepare the scenes present)")
    if absent:
        print(f"skipping {len(absent)} scene(s) of the split CSV absent under {source}")
    if not frames:
        raise PrepareError(f"no public frame of splits {list(splits)} found under --source '{source}'")
    return frames


def _write_frame(source: str, save_path: str, split: str, scene: str, camera: str, frame: int,
                 fov_deg: float | None, depth_scale: float) -> None:
    arrays = convert_frame(frame_paths(source, scene, camera, frame), fov_deg, depth_scale)
    for modality, array in arrays.items():
        save_png(os.path.join(save_path, split, modality, scene, f"{camera}_{frame:04d}.png"), array)


def prepare(args: argparse.Namespace) -> dict[str, int]:
    """Check the CSV and every input file, then convert every frame; returns frames per split."""
    require("h5py", TOOL)
    require_dirs([args.source], hint="--source: the folder holding the unpacked scene folders ai_VVV_NNN/")
    frames = select_frames(read_csv(args.split_csv, CSV_COLUMNS), args.source, args.splits, args.skip_missing_scenes)
    require_files([p for _, s, c, f in frames for p in frame_paths(args.source, s, c, f).values()],
                  hint="listed in the split CSV; expected the unpacked per-scene release")
    fov = args.fov_deg if args.depth_type == "planar" else None
    run_jobs(_write_frame, ((args.source, args.save_path, *fr, fov, args.depth_scale) for fr in frames),
             args.num_threads, window=4)
    counts = {s: sum(fr[0] == s for fr in frames) for s in args.splits}
    for split, n in counts.items():
        print(f"{split}: {n} frames -> {os.path.join(args.save_path, split)}")
    return counts


def main(argv=None) -> dict[str, int]:
    p = prepare_parser(__doc__, {"--source": "folder holding the unpacked scene folders ai_VVV_NNN/",
                                 "--split_csv": "metadata_images_split_scene_v1.csv of ml-hypersim"},
                       "output root; one folder per split is created inside", "parallel frame conversions")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="split_partition_name values")
    p.add_argument("--depth_type", default="planar", choices=["planar", "distance"],
                   help="planar depth z (converted from the ray distance) or the ray distance as released")
    p.add_argument("--fov_deg", type=float, default=60.0, help="horizontal field of view for --depth_type planar")
    p.add_argument("--depth_scale", type=float, default=1000.0, help="PNG value per metre (1000 = millimetres)")
    p.add_argument("--skip_missing_scenes", action="store_true", help="prepare only the scenes present")
    return prepare(p.parse_args(argv))


if __name__ == "__main__":
    main()
