"""A new modality of an existing kind is one registry entry: defined here, in one place, it pre-trains (as an
input and a target) and fine-tunes (as an input of semantic segmentation) through the unchanged scripts."""
import json
import os
from pathlib import Path

import pytest
import torch

import run_finetuning_semseg
import run_pretraining_multimae
from utils.config import parse_args
from utils.data.constants import DEPTH_PNG_SCALE
from utils.data.modalities import MODALITIES, Modality, register_modality, unregister_modality
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def elevation(tmp_path):
    """'elevation': a 16-bit single-channel dense modality (the synthetic depth maps under another name)."""
    register_modality(Modality('elevation', num_channels=1, kind='dense', decoder='gray',
                               value_scale=1.0 / DEPTH_PNG_SCALE, value_range=(0.0, 1.0), loss='l1', bit_depth=16))
    root = tmp_path / "data"
    make_synthetic_dataset(str(root), num_train=16, num_val=4, image_size=32)
    for split in ("train", "val"):
        os.symlink(root / split / "depth", root / split / "elevation", target_is_directory=True)
    yield root
    unregister_modality('elevation')


def test_a_new_modality_pretrains_and_finetunes(elevation, tmp_path):
    assert 'elevation' in MODALITIES
    pre_out = tmp_path / "pre"
    argv = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8",
            "--in_domains", "rgb-elevation", "--out_domains", "rgb-elevation", "--num_encoded_tokens", "8",
            "--decoder_dim", "32", "--decoder_depth", "1", "--decoder_num_heads", "2", "--batch_size", "4",
            "--epochs", "3", "--warmup_epochs", "0", "--blr", "1e-2", "--num_workers", "0", "--device", "cpu",
            "--save_vis_freq", "0", "--print_freq", "100", "--data_path", str(elevation / "train"),
            "--output_dir", str(pre_out)]
    run_pretraining_multimae.main(parse_args(run_pretraining_multimae.get_args_parser(), argv,
                                             exit_on_error=False))
    records = [json.loads(line) for line in (pre_out / "log.txt").read_text().splitlines()]
    losses = [r["[Epoch] elevation_loss"] for r in records]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    ckpt = torch.load(pre_out / "checkpoint-last.pth", weights_only=True)
    assert any(k.startswith("input_adapters.elevation.") for k in ckpt["model"])
    assert any(k.startswith("output_adapters.elevation.") for k in ckpt["model"])

    ft_out = tmp_path / "ft"
    argv = ["-c", str(REPO / "cfgs/finetune/semseg/synthetic_rgb.yaml"), "--data_path", str(elevation / "train"),
            "--eval_data_path", str(elevation / "val"), "--output_dir", str(ft_out),
            "--finetune", str(pre_out / "checkpoint-last.pth"), "--model", "multivit_tiny", "--patch_size", "8",
            "--input_size", "32", "--in_domains", "rgb-elevation", "--batch_size", "4", "--decoder_dim", "64",
            "--num_workers", "0", "--print_freq", "100", "--epochs", "1", "--lr", "1e-3", "--device", "cpu",
            "--drop_path_encoder", "0.0", "--num_vis", "0"]
    record = run_finetuning_semseg.main(run_finetuning_semseg.parse_config(argv, exit_on_error=False))
    assert 0.0 <= record["val/mean_iou"] <= 100.0
    ft = torch.load(ft_out / "checkpoint-best.pth", weights_only=True)["model"]
    pre = ckpt["model"]
    # The fine-tuned model has the new modality's input adapter, initialised from pre-training (its
    # patch embedding moved by one epoch of training, but it did not start from a fresh random draw).
    key = next(k for k in pre if k.startswith("input_adapters.elevation.") and k.endswith("proj.weight"))
    assert key in ft and ft[key].shape == pre[key].shape
    assert torch.nn.functional.cosine_similarity(ft[key].flatten(), pre[key].flatten(), dim=0) > 0.9
