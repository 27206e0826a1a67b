"""Every published dense fine-tuning config (10 semseg, 2 NYU depth, 16 Taskonomy) starts unchanged apart from
paths, epochs and batch size (plus a tiny model, a small input size and step caps), runs on the synthetic
scenes on CPU and logs finite validation numbers. The Taskonomy configs run through run_finetuning_taskonomy.py
on the synthetic data in the published Taskonomy layout, and through run_finetuning_depth.py on the folder
layout."""
import glob
import json
import math
import os
from pathlib import Path

import pytest

import run_finetuning_depth
import run_finetuning_semseg
import run_finetuning_taskonomy
from utils.data.synthetic import make_synthetic_dataset
from utils.data.synthetic_taskonomy import make_taskonomy_dataset

REPO = Path(__file__).resolve().parents[1]
SEMSEG = sorted(glob.glob(str(REPO / "cfgs/finetune/semseg/*/*.yaml")))
DEPTH = sorted(glob.glob(str(REPO / "cfgs/finetune/depth/ft_*.yaml")))
TASKONOMY = sorted(glob.glob(str(REPO / "cfgs/finetune/taskonomy/*/*.yaml")))
# Taskonomy target -> synthetic folder standing in for it (same file kind: 16-bit gray or 8-bit colour)
STAND_INS = {"depth_zbuffer": "depth", "edge_texture": "depth", "edge_occlusion": "depth", "keypoints2d": "depth",
             "keypoints3d": "depth", "normal": "normal", "principal_curvature": "normal", "reshading": "rgb"}


def test_all_published_configs_are_present():
    assert (len(SEMSEG), len(DEPTH), len(TASKONOMY)) == (10, 2, 16)
    names = {os.path.relpath(p, REPO / "cfgs/finetune") for p in SEMSEG + DEPTH + TASKONOMY}
    assert "semseg/ade/ft_ade_64e_multimae-b_rgb.yaml" in names
    assert "taskonomy/rgb2curvature-1k/ft_rgb2curvature_mae-b.yaml" in names


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(root), num_train=8, num_val=4, image_size=32, with_normals=True)
    for split in ("train", "val"):  # Taskonomy layout: one folder per task, files named alike
        for task, src in STAND_INS.items():
            if task != src:
                os.symlink(root / split / src, root / split / task, target_is_directory=True)
    return root


def _common(data, out):
    return ["--data_path", str(data / "train"), "--eval_data_path", str(data / "val"), "--output_dir", str(out),
            "--finetune", "", "--epochs", "1", "--batch_size", "2", "--model", "multivit_tiny", "--input_size", "32",
            "--max_steps_per_epoch", "1", "--max_val_images", "3", "--num_workers", "0", "--device", "cpu",
            "--no_save_ckpt", "--num_vis", "1", "--print_freq", "100"]


def _val_record(out):
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return records


@pytest.mark.parametrize("cfg", SEMSEG, ids=lambda p: Path(p).stem)
def test_semseg_config_runs(cfg, data, tmp_path):
    out = tmp_path / "out"
    args = run_finetuning_semseg.parse_config(["-c", cfg, *_common(data, out)], exit_on_error=False)
    run_finetuning_semseg.main(args)
    rec = _val_record(out)[-1]
    assert 0.0 <= rec["val/mean_iou"] <= 100.0 and math.isfinite(rec["val/loss"])
    assert rec["train/loss"] > 0


@pytest.mark.parametrize("cfg", DEPTH + TASKONOMY, ids=lambda p: Path(p).stem)
def test_regression_config_runs(cfg, data, tmp_path):
    out = tmp_path / "out"
    argv = ["-c", cfg, *_common(data, out)]
    if "taskonomy" in cfg:
        argv += ["--test_data_path", str(data / "val"), "--max_test_images", "2"]
    args = run_finetuning_depth.parse_config(argv, exit_on_error=False)
    run_finetuning_depth.main(args)
    records = _val_record(out)
    assert math.isfinite(records[0]["val/loss"]) and records[0]["train/loss"] > 0
    if "taskonomy" in cfg:
        task = args.out_domains
        assert records[0]["val/loss"] == pytest.approx(records[0][f"val/{task}_loss"])
        assert math.isfinite(records[-1]["test/loss"])  # the final test on test_data_path ran
        assert "final weights" in records[-1]["test/weights"]  # --no_save_ckpt: said, not hidden
    else:
        assert 0.0 <= records[0]["val/delta1"] <= 1.0


@pytest.fixture(scope="module")
def taskonomy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskonomy")
    make_taskonomy_dataset(str(root), num_train=4, num_val=3, num_test=2, image_size=32)
    return root


@pytest.mark.parametrize("cfg", TASKONOMY, ids=lambda p: Path(p).stem)
def test_taskonomy_config_runs_on_published_layout(cfg, taskonomy_data, tmp_path):
    out = tmp_path / "out"
    argv = ["-c", cfg, "--data_path", str(taskonomy_data), "--output_dir", str(out), "--finetune", "",
            "--epochs", "1", "--batch_size", "2", "--model", "multivit_tiny", "--input_size", "32",
            "--max_steps_per_epoch", "1", "--num_workers", "0", "--device", "cpu", "--no_save_ckpt", "--num_vis", "0",
            "--print_freq", "100"]
    args = run_finetuning_taskonomy.parse_config(argv, exit_on_error=False)
    assert (args.max_train_images, args.max_val_images, args.loss, args.weight_decay) == (800, 200, "l1", 0.05)
    run_finetuning_taskonomy.main(args)
    records = _val_record(out)
    task = args.out_domains
    assert math.isfinite(records[0]["val/loss"]) and records[0]["train/loss"] > 0
    assert records[0]["val/loss"] == pytest.approx(records[0][f"val/{task}_loss"])
    assert math.isfinite(records[-1]["test/loss"])  # the published final test on the test split
