"""Synthetic scene generator: determinism, value ranges, cross-modal geometry, layout, speed, CLI."""
import json
import math
import os
import runpy
import sys
import time

import numpy as np
import pytest
from PIL import Image

from utils.data.modalities import MODALITIES
from utils.data.synthetic import (DEPTH_UNITS_PER_METRE, MAX_VALID_DEPTH_M, SCENE_CATEGORIES, SYNTHETIC_CLASSES,
                                  make_synthetic_dataset, render_scene)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_render_is_deterministic_and_seed_dependent():
    a = render_scene((3, 0, 7), 1, 48, with_normals=True)
    b = render_scene((3, 0, 7), 1, 48, with_normals=True)
    c = render_scene((4, 0, 7), 1, 48, with_normals=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a['rgb'], c['rgb'])
    assert not np.array_equal(a['depth'], c['depth'])


def test_value_ranges_and_dtypes():
    n_invalid, depth_values, classes_seen = [], [], set()
    for i in range(24):
        s = render_scene((0, 0, i), i % 4, 64)
        assert s['rgb'].dtype == np.uint8 and s['rgb'].shape == (64, 64, 3)
        assert s['depth'].dtype == np.uint16 and s['depth'].shape == (64, 64)
        assert s['semseg'].dtype == np.uint8 and s['semseg'].max() < len(SYNTHETIC_CLASSES)
        assert set(np.unique(s['mask_valid'])) <= {0, 255}
        classes_seen |= set(np.unique(s['semseg']).tolist())
        depth_values.append(s['depth'].ravel())
        n_invalid.append((s['mask_valid'] == 0).mean())
        # beyond the sensor range is always invalid
        assert np.all(s['mask_valid'][s['depth'] > (MAX_VALID_DEPTH_M + 0.01) * DEPTH_UNITS_PER_METRE] == 0)
    assert classes_seen == set(range(len(SYNTHETIC_CLASSES)))
    d = np.concatenate(depth_values) / DEPTH_UNITS_PER_METRE
    # metres: near floor about 1 m, far walls up to ~10 m -> a good part of the 16-bit range
    assert 0.5 < np.percentile(d, 1) < 2.5 and 6.0 < np.percentile(d, 99) < 11.0
    assert 0.01 < np.mean(n_invalid) < 0.3  # some realistic holes, mostly valid


def test_floor_pixels_are_coplanar_in_3d():
    """Depth and semseg agree on geometry: back-projected floor pixels lie on one plane."""
    size = 64
    focal = (size / 2) / math.tan(math.radians(30))
    for i in range(4):
        s = render_scene((1, 0, i), i, size)
        z = s['depth'].astype(np.float64) / DEPTH_UNITS_PER_METRE
        rows, cols = np.nonzero(s['semseg'] == 0)
        zz = z[rows, cols]
        pts = np.stack([(cols + 0.5 - size / 2) / focal * zz, (rows + 0.5 - size / 2) / focal * zz, zz], 1)
        centred = pts - pts.mean(0)
        residual = np.linalg.svd(centred, compute_uv=False)[-1] / math.sqrt(len(pts))
        assert len(pts) > 200 and residual < 0.005, residual
        # objects stand in front of the wall: object pixels are closer than the median wall depth
        obj, wall = s['semseg'] >= 2, s['semseg'] == 1
        if obj.any() and wall.any():
            assert np.median(z[obj]) < np.median(z[wall])


def test_dataset_layout_balance_and_extension(tmp_path):
    info = make_synthetic_dataset(str(tmp_path / 'a'), num_train=8, num_val=4, image_size=32, seed=5)
    make_synthetic_dataset(str(tmp_path / 'b'), num_train=12, num_val=4, image_size=32, seed=5)
    assert json.loads((tmp_path / 'a' / 'info.json').read_text())['classes'] == list(SYNTHETIC_CLASSES)
    assert info['modalities'] == ['rgb', 'depth', 'semseg', 'mask_valid']
    for split, count in (('train', 8), ('val', 4)):
        names = {m: sorted(str(p.relative_to(tmp_path / 'a' / split / m))
                           for p in (tmp_path / 'a' / split / m).rglob('*.png')) for m in info['modalities']}
        assert all(v == names['rgb'] for v in names.values())  # same names across modalities
        per_cat = [sum(n.startswith(c + os.sep) for n in names['rgb']) for c in SCENE_CATEGORIES]
        assert per_cat == [count // 4] * 4
    # a larger dataset with the same seed extends the smaller one byte for byte
    f = os.path.join('train', 'depth', 'spheres', 'train_000005.png')
    assert (tmp_path / 'a' / f).read_bytes() == (tmp_path / 'b' / f).read_bytes()
    depth = np.array(Image.open(tmp_path / 'a' / f))
    assert depth.dtype == np.uint16 and depth.max() > 255


def test_generator_speed(tmp_path):
    # CPU time of this process, so that other jobs on a shared machine do not make the test flaky
    start = time.process_time()
    make_synthetic_dataset(str(tmp_path), num_train=300, num_val=0, image_size=96, seed=0)
    elapsed = time.process_time() - start
    assert elapsed < 10.0, f'300 scenes at 96 px took {elapsed:.1f}s of CPU time'


def test_cli_with_normals_and_preview(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'syn'
    monkeypatch.setattr(sys, 'argv', ['make_synthetic_dataset.py', '--output_dir', str(out), '--num_train', '4',
                                      '--num_val', '4', '--image_size', '32', '--seed', '2', '--normals',
                                      '--preview', str(tmp_path / 'preview.png')])
    registry = dict(MODALITIES)
    try:
        runpy.run_path(os.path.join(ROOT, 'tools', 'make_synthetic_dataset.py'), run_name='__main__')
    finally:  # the preview registers 'normal'; keep the registry as other tests expect it
        MODALITIES.clear()
        MODALITIES.update(registry)
    assert 'wrote 4 train + 4 val scenes' in capsys.readouterr().out
    # preview: 4 rows x 5 modality columns of 32 px scenes upscaled to 128 px, 2 px gaps
    assert Image.open(tmp_path / 'preview.png').size == (5 * 130, 4 * 130)
    normal = np.array(Image.open(out / 'val' / 'normal' / 'boxes' / 'val_000000.png')).astype(np.float64)
    n = normal / 255 * 2 - 1
    assert normal.shape == (32, 32, 3)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=0.03)  # unit normals after decoding
    floor = np.array(Image.open(out / 'val' / 'semseg' / 'boxes' / 'val_000000.png')) == 0
    assert np.all(n[floor][:, 1] < -0.7)  # floor normals point up, i.e. negative camera y (y is down)


@pytest.mark.parametrize('bad', [{'image_size': 8}, {'num_train': -1}])
def test_bad_arguments(tmp_path, bad):
    kwargs = {'num_train': 1, 'num_val': 0, 'image_size': 32, **bad}
    with pytest.raises(ValueError, match='image_size|num_train'):
        make_synthetic_dataset(str(tmp_path), **kwargs)


def test_regenerating_a_smaller_set_leaves_no_stale_files(tmp_path):
    make_synthetic_dataset(str(tmp_path), num_train=8, num_val=4, image_size=16, with_normals=True)
    info = make_synthetic_dataset(str(tmp_path), num_train=4, num_val=2, image_size=16)
    for split, count in (("train", 4), ("val", 2)):
        for mod in info["modalities"]:
            files = sorted(p.name for p in (tmp_path / split / mod).rglob("*.png"))
            assert files == sorted(f"{split}_{i:06d}.png" for i in range(count)), (split, mod)
        assert not (tmp_path / split / "normal").exists()  # the new set has no normals
    assert json.loads((tmp_path / "info.json").read_text())["num_train"] == 4


def test_taskonomy_layout_reads_back_with_the_published_scaling(tmp_path):
    """--layout taskonomy: split CSVs with the published columns, files named as published, and the data set
    gives the published targets: depth clamp(x / 65535, 0, 8000 / 65535) / (8000 / 65535), normal / 255, and a
    valid mask eroded to whole 4x4 cells."""
    import csv

    import torch

    from utils.data.finetune_transforms import DenseRegressionTransform
    from utils.data.taskonomy import TaskonomyDataset

    runpy.run_path(os.path.join(ROOT, "tools", "make_synthetic_dataset.py"), run_name="not_main")["main"](
        ["--layout", "taskonomy", "--output_dir", str(tmp_path), "--num_train", "3", "--num_val", "2",
         "--num_test", "1", "--image_size", "32"])
    with open(tmp_path / "tiny_train.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["building", "point", "view"]] + [["synthetic_train_0", str(i), "0"] for i in range(3)]
    zb = np.asarray(Image.open(tmp_path / "depth_zbuffer/synthetic_train_0/point_1_view_0_domain_depth_zbuffer.png"))
    mv = np.asarray(Image.open(tmp_path / "mask_valid/synthetic_train_0/point_1_view_0_domain_depth_zbuffer.png"))
    nm = np.asarray(Image.open(tmp_path / "normal/synthetic_train_0/point_1_view_0_domain_normal.png"))
    tasks = ["rgb", "depth_zbuffer", "normal", "mask_valid"]
    ds = TaskonomyDataset(str(tmp_path), tasks, "train", transform=DenseRegressionTransform(image_size=32),
                          max_images=2)
    assert len(ds) == 2 and len(TaskonomyDataset(str(tmp_path), tasks, "val")) == 2
    x, label = ds[1]
    hi = 8000 / 65535
    assert label == 0 and torch.allclose(x["depth_zbuffer"][0].double(),
                                         torch.from_numpy(np.clip(zb / 65535, 0, hi) / hi), atol=1e-6)
    assert torch.allclose(x["normal"].double(), torch.from_numpy(nm.transpose(2, 0, 1) / 255.0), atol=1e-6)
    cells = (mv != 255).reshape(8, 4, 8, 4).any(axis=(1, 3))  # a cell with any invalid pixel is invalid
    assert cells.any() and not cells.all() and (mv != 255).sum() < 16 * cells.sum()  # erosion widens holes
    assert torch.equal(x["mask_valid"][0], torch.from_numpy(~np.kron(cells, np.ones((4, 4), bool))))
    with pytest.raises(FileNotFoundError, match="tiny_train.csv"):
        TaskonomyDataset(str(tmp_path / "nowhere"), tasks, "train")
    with pytest.raises(FileNotFoundError, match="task 'edges'.*edges/synthetic_train_0"):
        TaskonomyDataset(str(tmp_path), ["rgb", "edges"], "train")
