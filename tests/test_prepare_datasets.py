"""tools/prepare_{ade20k,hypersim,taskonomy}.py on tiny fake releases in the official layouts
(tests/fake_releases.py): the files written, their values, the errors on incomplete releases, and that the
published configs' data sets (build_semseg_dataset / build_regression_dataset) read the output."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fake_releases import H, W, make_ade20k, make_hypersim, make_taskonomy
from tools import prepare_ade20k, prepare_hypersim, prepare_taskonomy
from utils.config import parse_args
from utils.data.datasets import MultiModalImageFolder

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--finetune", "", "--input_size", "32", "--num_workers", "0"]


def _semseg_args(config, train, val):
    import run_finetuning_semseg as script
    from utils.finetune.semseg import validate_semseg_args

    argv = ["-c", str(REPO / config), "--data_path", str(train), "--eval_data_path", str(val), *SMALL]
    return parse_args(script.get_args_parser(), argv, validate=validate_semseg_args, exit_on_error=False)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# ---------------------------------------------------------------------------------------------- ADE20K

def test_ade20k_layout_labels_and_config_reads_it(tmp_path):
    from utils.finetune.semseg import build_semseg_dataset

    labels = make_ade20k(tmp_path / "ADEChallengeData2016")
    out = tmp_path / "ade"
    assert prepare_ade20k.main(["--source", str(tmp_path / "ADEChallengeData2016"), "--save_path", str(out),
                                "--num_threads", "2"]) == {"train": 3, "val": 2}
    assert _files(out / "val") == ["rgb/data/ADE_val_00000001.jpg", "rgb/data/ADE_val_00000002.jpg",
                                   "semseg/data/ADE_val_00000001.png", "semseg/data/ADE_val_00000002.png"]
    src = tmp_path / "ADEChallengeData2016/images/training/ADE_train_00000002.jpg"
    assert (out / "train/rgb/data/ADE_train_00000002.jpg").read_bytes() == src.read_bytes()
    ds = build_semseg_dataset(_semseg_args("cfgs/finetune/semseg/ade/ft_ade_64e_multimae-b_rgb.yaml",
                                           out / "train", out / "val"), "val")
    assert len(ds) == 2 and ds.modalities == ["rgb", "semseg"]
    np.testing.assert_array_equal(ds.load(1)["semseg"][0].numpy(), labels["ADE_val_00000002"])
    sample, _ = ds[1]  # resized x2 (longest side 32, nearest for labels), padded; 0 -> ignore, 1..150 -> 0..149
    lab = labels["ADE_val_00000002"].astype(np.int64)
    np.testing.assert_array_equal(sample["semseg"].numpy()[:2 * H:2, :2 * W:2], np.where(lab == 0, 255, lab - 1))


def test_ade20k_link_and_errors(tmp_path):
    src = tmp_path / "ADE"
    make_ade20k(src, n_train=2, n_val=1)
    out = tmp_path / "ade"
    prepare_ade20k.main(["--source", str(src), "--save_path", str(out), "--link"])
    link = out / "train/semseg/data/ADE_train_00000001.png"
    assert link.is_symlink() and Path(os.readlink(link)) == (src / "annotations/training/ADE_train_00000001.png")
    (src / "annotations/validation/ADE_val_00000001.png").unlink()
    with pytest.raises(SystemExit, match=r"1 validation file\(s\) without their annotation, e.g. '.*ADE_val_00000001"):
        prepare_ade20k.main(["--source", str(src), "--save_path", str(tmp_path / "o1")])
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(src / "annotations/validation/ADE_val_00000001.png")
    with pytest.raises(SystemExit, match=r"ADE_val_00000001.png' is a PNG image of mode RGB; expected an 8-bit"):
        prepare_ade20k.main(["--source", str(src), "--save_path", str(tmp_path / "o2")])
    os.rename(src / "annotations", src / "labels")
    with pytest.raises(SystemExit, match=r"2 folder\(s\) missing: '.*annotations/training', '.*annotations/validation'"):
        prepare_ade20k.main(["--source", str(src), "--save_path", str(tmp_path / "o3")])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ---------------------------------------------------------------------------------------------- Hypersim

SCENES = {"ai_001_001": [("cam_00", 0, "train"), ("cam_00", 3, "train"), ("cam_01", 1, "val")],
          "ai_002_004": [("cam_00", 7, "test")]}


def test_hypersim_tone_map_planar_depth_labels_and_config_reads_it(tmp_path):
    from utils.finetune.semseg import build_semseg_dataset

    csv_path, written = make_hypersim(tmp_path / "hypersim", SCENES)
    out = tmp_path / "hs"
    counts = prepare_hypersim.main(["--source", str(tmp_path / "hypersim"), "--split_csv", str(csv_path),
                                    "--save_path", str(out), "--num_threads", "2"])
    assert counts == {"train": 2, "val": 1, "test": 1}  # the non-public frame 99 is left out
    assert _files(out / "train/depth") == ["ai_001_001/cam_00_0000.png", "ai_001_001/cam_00_0003.png"]
    src = written[("ai_001_001", "cam_01", 1)]
    read = lambda m: np.array(Image.open(out / "val" / m / "ai_001_001/cam_01_0001.png"))  # noqa: E731
    # a constant colour: its luminance is the 90th percentile, mapped to 0.8 -> 204
    np.testing.assert_array_equal(read("rgb"), np.full((H, W, 3), 204, np.uint8))
    depth = read("depth")
    assert depth.dtype == np.uint16
    planar = prepare_hypersim.ray_to_planar(np.nan_to_num(src["distance"].astype(np.float64)), 60.0)
    np.testing.assert_array_equal(depth, np.round(planar * 1000).astype(np.uint16))
    assert np.abs(depth[1:].astype(float) - src["wall_m"] * 1000).max() < 10  # the wall is flat again (mm)
    np.testing.assert_array_equal(read("mask_valid"), np.where(np.isnan(src["distance"]), 0, 255))
    np.testing.assert_array_equal(read("semseg"), np.maximum(src["semantic"], 0))
    args = _semseg_args("cfgs/finetune/semseg/hypersim/ft_hypersim_25e_multimae-b_rgb-depth.yaml",
                        out / "train", out / "val")
    ds = build_semseg_dataset(args, "val")
    assert ds.modalities == ["rgb", "depth", "semseg", "mask_valid"] and len(ds) == 1
    assert int(ds.load(0)["depth"].max()) == int(depth.max())
    sample, _ = ds[0]
    assert sample["depth"].shape[-2:] == sample["rgb"].shape[-2:]

    prepare_hypersim.main(["--source", str(tmp_path / "hypersim"), "--split_csv", str(csv_path), "--splits", "val",
                           "--save_path", str(tmp_path / "dist"), "--depth_type", "distance"])
    ray = np.array(Image.open(tmp_path / "dist/val/depth/ai_001_001/cam_01_0001.png"))
    np.testing.assert_array_equal(ray, np.round(np.nan_to_num(src["distance"].astype(np.float64)) * 1000))


def test_hypersim_errors_name_what_is_missing(tmp_path):
    root = tmp_path / "hypersim"
    csv_path, _ = make_hypersim(root, {"ai_001_001": SCENES["ai_001_001"]}, absent_scenes=("ai_055_010",))
    base = ["--source", str(root), "--split_csv", str(csv_path)]
    with pytest.raises(SystemExit, match=r"1 scene folder\(s\) of the split CSV missing .*: ai_055_010 .*"
                                         r"--skip_missing_scenes"):
        prepare_hypersim.main(base + ["--save_path", str(tmp_path / "o1")])
    assert prepare_hypersim.main(base + ["--save_path", str(tmp_path / "o2"), "--skip_missing_scenes"]) == \
        {"train": 2, "val": 1, "test": 0}
    (root / "ai_001_001/images/scene_cam_00_geometry_hdf5/frame.0003.semantic.hdf5").unlink()
    with pytest.raises(SystemExit, match=r"1 file\(s\) missing: '.*scene_cam_00_geometry_hdf5/frame.0003.semantic.hdf5'"):
        prepare_hypersim.main(base + ["--save_path", str(tmp_path / "o3"), "--skip_missing_scenes"])
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()
    (tmp_path / "bad.csv").write_text("scene_name,camera_name,frame_id\nai_001_001,cam_00,0\n")
    with pytest.raises(SystemExit, match=r"bad.csv: column\(s\) \['included_in_public_release', "
                                         r"'split_partition_name'\] missing"):
        prepare_hypersim.main(["--source", str(root), "--split_csv", str(tmp_path / "bad.csv"),
                               "--save_path", str(tmp_path / "o4")])


# ---------------------------------------------------------------------------------------------- Taskonomy

BUILDINGS = {"allensville": "train", "beechwood": "val", "collierville": "test"}


def test_taskonomy_links_copies_and_config_reads_it(tmp_path):
    import run_finetuning_depth as script
    from utils.finetune.depth import build_regression_dataset, validate_regression_args

    src = tmp_path / "taskonomy"
    csv_path = make_taskonomy(src, BUILDINGS)
    out = tmp_path / "tk"
    base = ["--source", str(src), "--split_csv", str(csv_path)]
    assert prepare_taskonomy.main(base + ["--save_path", str(out), "--link"]) == {"train": 2, "val": 2, "test": 2}
    assert sorted(os.listdir(out / "val")) == sorted(prepare_taskonomy.DEFAULT_TASKS)
    assert _files(out / "val/normal") == ["beechwood/point_0_view_0.png", "beechwood/point_3_view_1.png"]
    for p in out.rglob("*.png"):  # links, none dangling; mask_valid found under its depth_zbuffer name
        assert p.is_symlink() and p.resolve().is_file()
    assert os.readlink(out / "test/mask_valid/collierville/point_3_view_1.png") == str(
        src / "mask_valid/taskonomy/collierville/point_3_view_1_domain_depth_zbuffer.png")

    prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "copy"), "--tasks", "normal", "--splits", "train"])
    copied = tmp_path / "copy/train/normal/allensville/point_3_view_1.png"
    assert not copied.is_symlink()
    assert copied.read_bytes() == (src / "normal/taskonomy/allensville/point_3_view_1_domain_normal.png").read_bytes()
    assert sorted(os.listdir(tmp_path / "copy")) == ["train"] and sorted(os.listdir(tmp_path / "copy/train")) == \
        ["normal", "rgb"]

    argv = ["-c", str(REPO / "cfgs/finetune/taskonomy/rgb2normal-1k/ft_rgb2normal_multimae-b.yaml"),
            "--data_path", str(out / "train"), "--eval_data_path", str(out / "val"),
            "--test_data_path", str(out / "test"), *SMALL]
    args = parse_args(script.get_args_parser(), argv, validate=validate_regression_args, exit_on_error=False)
    ds = build_regression_dataset(args, "test")
    assert ds.modalities == ["rgb", "normal", "mask_valid"] and len(ds) == 2
    raw = np.array(Image.open(src / "normal/taskonomy/collierville/point_3_view_1_domain_normal.png"))
    np.testing.assert_array_equal(ds.load(1)["normal"].permute(1, 2, 0).numpy(), raw)
    sample, _ = ds[1]
    assert sample["normal"].shape == (3, 32, 32 * W // H) and sample["mask_valid"].dtype.is_floating_point is False


def test_taskonomy_checks_everything_before_linking(tmp_path):
    src = tmp_path / "taskonomy"
    csv_path = make_taskonomy(src, {**BUILDINGS, "darden": "train"}, domains=("rgb", "normal", "mask_valid"))
    base = ["--source", str(src), "--split_csv", str(csv_path), "--tasks", "normal", "mask_valid", "--link"]
    os.rename(src / "normal/taskonomy/beechwood", src / "beechwood_normal")
    with pytest.raises(SystemExit, match=r"1 folder\(s\) missing: '.*normal/taskonomy/beechwood'"):
        prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "o1")])
    assert not (tmp_path / "o1").exists()  # nothing written, so no dangling link
    for domain in ("rgb", "mask_valid"):
        os.rename(src / domain / "taskonomy/beechwood", src / f"beechwood_{domain}")
    with pytest.raises(SystemExit, match=r"3 folder\(s\) missing: '.*rgb/taskonomy/beechwood'.*"
                                         r"--skip_missing_buildings"):  # a building not downloaded at all
        prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "o2")])
    counts = prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "o2"), "--skip_missing_buildings"])
    assert counts == {"train": 4, "val": 0, "test": 2}
    (src / "mask_valid/taskonomy/darden/point_0_view_0_domain_depth_zbuffer.png").unlink()
    with pytest.raises(SystemExit, match=r"1 file\(s\) missing, e.g. '.*mask_valid/taskonomy/darden/"
                                         r"point_0_view_0_domain_mask_valid.png'.*--skip_incomplete"):
        prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "o3"), "--skip_missing_buildings"])
    counts = prepare_taskonomy.main(base + ["--save_path", str(tmp_path / "o3"), "--skip_missing_buildings",
                                            "--skip_incomplete"])
    assert counts == {"train": 3, "val": 0, "test": 2}
    assert not (tmp_path / "o3/train/rgb/darden/point_0_view_0.png").exists()
    (tmp_path / "bad.csv").write_text("id,train,val,test\nallensville,1,0,yes\n")
    with pytest.raises(SystemExit, match=r"split CSV line 2: column 'test' is 'yes'; expected 1 or 0"):
        prepare_taskonomy.main(["--source", str(src), "--split_csv", str(tmp_path / "bad.csv"),
                                "--save_path", str(tmp_path / "o4")])
