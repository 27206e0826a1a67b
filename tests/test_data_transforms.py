"""PretrainTransform: modalities stay pixel-aligned through the shared crop and flip; output contract."""
import pytest
import torch

from utils.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from utils.data.modalities import Modality, register_modality, unregister_modality
from utils.data.transforms import PretrainTransform

H, W = 96, 128  # non-square source, so crop aspect ratio and axes cannot be confused


def _coordinate_sample(label_axis: str = 'x'):
    """Every modality encodes the source pixel coordinates (rgb R = 2x, G = 2y; depth = 500x + 7)."""
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    rgb = torch.stack([2 * x, 2 * y, torch.full_like(x, 60)]).to(torch.uint8)
    return {
        'rgb': rgb,
        'depth': (500 * x + 7).to(torch.int32)[None],
        'semseg': (x if label_axis == 'x' else y).to(torch.uint8)[None],
        'mask_valid': ((x % 16) < 8).to(torch.uint8)[None] * 255,
    }


def _rgb_coords(rgb_norm):
    """Recover source (x, y) pixel coordinates from the normalised rgb output."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    v = (rgb_norm * std + mean) * 255
    return v[0] / 2, v[1] / 2


@pytest.mark.parametrize('seed', range(8))
@pytest.mark.parametrize('hflip', [0.0, 1.0])
def test_crop_and_flip_keep_modalities_aligned(seed, hflip):
    size = 64
    t = PretrainTransform(input_size=size, hflip=hflip)
    torch.manual_seed(seed)
    out = t(_coordinate_sample('x'))
    torch.manual_seed(seed)
    out_y = t(_coordinate_sample('y'))
    x_rgb, y_rgb = _rgb_coords(out['rgb'])
    inner = (slice(3, -3), slice(3, -3))  # bicubic with clamped borders is not linear at the edge
    # flip direction: x grows left->right without flip, right->left with flip
    dx = (x_rgb[:, -4] - x_rgb[:, 3]).mean()
    assert (dx < 0) if hflip else (dx > 0)
    # depth went through the same crop/flip as rgb
    x_depth = (out['depth'][0] * 2 ** 16 - 7) / 500
    assert torch.allclose(x_depth[inner], x_rgb[inner], atol=0.6)
    # semseg at 1/4 resolution: label pixel (i, j) is the source pixel containing the centre of rgb pixel
    # (4i + 2, 4j + 2), whose rgb value is that centre's coordinate: |label - coordinate| <= 0.5 (+ uint8
    # rounding of rgb). Floor-aligned nearest resizing would be off by up to 1.5 pixels here.
    x_at = x_rgb[2::4, 2::4][1:-1, 1:-1]
    y_at = y_rgb[2::4, 2::4][1:-1, 1:-1]
    assert torch.all((out['semseg'][1:-1, 1:-1].float() - x_at).abs() <= 0.8)
    assert torch.all((out_y['semseg'][1:-1, 1:-1].float() - y_at).abs() <= 0.8)
    # mask stripes follow the rgb x coordinate (ignore pixels within 1 px of a stripe border)
    phase = (x_rgb + 0.5) % 16
    clear = ((phase - 0).abs() > 1) & ((phase - 8).abs() > 1) & ((phase - 16).abs() > 1)
    expected = phase < 8
    assert torch.equal(out['mask_valid'][0][inner][clear[inner]], expected[inner][clear[inner]])


def test_output_contract_and_determinism():
    t = PretrainTransform(input_size=32, hflip=0.5)
    torch.manual_seed(0)
    a = t(_coordinate_sample())
    torch.manual_seed(0)
    b = t(_coordinate_sample())
    torch.manual_seed(1)
    c = t(_coordinate_sample())
    assert a['rgb'].dtype == torch.float32 and a['rgb'].shape == (3, 32, 32)
    assert a['depth'].dtype == torch.float32 and a['depth'].shape == (1, 32, 32)
    assert a['semseg'].dtype == torch.int64 and a['semseg'].shape == (8, 8)
    assert a['mask_valid'].dtype == torch.bool and a['mask_valid'].shape == (1, 32, 32)
    assert 0 <= a['depth'].min() and a['depth'].max() <= (500 * (W - 1) + 7) / 2 ** 16 + 1e-3
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a['rgb'], c['rgb'])


def test_full_crop_without_flip_is_a_plain_resize():
    """scale=(1,1), ratio=W/H: the crop is the whole image, so semseg equals the centre-sampled source."""
    t = PretrainTransform(input_size=(48, 64), hflip=0.0, scale=(1.0, 1.0), ratio=(W / H, W / H))
    out = t(_coordinate_sample('x'))
    # output (12, 16) label grid over 128 source columns: pixel j covers source [8j, 8j + 8)
    expected_cols = torch.arange(16) * 8 + 5  # nearest-exact of the 1/4-res grid picks column 4j + 2 at 64 px
    assert torch.equal(out['semseg'][0], expected_cols)


def test_inception_normalisation():
    sample = {'rgb': torch.full((3, 16, 16), 255, dtype=torch.uint8)}
    out = PretrainTransform(input_size=8, imagenet_default_mean_and_std=False)(sample)
    assert torch.allclose(out['rgb'], torch.ones(3, 8, 8))


def test_flip_negates_registered_channels():
    register_modality(Modality('normal_test', num_channels=3, kind='dense', decoder='rgb', value_scale=1 / 255,
                               value_range=(0.0, 1.0), loss='l1', hflip_negate_channels=(0,)))
    try:
        sample = {'normal_test': torch.tensor([51, 102, 204], dtype=torch.uint8)[:, None, None].expand(3, 20, 20)}
        flipped = PretrainTransform(input_size=8, hflip=1.0)(sample)['normal_test']
        kept = PretrainTransform(input_size=8, hflip=0.0)(sample)['normal_test']
        assert torch.allclose(kept[:, 0, 0], torch.tensor([0.2, 0.4, 0.8]), atol=1e-5)
        assert torch.allclose(flipped[:, 0, 0], torch.tensor([0.8, 0.4, 0.8]), atol=1e-5)
    finally:
        unregister_modality('normal_test')


def test_unknown_modality_in_sample():
    with pytest.raises(ValueError, match="unknown modality 'semseg_cooco'"):
        PretrainTransform(input_size=8)({'semseg_cooco': torch.zeros(1, 8, 8, dtype=torch.uint8)})


def test_bad_interpolation_name():
    with pytest.raises(ValueError, match="interpolation must be one of .*'bicubic'.*got 'random'"):
        PretrainTransform(input_size=8, interpolation='random')


def test_params_from_the_size_alone_give_the_same_sample():
    """A loader may draw the crop and flip before decoding (it knows only H, W): same draws, same output."""
    t = PretrainTransform(input_size=32, hflip=0.5)
    for seed in range(6):
        torch.manual_seed(seed)
        direct = t(_coordinate_sample())
        torch.manual_seed(seed)
        params = t.sample_params(H, W)
        assert set(params) == {'top', 'left', 'height', 'width', 'flip'}
        assert 0 <= params['top'] <= H - params['height'] and 0 <= params['left'] <= W - params['width']
        planned = t.apply(_coordinate_sample(), params)
        for key in direct:
            assert torch.equal(direct[key], planned[key]), (seed, key)


def test_modalities_of_different_sizes_are_rejected():
    sample = _coordinate_sample()
    sample['depth'] = sample['depth'][..., :-1]
    with pytest.raises(ValueError, match=r"same size .*'depth': \(96, 127\)"):
        PretrainTransform(input_size=16)(sample)


@pytest.mark.parametrize('channels_last', [False, True])
def test_rgb_equals_the_torchvision_v2_functional_chain(channels_last):
    """uint8 rgb (channels-first, or interleaved as the decoders return it) gives exactly the values of
    v2 resized_crop (bicubic, antialias) -> flip -> to_dtype(scale) -> normalize."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F
    g = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8, generator=g)
    if channels_last:
        rgb = rgb.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    tf = PretrainTransform(input_size=32)
    for top, left, h, w, flip in [(0, 0, 50, 60, False), (5, 9, 31, 40, True), (10, 3, 20, 17, True)]:
        got = tf.apply({'rgb': rgb}, dict(top=top, left=left, height=h, width=w, flip=flip))['rgb']
        want = F.resized_crop(rgb, top, left, h, w, [32, 32], InterpolationMode.BICUBIC, antialias=True)
        want = F.horizontal_flip(want) if flip else want
        want = F.normalize(F.to_dtype(want, torch.float32, scale=True), tf.mean, tf.std)
        assert got.is_contiguous() and got.dtype == torch.float32
        assert torch.equal(got, want), (top, left, h, w, flip)


@pytest.mark.parametrize('imagenet', [True, False])
def test_compact_output_finished_per_batch_equals_the_default_output(imagenet):
    """compact=True hands out uint8 rgb and uint8 label maps (what the pre-training loader ships); finish()
    on the collated batch gives bit-identically the batch of the default transform, and leaves finished
    tensors alone."""
    from torch.utils.data import default_collate
    full = PretrainTransform(input_size=32, hflip=0.5, imagenet_default_mean_and_std=imagenet)
    compact = PretrainTransform(input_size=32, hflip=0.5, imagenet_default_mean_and_std=imagenet, compact=True)
    torch.manual_seed(4)
    expected = default_collate([(full(_coordinate_sample()), i) for i in range(5)])
    torch.manual_seed(4)
    shipped = default_collate([(compact(_coordinate_sample()), i) for i in range(5)])
    assert shipped[0]['rgb'].dtype == torch.uint8 and shipped[0]['rgb'].shape == (5, 3, 32, 32)
    assert shipped[0]['semseg'].dtype == torch.uint8 and shipped[0]['depth'].dtype == torch.float32
    got = compact.finish(shipped)
    assert torch.equal(got[1], expected[1])
    for key, want in expected[0].items():
        assert got[0][key].dtype == want.dtype and torch.equal(got[0][key], want), key
        assert got[0][key].is_contiguous()
    again = compact.finish(got)
    assert all(again[0][k] is got[0][k] for k in got[0])
    # mean/std are made once per device (a per-step copy to a GPU would synchronise), and not pickled
    assert all(a is b for a, b in zip(compact._mean_std(torch.device('cpu')), compact._mean_std(torch.device('cpu'))))
    import pickle
    clone = pickle.loads(pickle.dumps(compact))
    assert '_mean_std_cache' not in vars(clone) and torch.equal(clone.finish(shipped)[0]['rgb'], expected[0]['rgb'])


def test_direct_resize_equals_torchvision_resize():
    """_resize4d (interpolate without F.resize's dispatch) gives F.resize's values and memory format."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    from utils.data.transforms import _resize4d
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (1, 3, 37, 29), dtype=torch.uint8, generator=g)
    cases = [(rgb.contiguous(memory_format=torch.channels_last), InterpolationMode.BICUBIC, (16, 16)),
             (rgb, InterpolationMode.BICUBIC, (40, 21)),
             (torch.rand(1, 1, 37, 29, generator=g), InterpolationMode.BICUBIC, (16, 20)),
             (torch.rand(1, 2, 37, 29, generator=g), InterpolationMode.BILINEAR, (50, 9)),
             (rgb, InterpolationMode.BILINEAR, (16, 16)),  # uint8 bilinear: through F.resize
             (rgb, InterpolationMode.BICUBIC, (37, 29))]  # same size: unchanged
    for x, mode, size in cases:
        got, want = _resize4d(x, size, mode), F.resize(x, list(size), interpolation=mode, antialias=True)
        assert got.dtype == want.dtype and torch.equal(got, want), (mode, size)
        assert got.stride()[1:] == want.stride()[1:], (mode, size)  # the batch stride of a size-1 dim is moot
