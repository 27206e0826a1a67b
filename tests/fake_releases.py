"""Tiny fake copies of official data-set releases (NYUv2, ADE20K, Hypersim, Taskonomy) in their published folder
layouts and file formats, for the tests of tools/prepare_*.py. Images are a few pixels, values are seeded
random, and every builder returns what it wrote so that tests can compare the prepared output with it."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

H, W = 12, 16  # every fake image


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_ade20k(root: Path, n_train: int = 3, n_val: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_{train,val}_NNNNNNNN.{jpg,png};
    labels 0..150. Returns {stem: label map (H, W) uint8}."""
    rng = np.random.default_rng(seed)
    labels = {}
    for split, tag, n in (("training", "train", n_train), ("validation", "val", n_val)):
        for i in range(1, n + 1):
            stem = f"ADE_{tag}_{i:08d}"
            rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(root / "images" / split / f"{stem}.jpg", quality=95)
            labels[stem] = rng.integers(0, 151, (H, W), dtype=np.uint8)
            _png(root / "annotations" / split / f"{stem}.png", labels[stem])
    return labels


def _h5(path: Path, array: np.ndarray) -> None:
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["dataset"] = array


def make_hypersim(root: Path, scenes: dict[str, list[tuple[str, int, str]]], absent_scenes: tuple[str, ...] = (),
                  seed: int = 0) -> tuple[Path, dict]:
    """One folder per scene: ``images/scene_<cam>_{final,geometry}_hdf5/frame.NNNN.*.hdf5`` for every
    (camera, frame, split) of ``scenes``; the split CSV lists them (public), plus one non-public frame per
    scene and every frame of ``absent_scenes`` (in the CSV, not on disk). Colour is a constant HDR value per
    frame, depth the ray distance to a fronto-parallel wall (60 degree camera) with a NaN hole, semantic ids
    -1..40. Returns (CSV path, {(scene, cam, frame): dict of the arrays written, plus 'wall_m'})."""
    rng = np.random.default_rng(seed)
    rows, written = [], {}
    f = (W / 2) / np.tan(np.radians(30.0))  # focal length in pixels of a 60 degree horizontal field of view
    u, v = np.meshgrid(np.arange(W) + 0.5 - W / 2, np.arange(H) + 0.5 - H / 2)
    ray_per_planar = np.sqrt(u ** 2 + v ** 2 + f ** 2) / f  # ray length to a wall at planar depth 1
    for scene, frames in scenes.items():
        for cam, frame, split in frames:
            wall = float(rng.uniform(1.0, 9.0))
            distance = wall * ray_per_planar  # planar depth `wall` everywhere
            distance[0, :2] = np.nan
            colour = np.full((H, W, 3), rng.uniform(0.05, 3.0), np.float16)
            semantic = rng.integers(-1, 41, (H, W)).astype(np.int16)
            images = root / scene / "images"
            _h5(images / f"scene_{cam}_final_hdf5" / f"frame.{frame:04d}.color.hdf5", colour)
            _h5(images / f"scene_{cam}_geometry_hdf5" / f"frame.{frame:04d}.depth_meters.hdf5",
                distance.astype(np.float16))
            _h5(images / f"scene_{cam}_geometry_hdf5" / f"frame.{frame:04d}.semantic.hdf5", semantic)
            written[(scene, cam, frame)] = {"color": colour, "distance": distance.astype(np.float16),
                                            "semantic": semantic, "wall_m": wall}
            rows.append([scene, cam, frame, "True", "", split])
        rows.append([scene, "cam_00", 99, "False", "camera trajectory too close to a wall", "train"])
    rows += [[scene, "cam_00", 0, "True", "", "train"] for scene in absent_scenes]
    header = ["scene_name", "camera_name", "frame_id", "included_in_public_release", "exclude_reason",
              "split_partition_name"]
    return _csv(root / "metadata_images_split_scene_v1.csv", header, rows), written


# domain -> (channels, dtype) of the fake Taskonomy files
TASKONOMY_FILES = {
    "rgb": (3, np.uint8), "normal": (3, np.uint8), "principal_curvature": (3, np.uint8), "reshading": (3, np.uint8),
    "depth_zbuffer": (1, np.uint16), "depth_euclidean": (1, np.uint16), "edge_texture": (1, np.uint16),
    "edge_occlusion": (1, np.uint16), "keypoints2d": (1, np.uint16), "keypoints3d": (1, np.uint16),
    "mask_valid": (1, np.uint8),
}


def make_taskonomy(root: Path, buildings: dict[str, str], samples: tuple[str, ...] = ("point_0_view_0", "point_3_view_1"),
                   domains=tuple(TASKONOMY_FILES), seed: int = 0, size: tuple[int, int] = (H, W)) -> Path:
    """``<domain>/taskonomy/<building>/<sample>_domain_<domain>.png`` for every building (-> its split) and
    domain, ``mask_valid`` files named with domain depth_zbuffer as the Omnidata tool writes them, and the
    split CSV (id, train, val, test) listing ``buildings``; images of ``size`` (height, width). Returns the CSV
    path."""
    rng = np.random.default_rng(seed)
    for building in buildings:
        for domain in domains:
            channels, dtype = TASKONOMY_FILES[domain]
            file_domain = "depth_zbuffer" if domain == "mask_valid" else domain
            for sample in samples:
                shape = (*size, channels) if channels > 1 else size
                if domain == "mask_valid":
                    array = np.where(rng.random(shape) < 0.8, 255, 0).astype(np.uint8)
                else:
                    array = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
                _png(root / domain / "taskonomy" / building / f"{sample}_domain_{file_domain}.png", array)
    rows = [[b, int(s == "train"), int(s == "val"), int(s == "test")] for b, s in buildings.items()]
    return _csv(root / "train_val_test_tiny.csv", ["id", "train", "val", "test"], rows)


def make_nyuv2(root: Path, n: int = 5, h: int = 24, w: int = 32, k: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    """The three NYUv2 files ``tools/prepare_nyuv2.py`` reads, in ``root``: ``nyu_depth_v2_labeled.mat``
    (MATLAB v7.3 / HDF5: images, depths with holes, rawDepths, labels of ``k`` classes), ``splits.mat``
    (1-based train 1, 3, 5 and test 2, 4 of ``n`` = 5) and ``classMapping40.mat``. Returns the arrays: rgb
    (n, h, w, 3), depth (n, h, w) metres, labels (n, h, w) and lut (k + 1,) original class -> NYU-40."""
    import h5py
    import scipy.io

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.5, 9.5, (n, h, w)).astype(np.float32)
    depth[:, :3, :4] = 0.0  # holes
    labels = rng.integers(0, k + 1, (n, h, w)).astype(np.uint16)
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:  # column-major: h5py sees the axes reversed
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["depths"] = depth.transpose(0, 2, 1)
        f["rawDepths"] = (depth * (depth > 2)).transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1], [3], [5]]), "testNdxs": np.array([[2], [4]])})
    map_class = np.array([[5, 40, 1, 0, 12, 7, 40]])[:, :k]  # original class c (1-based) -> NYU-40
    scipy.io.savemat(root / "classMapping40.mat", {"mapClass": map_class})
    return {"rgb": rgb, "depth": depth, "labels": labels, "lut": np.concatenate([[0], map_class[0]])}
