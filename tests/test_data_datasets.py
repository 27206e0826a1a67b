"""MultiModalImageFolder: pairing by name, decoding, and the errors for broken folders."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data.datasets import ImageDecodeError, MultiModalImageFolder, decode_file

MODS = ['rgb', 'depth', 'semseg']


def _write_sample(root, cls, name, ident, size=(8, 10), mods=MODS, rgb_ext='.png'):
    """Sample ``ident`` is recognisable in every modality: rgb = ident, depth = 1000 * ident, semseg = ident."""
    h, w = size
    arrays = {
        'rgb': np.full((h, w, 3), ident, np.uint8),
        'depth': np.full((h, w), 1000 * ident, np.uint16),
        'semseg': np.full((h, w), ident, np.uint8),
        'mask_valid': np.full((h, w), 255, np.uint8),
    }
    for m in mods:
        folder = os.path.join(root, m, cls, os.path.dirname(name))
        os.makedirs(folder, exist_ok=True)
        ext = rgb_ext if m == 'rgb' else '.png'
        Image.fromarray(arrays[m]).save(os.path.join(root, m, cls, name + ext))


@pytest.fixture
def folder(tmp_path):
    # names chosen so that per-modality sorted order would differ from name pairing if extensions differ
    idents = {('cat', 'b'): 1, ('cat', 'a10'): 2, ('cat', 'sub/a9'): 3, ('dog', 'x'): 4, ('dog', 'y'): 5}
    for (cls, name), ident in idents.items():
        _write_sample(tmp_path, cls, name, ident, rgb_ext='.jpg' if ident == 2 else '.png')
    return tmp_path


def test_pairs_by_name_and_decodes(folder):
    ds = MultiModalImageFolder(str(folder), MODS)
    assert ds.classes == ['cat', 'dog'] and len(ds) == 5
    seen = set()
    for i in range(len(ds)):
        sample, target = ds[i]
        ident = int(sample['semseg'][0, 0, 0])
        seen.add(ident)
        assert sample['rgb'].dtype == torch.uint8 and sample['rgb'].shape == (3, 8, 10)
        assert sample['depth'].dtype == torch.int32 and sample['depth'].shape == (1, 8, 10)
        assert abs(int(sample['rgb'][0, 0, 0]) - ident) <= 2  # the one JPEG is lossy
        assert torch.all(sample['depth'] == 1000 * ident)  # 16 bit, exact
        assert target == (0 if ident <= 3 else 1)
        paths = ds.samples_paths(i)
        assert set(paths) == set(MODS)
        assert len({os.path.splitext(os.path.relpath(p, os.path.join(str(folder), m)))[0]
                     for m, p in paths.items()}) == 1
    assert seen == {1, 2, 3, 4, 5}


def test_missing_file_names_modality_and_path(folder):
    os.remove(folder / 'depth' / 'dog' / 'x.png')
    with pytest.raises(ValueError, match=r"1 depth file\(s\) missing.*depth/dog/x\.\*.*rgb/dog/x\.png"):
        MultiModalImageFolder(str(folder), MODS)
    with pytest.warns(UserWarning, match='dropping'):
        ds = MultiModalImageFolder(str(folder), MODS, strict=False)
    assert len(ds) == 4


def test_extra_file_in_non_reference_modality_is_reported(folder):
    _write_sample(folder, 'dog', 'z', 6, mods=['semseg'])
    with pytest.raises(ValueError, match=r"rgb file\(s\) missing.*rgb/dog/z\.\*"):
        MultiModalImageFolder(str(folder), MODS)


def test_corrupt_file(folder):
    bad = folder / 'semseg' / 'cat' / 'b.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    ds = MultiModalImageFolder(str(folder), MODS)
    idx = next(i for i in range(len(ds)) if ds.samples_paths(i)['semseg'] == str(bad))
    with pytest.raises(ImageDecodeError, match=r"cannot read semseg file '.*semseg/cat/b\.png'"):
        ds[idx]


def test_mismatched_sizes(folder):
    Image.fromarray(np.zeros((8, 12), np.uint16)).save(folder / 'depth' / 'dog' / 'y.png')
    ds = MultiModalImageFolder(str(folder), MODS)
    idx = next(i for i in range(len(ds)) if ds.samples_paths(i)['depth'].endswith('y.png'))
    with pytest.raises(ValueError, match=r"different sizes.*rgb 8x10.*depth 8x12 \('.*depth/dog/y\.png'\)"):
        ds[idx]


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / 'rgb' / 'cat').mkdir(parents=True)
    (tmp_path / 'depth' / 'cat').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no image files .* modality 'rgb' under '.*rgb/<class>/'"):
        MultiModalImageFolder(str(tmp_path), ['rgb', 'depth'])
    with pytest.raises(FileNotFoundError, match=r"folder for modality 'semseg' not found.*present.*'depth', 'rgb'"):
        MultiModalImageFolder(str(tmp_path), ['rgb', 'semseg'])
    (tmp_path / 'empty' / 'rgb').mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match='no class sub-folders'):
        MultiModalImageFolder(str(tmp_path / 'empty'), ['rgb'])


def test_unknown_modality_and_duplicate_stems(folder):
    with pytest.raises(ValueError, match="unknown modality 'detph'.*did you mean 'depth'"):
        MultiModalImageFolder(str(folder), ['rgb', 'detph'])
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(folder / 'rgb' / 'dog' / 'x.jpg')
    with pytest.raises(ValueError, match="two rgb files for sample 'dog/x'"):
        MultiModalImageFolder(str(folder), MODS)


def test_max_images_has_no_global_rng_side_effect(folder):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    full = MultiModalImageFolder(str(folder), MODS)
    sub = MultiModalImageFolder(str(folder), MODS, max_images=3)
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    expected = [full.samples[i] for i in np.random.RandomState(0).permutation(len(full))[:3]]
    assert sub.samples == expected and len(sub) == 3


def test_prefixes_and_other_decoders(tmp_path):
    _write_sample(tmp_path, 'all', 'a', 7, mods=['rgb', 'mask_valid'])
    os.makedirs(tmp_path / 'pseudo_depth' / 'all')
    # 16-bit TIFF is not decodable by torchvision: exercises the PIL fallback
    Image.fromarray(np.full((8, 10), 40000, np.uint16)).save(tmp_path / 'pseudo_depth' / 'all' / 'a.tif')
    # palette PNG for labels: indices, not colours
    lab = Image.fromarray(np.arange(80, dtype=np.uint8).reshape(8, 10) % 7, mode='L').convert('P')
    lab.putpalette([255 - (i % 256) for i in range(768)])
    os.makedirs(tmp_path / 'semseg' / 'all')
    lab.save(tmp_path / 'semseg' / 'all' / 'a.png')
    ds = MultiModalImageFolder(str(tmp_path), ['rgb', 'depth', 'semseg', 'mask_valid'], prefixes={'depth': 'pseudo_'})
    sample, _ = ds[0]
    assert torch.all(sample['depth'] == 40000) and sample['depth'].dtype == torch.int32
    np.testing.assert_array_equal(sample['semseg'][0].numpy(), np.arange(80).reshape(8, 10) % 7)
    assert sample['mask_valid'].dtype == torch.uint8 and torch.all(sample['mask_valid'] == 255)


def test_decode_file_rejects_colour_depth(tmp_path):
    path = str(tmp_path / 'd.png')
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ImageDecodeError, match=r"cannot read depth file .*single-channel"):
        decode_file(path, 'depth')
    assert decode_file(path, 'rgb').shape == (3, 4, 4)
    with pytest.raises(ImageDecodeError, match=r"cannot read rgb file '.*nope\.png'"):
        decode_file(str(tmp_path / 'nope.png'), 'rgb')


def test_pretrain_transform_gets_uint16_depth_with_the_same_result(tmp_path):
    # with PretrainTransform the dataset leaves 16-bit depth uint16 (converted to float after cropping);
    # the output must equal the transform applied to the documented int32 decoding
    from utils.data.transforms import PretrainTransform
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / 'rgb' / 'c'), os.makedirs(tmp_path / 'depth' / 'c')
    depth = rng.integers(0, 65536, (40, 48), dtype=np.uint16)
    Image.fromarray(depth).save(tmp_path / 'depth' / 'c' / 'a.png')
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / 'rgb' / 'c' / 'a.png')
    tf = PretrainTransform(input_size=32)
    ds = MultiModalImageFolder(str(tmp_path), ['rgb', 'depth'], transform=tf)
    assert ds.load(0)['depth'].dtype == torch.uint16
    wide = {m: decode_file(p, m) for m, p in ds.samples_paths(0).items()}
    assert wide['depth'].dtype == torch.int32
    for seed in range(4):
        torch.manual_seed(seed)
        got = ds[0][0]
        torch.manual_seed(seed)
        want = tf(wide)
        assert torch.equal(got['depth'], want['depth']) and torch.equal(got['rgb'], want['rgb'])
    assert got['depth'].max() > 0.5  # values above 2**15 survive (no signed 16-bit wrap)
