import numpy as np
import pytest
import torch

from utils.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, NYU_MEAN, NYU_STD
from utils.data.depth import robust_standardize
from utils.data.finetune_transforms import (PADDING_KEY, DenseRegressionTransform, NYUDepthAugment, SemSegAugment,
                                       SemSegTarget, build_cls_transform, build_nyu_depth_transform,
                                       build_semseg_transform)

H, W = 48, 64
MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def coord_sample():
    """Every modality encodes the source pixel: depth = y*W + x + 1 (exact), semseg = x % 7,
    mask_valid = 255 except column 0, rgb = smooth ramps of x (red) and y (green)."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    rgb = torch.stack([x * 255 // (W - 1), y * 255 // (H - 1), torch.full_like(x, 50)]).to(torch.uint8)
    mask_valid = torch.full((1, H, W), 255, dtype=torch.uint8)
    mask_valid[:, :, 0] = 0
    return {"rgb": rgb, "depth": (y * W + x + 1)[None].to(torch.uint16), "semseg": (x % 7).to(torch.uint8),
            "mask_valid": mask_valid}


def decode_rgb(rgb):
    """(x, y) source coordinates implied by the rgb ramps of `coord_sample`."""
    v = (rgb * STD + MEAN) * 255
    return v[0] * (W - 1) / 255, v[1] * (H - 1) / 255


def check_alignment(depth_raw, semseg, rgb, region):
    """depth (exact, nearest), semseg and rgb must all describe the same source pixel inside `region`."""
    d = depth_raw[0][region].long() - 1
    ys, xs = d // W, d % W
    assert torch.equal(semseg[region].long(), xs % 7)
    rx, ry = decode_rgb(rgb)
    # nearest (labels, depth) samples the top-left source pixel of an output cell, bilinear (rgb) its centre:
    # they may differ by half the cell size (the down-scaling factor) plus quantisation
    dxs = depth_raw[0].long() - 1
    step_x = (dxs[:, 1:] % W - dxs[:, :-1] % W).abs().max().item()
    step_y = (dxs[1:] // W - dxs[:-1] // W).abs().max().item()
    assert (rx[region] - xs).abs().max() <= step_x / 2 + 1.5
    assert (ry[region] - ys).abs().max() <= step_y / 2 + 1.5
    return xs, ys


@pytest.mark.parametrize("seed", range(6))
def test_semseg_train_geometry_is_shared_by_all_modalities(seed):
    torch.manual_seed(seed)
    aug = SemSegAugment(train=True, input_size=32, color_jitter_p=0.0)
    out = aug(coord_sample())
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "rgb": (3, 32, 32), "depth": (1, 32, 32), "semseg": (1, 32, 32), "mask_valid": (1, 32, 32),
        PADDING_KEY: (1, 32, 32)}
    region = ~out[PADDING_KEY][0]
    assert region.any()
    check_alignment(out["depth"], out["semseg"][0], out["rgb"], region)
    # padding: label maps 254, depth 0, rgb grey 128
    pad = out[PADDING_KEY][0]
    assert (out["semseg"][0][pad] == 254).all() and (out["depth"][0][pad] == 0).all()
    grey = ((128 / 255 - MEAN) / STD).view(3)
    assert torch.allclose(out["rgb"][:, pad].T, grey.expand(int(pad.sum()), 3), atol=1e-5)


def test_semseg_flip_happens_and_stays_aligned():
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = SemSegAugment(train=True, input_size=32, color_jitter_p=0.0, scale_range=(1.0, 1.0))(coord_sample())
        region = ~out[PADDING_KEY][0]
        check_alignment(out["depth"], out["semseg"][0], out["rgb"], region)
        first_row = out["depth"][0, 0, :2]
        flips.add(bool(first_row[1] < first_row[0]))  # x decreasing along the row means flipped
    assert flips == {True, False}


def test_semseg_pad_is_bottom_right_and_random_scale_range():
    torch.manual_seed(0)
    out = SemSegAugment(train=True, input_size=32, scale_range=(0.5, 0.5), hflip=0.0,
                        color_jitter_p=0.0)(coord_sample())
    # 48x64 -> longest side 32 -> 24x32 -> x0.5 -> 12x16, padded bottom/right, crop keeps the top-left corner
    pad = out[PADDING_KEY][0]
    assert not pad[:12, :16].any() and pad[12:].all() and pad[:, 16:].all()
    assert out["depth"][0, 0, 0] == 1  # source pixel (0, 0) stays at the corner


def test_semseg_val_transform_and_targets():
    sample = coord_sample()
    sample["depth"][:, 10:20, 10:20] = 254  # a real depth of 254 is not padding (published bug 9.24)
    sample["mask_valid"][:, :, 40:] = 0  # a wide invalid band: the two statistics differ clearly
    t = build_semseg_transform(False, 32, num_classes=7)
    out = t(sample)
    assert PADDING_KEY not in out
    assert out["semseg"].shape == (32, 32) and out["semseg"].dtype == torch.int64
    # 48x64 -> 24x32 then padded: rows 24.. are padding -> ignore label, invalid, depth 0
    assert (out["semseg"][24:] == 255).all() and not out["mask_valid"][0, 24:].any()
    assert (out["depth"][0, 24:] == 0).all()
    # column 0 had mask_valid = 0 -> invalid and depth zeroed
    assert not out["mask_valid"][0, :24, 0].any() and (out["depth"][0, :24, 0] == 0).all()
    # published: the statistics leave out padding only (invalid pixels count), invalid pixels zeroed after
    aug = SemSegAugment(False, 32)(sample)
    pad = aug[PADDING_KEY][0]
    raw = aug["depth"][0].double().numpy()
    vals = np.sort(raw[~pad.numpy()])
    kept = vals[int(0.1 * vals.size):int(0.9 * vals.size)]
    published = (raw - kept.mean()) / np.sqrt(kept.var(ddof=1) + 1e-6)
    published[pad.numpy() | (aug["mask_valid"][0].numpy() != 255)] = 0
    assert np.allclose(out["depth"][0].numpy(), published, atol=1e-5) and out["depth"][0, :24, 1:].abs().sum() > 0
    assert (out["depth"][0, 5:10, 5:10] != 0).all()  # the 254 pixels are standardised like any other
    # --depth_stats_valid_only: the statistics come from the valid, unpadded pixels only
    out = build_semseg_transform(False, 32, num_classes=7, depth_stats_valid_only=True)(sample)
    valid = (aug["mask_valid"] == 255) & ~aug[PADDING_KEY]
    ref = robust_standardize(aug["depth"][None].float(), valid[None])[0]
    assert torch.allclose(out["depth"], ref) and not np.allclose(out["depth"][0].numpy(), published, atol=1e-3)


def test_semseg_target_label_mapping_reduce_zero_and_void():
    seg = torch.tensor([[0, 1, 2], [3, 255, 1]], dtype=torch.uint8)
    pad = torch.tensor([[False, False, False], [False, False, True]])[None]
    base = {"semseg": seg, PADDING_KEY: pad}
    out = SemSegTarget(3, reduce_zero_label=True, use_void_label=True)(base)["semseg"]
    assert out.tolist() == [[255, 0, 1], [2, 255, 3]]
    out = SemSegTarget(3, reduce_zero_label=True, use_void_label=False)(base)["semseg"]
    assert out.tolist() == [[255, 0, 1], [2, 255, 255]]
    out = SemSegTarget(4, use_void_label=True)(base)["semseg"]
    assert out.tolist() == [[0, 1, 2], [3, 255, 4]]


def test_pseudo_semseg_input_downsampled_with_padding_class():
    ps = torch.arange(64).view(1, 8, 8) * 3  # values up to 189, some >= 133
    pad = torch.zeros(1, 8, 8, dtype=torch.bool)
    pad[:, :, 4:] = True
    out = SemSegTarget(10)({"pseudo_semseg": ps, PADDING_KEY: pad})["pseudo_semseg"]
    assert out.shape == (2, 2) and out.dtype == torch.int64
    src = ps[0, ::4, ::4]  # nearest x0.25 picks every 4th pixel
    expected = torch.where(src >= 133, 133, src)
    expected[:, 1] = 133  # padded columns
    assert torch.equal(out, expected)


def test_nyu_val_alignment_standardisation_and_mask():
    out = build_nyu_depth_transform(False, 32)(coord_sample())
    assert out["rgb"].shape == (3, 32, 32) and out["mask_valid"].dtype == torch.bool
    valid = out["mask_valid"][0]
    raw = torch.where(out["mask_valid"], out["depth"] * NYU_STD + NYU_MEAN, 0.0).round()
    check_alignment(raw, out["semseg"][0], out["rgb"], valid)
    # invalid pixels (source column 0) -> depth exactly 0; they exist only if the centre crop keeps column 0
    assert (out["depth"][0][~valid] == 0).all()
    # 48x64 -> 32x42 -> centre crop of columns 5..36: source column 0 is cropped away
    assert valid.all()
    src_x = int(5 * W / 42)  # nearest: resized column 5 comes from source column floor(5 * 64 / 42) = 7
    assert (out["depth"][0, 0, 0] * NYU_STD + NYU_MEAN).item() == pytest.approx(src_x + 1, abs=1e-2)


def test_nyu_train_random_crop_alignment_and_missing_mask_valid():
    for seed in range(4):
        torch.manual_seed(seed)
        s = coord_sample()
        out = NYUDepthAugment(True, 32)(s)
        region = out["mask_valid"][0] == 255
        check_alignment(out["depth"], out["semseg"][0], out["rgb"], region)
    s = coord_sample()
    del s["mask_valid"]
    s["depth"][:, :, 30:] = 0
    out = build_nyu_depth_transform(False, 32)(s)
    # without mask_valid, valid = raw depth > 0
    assert out["mask_valid"].sum() < 32 * 32 and (out["depth"][~out["mask_valid"]] == 0).all()


def test_nyu_color_aug_touches_rgb_only():
    torch.manual_seed(1)
    a = NYUDepthAugment(True, 32, color_aug=True)
    b = NYUDepthAugment(True, 32, color_aug=False)
    changed = False
    for seed in range(5):
        torch.manual_seed(seed)
        oa = a(coord_sample())
        torch.manual_seed(seed)
        ob = b(coord_sample())
        if torch.equal(oa["depth"], ob["depth"]):  # same geometry draw
            changed |= not torch.allclose(oa["rgb"], ob["rgb"])
        assert oa["depth"].dtype == torch.float32 and oa["semseg"].dtype == torch.uint8
    assert changed


def test_dense_regression_taskonomy_scaling_and_mask_erosion():
    mask = torch.full((1, 8, 8), 255, dtype=torch.uint8)
    mask[0, 1, 2] = 0
    depth = torch.full((1, 8, 8), 4000, dtype=torch.int32).to(torch.uint16)
    depth[0, 7, 7] = 10000
    edge = torch.full((1, 8, 8), round(65535 * 0.125), dtype=torch.int32).to(torch.uint16)
    normal = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    out = DenseRegressionTransform(8)({"mask_valid": mask, "depth_zbuffer": depth, "edge_texture": edge,
                                       "normal": normal, "principal_curvature": normal})
    expected_mask = torch.ones(8, 8, dtype=torch.bool)
    expected_mask[:4, :4] = False  # one invalid pixel invalidates its whole 4x4 cell
    assert torch.equal(out["mask_valid"][0], expected_mask)
    assert out["depth_zbuffer"][0, 0, 0].item() == pytest.approx(0.5) and out["depth_zbuffer"][0, 7, 7] == 1.0
    assert out["edge_texture"].mean().item() == pytest.approx(0.5, abs=1e-4)
    assert out["normal"].shape == (3, 8, 8) and out["principal_curvature"].shape == (2, 8, 8)
    assert (out["normal"] == 1).all()


def test_dense_regression_resize_keeps_alignment():
    s = coord_sample()
    out = DenseRegressionTransform(24)({"rgb": s["rgb"], "depth_euclidean": s["depth"], "semseg": s["semseg"]})
    assert out["rgb"].shape == (3, 24, 32) and out["depth_euclidean"].shape == (1, 24, 32)
    assert out["semseg"].dtype == torch.float32 and out["semseg"].max() <= 6 / 255 + 1e-6


def test_cls_transforms():
    torch.manual_seed(0)
    img = coord_sample()["rgb"]
    train = build_cls_transform(True, 32, reprob=0.25)
    assert "RandAugment" in repr(train) and "RandomErasing" in repr(train)
    x = train({"rgb": img})
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    ev = build_cls_transform(False, 224)
    assert ev.transform.transforms[0].size == 256  # int(224 / (224/256))
    assert build_cls_transform(False, 384).transform.transforms[0].size == 384  # crop_pct 1.0
    y = build_cls_transform(False, 32, crop_pct=1.0)(img)
    # eval on a tensor: resize shorter side to 32 and centre crop, same normalisation as the dense transforms
    assert y.shape == (3, 32, 32)
    assert torch.allclose(decode_rgb(y)[1][:, 0], torch.linspace(0, H - 1, 32), atol=2.0)


def test_errors_name_the_modality():
    s = coord_sample()
    s["depth"] = s["depth"][:, :10]
    with pytest.raises(ValueError, match="modality 'depth'"):
        SemSegAugment(True, 32)(s)
    with pytest.raises(KeyError, match="'rgb'"):
        SemSegAugment(True, 32)({"depth": coord_sample()["depth"]})
    with pytest.raises(ValueError, match="unknown semseg augmentation 'lsj'"):
        build_semseg_transform(True, 32, 7, aug_name="lsj")
