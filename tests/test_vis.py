"""Visualisation: colour maps, palette, reconstruction grid content, atomic PNG saving."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from utils.vis import (DEPTH_LUT, colorize_depth, colorize_semseg, dataset_grid, denormalize_rgb,
                       patch_mask_to_pixels, reconstruction_grid, save_png_atomic, save_reconstruction_grid,
                       semseg_palette)


def _luma(rgb):
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def test_depth_colour_map_is_monotone_and_marks_invalid():
    assert np.all(np.diff(_luma(DEPTH_LUT.astype(np.float64))) > 0)  # readable in greyscale too
    depth = torch.linspace(1, 5, 50).repeat(10, 1)  # increases to the right
    valid = torch.ones(10, 50, dtype=torch.bool)
    valid[0, 0] = False
    img = colorize_depth(depth, valid)
    assert img.shape == (10, 50, 3) and img.dtype == np.uint8
    assert np.all(img[0, 0] == 0)
    assert _luma(img[5, 1].astype(float)) > _luma(img[5, -1].astype(float))  # near is brighter


def test_semseg_palette_and_ignore():
    pal = semseg_palette(133)
    assert pal.shape == (133, 3) and len({tuple(c) for c in pal}) == 133
    assert np.abs(pal.astype(int) - 128).max(axis=1).min() > 20  # no class looks like a hidden (grey) patch
    img = colorize_semseg(torch.tensor([[0, 5], [255, 132]]))
    np.testing.assert_array_equal(img[0, 1], pal[5])
    np.testing.assert_array_equal(img[1, 0], [0, 0, 0])


def test_denormalize_round_trip():
    rgb = torch.randint(0, 256, (3, 4, 5), generator=torch.Generator().manual_seed(0)).float() / 255
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    norm = (rgb - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_array_equal(denormalize_rgb(norm), (rgb * 255).round().byte().permute(1, 2, 0).numpy())


def test_patch_mask_to_pixels():
    mask = torch.tensor([1, 0, 0, 1, 1, 0])  # 2 x 3 grid on a 4 x 6 image
    px = patch_mask_to_pixels(mask, 4, 6)
    assert px.shape == (4, 6) and px[:2, :2].all() and not px[:2, 2:4].any() and px[2:, :4].all()
    with pytest.raises(ValueError, match='cannot lay out a mask of 6 tokens on a 5x6 image'):
        patch_mask_to_pixels(mask, 5, 6)


def _batch(b=2, size=32):
    g = torch.Generator().manual_seed(0)
    inputs = {'rgb': torch.randn(b, 3, size, size, generator=g), 'depth': torch.randn(b, 1, size, size, generator=g),
              'semseg': torch.randint(0, 6, (b, size // 4, size // 4), generator=g),
              'mask_valid': torch.ones(b, 1, size, size, dtype=torch.bool)}
    n = (size // 16) ** 2
    masks = {k: torch.tensor([[1, 0, 1, 1]] * b) for k in ('rgb', 'depth', 'semseg')}
    assert masks['rgb'].shape[1] == n
    preds = {'rgb': torch.randn(b, 3, size, size, generator=g), 'depth': torch.randn(b, 1, size, size, generator=g),
             'semseg': torch.randn(b, 133, size // 4, size // 4, generator=g),
             'norm_rgb': torch.randn(b, 3, size, size)}
    return inputs, preds, masks


def test_reconstruction_grid_layout_and_pasting():
    inputs, preds, masks = _batch()
    tile = 32
    img = reconstruction_grid(inputs, preds, masks, tile_size=tile, labels=False)
    # 2 rows; 3 modalities x 3 tiles with 2 px gaps and 8 px between groups; norm_rgb/mask_valid not shown
    assert img.shape == (2 * (tile + 2), 9 * (tile + 2) + 2 * 8, 3)
    masked, pred, target = (img[:tile, i * (tile + 2):i * (tile + 2) + tile] for i in range(3))
    np.testing.assert_array_equal(target, denormalize_rgb(inputs['rgb'][0]))
    # token 1 (top-right 16x16) is visible: pasted from the input in 'pred' and shown in 'masked'
    np.testing.assert_array_equal(pred[:16, 16:], target[:16, 16:])
    np.testing.assert_array_equal(masked[:16, 16:], target[:16, 16:])
    # hidden tokens: grey in 'masked', the model's prediction in 'pred'
    assert np.all(masked[16:] == 128)
    np.testing.assert_array_equal(pred[16:], denormalize_rgb(preds['rgb'][0])[16:])
    # semseg prediction is the argmax of the logits on hidden patches
    x0 = 2 * (3 * (tile + 2) + 8) + (tile + 2)
    sem_pred = img[:tile, x0:x0 + tile]
    expected = colorize_semseg(preds['semseg'][0].argmax(0))
    np.testing.assert_array_equal(sem_pred[16:, :16], np.kron(expected[4:, :4], np.ones((4, 4, 1), np.uint8)))


def test_output_only_domain_and_default_tile(tmp_path):
    inputs, preds, masks = _batch(b=3)
    del masks['semseg']  # e.g. semseg only as an output: shown as fully hidden
    img = save_reconstruction_grid(str(tmp_path / 'vis' / 'grid.png'), inputs, preds, masks, max_samples=2)
    assert img.shape[0] == 14 + 2 * (128 + 2)  # header + 2 rows of 32 px images upscaled to >= 112 px
    x0 = 2 * (3 * (128 + 2) + 8)
    assert np.all(img[14:14 + 128, x0:x0 + 128] == 128)  # semseg 'masked' tile: everything hidden
    on_disk = np.asarray(Image.open(tmp_path / 'vis' / 'grid.png'))
    np.testing.assert_array_equal(on_disk, img)
    assert os.listdir(tmp_path / 'vis') == ['grid.png']


def test_dataset_grid_of_raw_samples():
    mask = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    mask[0, 0, 0] = 0
    sample = {'rgb': torch.full((3, 8, 8), 200, dtype=torch.uint8), 'depth': torch.arange(64).reshape(1, 8, 8) * 900,
              'semseg': torch.full((1, 8, 8), 3, dtype=torch.uint8), 'mask_valid': mask}
    img = dataset_grid([sample, sample], tile_size=8)
    assert img.shape == (2 * 10, 4 * 10, 3)
    assert np.all(img[:8, :8] == 200)
    assert np.all(img[0, 10] == 0)  # invalid depth pixel is black
    np.testing.assert_array_equal(img[:8, 20:28], colorize_semseg(sample['semseg'][0]))
    assert np.all(img[0, 30] == 0) and np.all(img[1, 31] == 255)


def test_save_png_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / 'a.png')
    save_png_atomic(np.zeros((4, 4, 3), np.uint8), path)
    save_png_atomic(np.full((4, 4, 3), 7, np.uint8), path)
    assert np.all(np.asarray(Image.open(path)) == 7) and os.listdir(tmp_path) == ['a.png']
    with pytest.raises(Exception):
        save_png_atomic(np.zeros((4, 4, 7), np.uint8), path)  # not an image -> error, old file intact
    assert np.all(np.asarray(Image.open(path)) == 7) and os.listdir(tmp_path) == ['a.png']
