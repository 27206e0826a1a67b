"""tools/prepare_nyuv2.py on a small synthetic NYUv2 release written in the official .mat formats."""
import numpy as np
import pytest
from PIL import Image

from tests.fake_releases import make_nyuv2
from tools import prepare_nyuv2
from utils.data.datasets import MultiModalImageFolder

h5py = pytest.importorskip("h5py")
scipy_io = pytest.importorskip("scipy.io")

N, H, W, K = 5, 24, 32, 7  # images, height, width, original classes


@pytest.fixture()
def nyu_files(tmp_path):
    fake = make_nyuv2(tmp_path, N, H, W, K)
    args = ["--dataset_path", str(tmp_path / "nyu_depth_v2_labeled.mat"), "--splits_path", str(tmp_path / "splits.mat"),
            "--class_mapping_path", str(tmp_path / "classMapping40.mat")]
    return args, fake["rgb"], fake["depth"], fake["labels"], fake["lut"]


def test_layout_units_mask_valid_and_labels(tmp_path, nyu_files):
    args, rgb, depth, labels, lut = nyu_files
    out = tmp_path / "nyu"
    assert prepare_nyuv2.main(args + ["--save_path", str(out), "--depth_scale", "1000"]) == {"train": 3, "test": 2}
    for split, idx in (("train", [0, 2, 4]), ("test", [1, 3])):
        for modality in ("rgb", "depth", "semseg", "mask_valid"):
            assert sorted(p.name for p in (out / split / modality / "data").iterdir()) == [f"{i:04d}.png" for i in idx]
    i = 2
    d = np.array(Image.open(out / "train/depth/data/0002.png"))
    assert d.dtype == np.uint16 and d.shape == (H, W)
    np.testing.assert_array_equal(d, np.round(depth[i].astype(np.float64) * 1000).astype(np.uint16))  # millimetres
    mv = np.array(Image.open(out / "train/mask_valid/data/0002.png"))
    np.testing.assert_array_equal(mv, np.where(depth[i] > 0, 255, 0))
    assert (mv[:3, :4] == 0).all() and (mv[3:] == 255).all()
    np.testing.assert_array_equal(np.array(Image.open(out / "train/rgb/data/0002.png").convert("RGB")), rgb[i])
    sem = Image.open(out / "train/semseg/data/0002.png")
    assert sem.mode == "P"  # palette for viewing; stored values are the class ids
    np.testing.assert_array_equal(np.array(sem), lut[labels[i]])

    # the project's loader reads it back: 16-bit depth, label ids, mask
    ds = MultiModalImageFolder(str(out / "test"), ["rgb", "depth", "semseg", "mask_valid"])
    sample = ds.load(1)  # image 3
    assert int(sample["depth"].max()) == int(np.round(depth[3].max() * 1000))
    np.testing.assert_array_equal(sample["semseg"][0].numpy(), lut[labels[3]])
    assert sample["mask_valid"].bool().sum() == (depth[3] > 0).sum()


def test_raw_depth_published_scale_and_normals(tmp_path, nyu_files):
    args, rgb, depth, labels, lut = nyu_files
    normals = tmp_path / "normals_src"
    for sub in ("normals", "masks"):
        (normals / sub).mkdir(parents=True)
        for i in range(N):
            Image.fromarray(np.full((H, W), i + (sub == "masks"), np.uint8)).save(normals / sub / f"{i:04d}.png")
    out = tmp_path / "nyu"
    # the default scale is the published one: metres x 6553.6
    prepare_nyuv2.main(args + ["--save_path", str(out), "--depth_key", "rawDepths", "--normals_path", str(normals)])
    raw = depth[4] * (depth[4] > 2)
    d = np.array(Image.open(out / "train/depth/data/0004.png"))
    np.testing.assert_array_equal(d, np.round(raw.astype(np.float64) * 6553.6).astype(np.uint16))
    np.testing.assert_array_equal(np.array(Image.open(out / "train/mask_valid/data/0004.png")) > 0, raw > 0)
    assert np.array(Image.open(out / "test/normal/data/0003.png")).max() == 3
    assert np.array(Image.open(out / "test/mask/data/0003.png")).max() == 4


def test_errors_name_the_file_and_problem(tmp_path, nyu_files):
    args, *_ = nyu_files
    scipy_io.savemat(tmp_path / "bad_splits.mat", {"trainNdxs": np.array([[1], [9]]), "testNdxs": np.array([[2]])})
    with pytest.raises(SystemExit, match="index 9 beyond the 5 images"):
        prepare_nyuv2.main(args[:2] + ["--splits_path", str(tmp_path / "bad_splits.mat")] + args[4:]
                           + ["--save_path", str(tmp_path / "o1")])
    scipy_io.savemat(tmp_path / "short_map.mat", {"mapClass": np.array([[1, 2, 3]])})
    with pytest.raises(SystemExit, match="class id 7 has no entry in mapClass"):
        prepare_nyuv2.main(args[:4] + ["--class_mapping_path", str(tmp_path / "short_map.mat"),
                                       "--save_path", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match=r"--splits_path: file '.*nosplits.mat' not found"):
        prepare_nyuv2.main(args[:2] + ["--splits_path", str(tmp_path / "nosplits.mat")] + args[4:]
                           + ["--save_path", str(tmp_path / "o0")])
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit, match="normals/0000.png' missing"):
        prepare_nyuv2.main(args + ["--save_path", str(tmp_path / "o3"), "--normals_path", str(tmp_path / "none")])
