#!/usr/bin/env python
"""Turn the official NYUv2 labelled release into the multi-modal folder layout.

    python tools/prepare_nyuv2.py --dataset_path nyu_depth_v2_labeled.mat --splits_path splits.mat \
        --class_mapping_path classMapping40.mat --save_path data/nyuv2

Sources (three files; nothing is downloaded by this tool):

- `nyu_depth_v2_labeled.mat` (about 2.8 GB): the 1449 densely labelled RGB-D images of the NYU Depth
  Dataset V2 (Silberman et al., ECCV 2012), "Labeled dataset" on the data set's project page at NYU.
- `splits.mat` (a few KB): the standard 795 / 654 train / test split (`trainNdxs`, `testNdxs`), from the
  same project page.
- `classMapping40.mat` (a few KB): `mapClass`, the mapping of the 894 labelled classes to the 40 classes of
  Gupta et al. (CVPR 2013), distributed with their RGB-D toolkit (rgbd-utils).

Writes, for the standard split (795 train / 654 test images, `trainNdxs` / `testNdxs` of splits.mat)::

    save_path/{train,test}/rgb/data/NNNN.png         8-bit RGB, 640x480
    save_path/{train,test}/depth/data/NNNN.png       16-bit, depth in MILLIMETRES (0 = no depth)
    save_path/{train,test}/mask_valid/data/NNNN.png  8-bit, 255 where depth > 0, else 0
    save_path/{train,test}/semseg/data/NNNN.png      8-bit palette PNG of NYU-40 ids (0 = unlabelled, 1..40)
    save_path/{train,test}/{normal,mask}/data/NNNN.png   copied from --normals_path when given

NNNN is the 0-based index of the image in the 1449-image .mat file.

Depth units. The depth fine-tuning normalises raw PNG values with NYU_MEAN = 2070.78 and NYU_STD = 777.57
(utils/data/constants.py). Those can only be millimetre statistics: in 6553.6-per-metre units the mean
would be 0.32 m, closer than the Kinect's ~0.5 m minimum range, whereas in millimetres it is 2.07 m (std
0.78 m), which fits indoor NYU scenes. Depth is nevertheless written in metres x 6553.6 (2^16 / 10 m) by
default (`--depth_scale 6553.6`), the unit the published configs and their normalisation were tuned on, so
they reproduce the published numbers; `--depth_scale 1000` writes millimetres (then the same constants
describe the data). `mask_valid`, which the depth fine-tuning config needs, is written too. With the
default `--depth_key depths` (the in-painted depth of the labelled release) almost every pixel is valid;
`--depth_key rawDepths` keeps the sensor holes.

Inputs: nyu_depth_v2_labeled.mat is MATLAB v7.3 (HDF5, read with h5py: arrays come in reversed axis
order and are transposed back); splits.mat and classMapping40.mat are MATLAB v5 (scipy.io.loadmat).
`mapClass` maps the 894 original class ids (1-based) to NYU-40; label 0 stays 0.
"""
import argparse
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor


import numpy as np

from tools.lib.prepare import prepare_parser
from utils.io import atomic_write, save_png
from utils.vis import semseg_palette

NYU40_CLASSES = 40


def _require(module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise SystemExit(f"tools/prepare_nyuv2.py needs '{module.split('.')[0]}' to read the NYUv2 .mat files "
                         f"(pip install h5py scipy, see requirements.txt): {e}") from e


def read_splits(path: str) -> dict[str, np.ndarray]:
    """{'train': 0-based indices, 'test': ...} from splits.mat (1-based `trainNdxs`, `testNdxs`)."""
    mat = _require("scipy.io").loadmat(path)
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("__"))
            raise SystemExit(f"{path}: variable '{key}' missing (found {found})")
        idx = np.asarray(mat[key]).reshape(-1).astype(np.int64)
        if idx.size and idx.min() < 1:
            raise SystemExit(f"{path}: '{key}' must hold 1-based MATLAB indices, found {idx.min()}")
        out[split] = idx - 1
    return out


def read_class_mapping(path: str) -> np.ndarray:
    """Lookup table: original class id (0 = unlabelled, 1..K) -> NYU-40 id (0..40)."""
    mat = _require("scipy.io").loadmat(path)
    if "mapClass" not in mat:
        raise SystemExit(f"{path}: variable 'mapClass' missing")
    mapping = np.asarray(mat["mapClass"]).reshape(-1).astype(np.int64)
    if mapping.min() < 0 or mapping.max() > NYU40_CLASSES:
        raise SystemExit(f"{path}: mapClass values must be in 0..{NYU40_CLASSES}, got {mapping.min()}..{mapping.max()}")
    return np.concatenate([[0], mapping]).astype(np.uint8)


def convert_sample(f, i: int, lut: np.ndarray, depth_key: str, depth_scale: float) -> dict[str, np.ndarray]:
    """Image i of the opened HDF5 file -> uint8/uint16 arrays in (H, W[, C]) order."""
    rgb = np.ascontiguousarray(np.asarray(f["images"][i]).transpose(2, 1, 0)).astype(np.uint8)
    depth_m = np.asarray(f[depth_key][i], dtype=np.float64).T
    labels = np.asarray(f["labels"][i]).T.astype(np.int64)
    if labels.max() >= len(lut):
        raise SystemExit(f"image {i}: class id {labels.max()} has no entry in mapClass ({len(lut) - 1} classes)")
    depth = np.clip(np.round(np.nan_to_num(depth_m) * depth_scale), 0, 2 ** 16 - 1).astype(np.uint16)
    return {"rgb": rgb, "depth": depth, "mask_valid": np.where(depth > 0, 255, 0).astype(np.uint8),
            "semseg": lut[labels]}


def _copy_normals(normals_path: str, name: str, out_root: str) -> None:
    for src_dir, modality in (("normals", "normal"), ("masks", "mask")):
        src = os.path.join(normals_path, src_dir, name)
        if not os.path.isfile(src):
            raise SystemExit(f"--normals_path: file '{src}' missing (expected {src_dir}/NNNN.png per image)")
        with open(src, "rb") as fh:
            atomic_write(os.path.join(out_root, modality, "data", name), fh.read())


def prepare(args: argparse.Namespace) -> dict[str, int]:
    """Write every split; returns the number of images per split."""
    h5py = _require("h5py")
    for flag, path in (("--dataset_path", args.dataset_path), ("--splits_path", args.splits_path),
                       ("--class_mapping_path", args.class_mapping_path)):
        if not os.path.isfile(path):
            raise SystemExit(f"{flag}: file '{path}' not found (see the sources in tools/prepare_nyuv2.py --help)")
    if args.normals_path and not os.path.isdir(args.normals_path):
        raise SystemExit(f"--normals_path: folder '{args.normals_path}' not found (expected normals/ and masks/)")
    splits, lut = read_splits(args.splits_path), read_class_mapping(args.class_mapping_path)
    palette = semseg_palette(NYU40_CLASSES + 1)
    counts = {}
    with h5py.File(args.dataset_path, "r") as f, ThreadPoolExecutor(args.num_threads) as pool:
        for key in ("images", "labels", args.depth_key):
            if key not in f:
                raise SystemExit(f"{args.dataset_path}: dataset '{key}' missing (found {sorted(f.keys())})")
        n = f["images"].shape[0]
        for split, indices in splits.items():
            if indices.size and indices.max() >= n:
                raise SystemExit(f"{args.splits_path}: index {indices.max() + 1} beyond the {n} images of "
                                 f"{args.dataset_path}")
            root = os.path.join(args.save_path, split)
            jobs: deque = deque()
            for i in indices:
                while len(jobs) > 16 * args.num_threads:  # bounded memory: ~2 MB of arrays per image
                    jobs.popleft().result()
                name = f"{i:04d}.png"
                sample = convert_sample(f, int(i), lut, args.depth_key, args.depth_scale)
                for modality, array in sample.items():
                    jobs.append(pool.submit(save_png, os.path.join(root, modality, "data", name), array,
                                            palette=palette if modality == "semseg" else None))
                if args.normals_path:
                    jobs.append(pool.submit(_copy_normals, args.normals_path, name, root))
            while jobs:
                jobs.popleft().result()
            counts[split] = len(indices)
            print(f"{split}: {len(indices)} images -> {root}")
    return counts


def main(argv=None) -> dict[str, int]:
    p = prepare_parser(__doc__, {"--dataset_path": "nyu_depth_v2_labeled.mat (MATLAB v7.3 / HDF5)",
                                 "--splits_path": "splits.mat with 1-based trainNdxs / testNdxs",
                                 "--class_mapping_path": "classMapping40.mat with mapClass (894 -> 40)"},
                       "output root; train/ and test/ are created inside", "parallel PNG encoders", num_threads_default=4)
    p.add_argument("--normals_path", default=None, help="optional folder with normals/NNNN.png and masks/NNNN.png")
    p.add_argument("--depth_key", default="depths", choices=["depths", "rawDepths"],
                   help="in-painted depth (published) or raw sensor depth with holes")
    p.add_argument("--depth_scale", type=float, default=6553.6,
                   help="PNG value per metre: 6553.6 = the published files (2^16 / 10 m), 1000 = millimetres")
    return prepare(p.parse_args(argv))


if __name__ == "__main__":
    main()
