"""run_finetuning_depth.py end to end on tiny synthetic scenes: NYU-style depth (loss falls, --eval reproduces the
logged per-pixel metrics, pictures), a Taskonomy-style target through the same script with a strict best-checkpoint
test, explicit --tmp, frozen encoder, and a 2-process evaluation equal to the single-process one."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_finetuning_depth as script
from utils.engine.optim import create_optimizer
from utils.finetune.dense import dense_param_groups
from utils.finetune.depth import build_regression_model
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
METRICS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(root), num_train=16, num_val=5, image_size=32, with_normals=True)
    return root


def argv_for(data, out, *extra):
    return ["-c", str(REPO / "cfgs/finetune/depth/synthetic.yaml"), "--data_path", str(data / "train"),
            "--eval_data_path", str(data / "val"), "--output_dir", str(out), "--finetune", "", "--input_size", "32",
            "--batch_size", "4", "--num_workers", "0", "--print_freq", "100", "--lr", "3e-4", *extra]


def parse(argv):
    return script.parse_config(argv, exit_on_error=False)


def records(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "depth"
    script.main(parse(argv_for(data, out, "--epochs", "3", "--eval_freq", "1", "--log_images_freq", "5",
                               "--num_vis", "2")))
    return out


def test_short_run_loss_falls(trained):
    epochs = [r for r in records(trained) if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["train/loss"] < 0.8 * epochs[0]["train/loss"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert epochs[-1]["val/delta1"] > epochs[0]["val/delta1"]
    assert all(f"val/{k}" in epochs[-1] for k in METRICS)
    best = min(epochs, key=lambda r: r["val/loss"])  # published: best = lowest validation loss
    assert torch.load(trained / "checkpoint-best.pth", weights_only=True)["epoch"] == best["epoch"]
    # epoch 0 and the last epoch (log_images_freq 5 > epochs)
    assert sorted(os.listdir(trained / "vis")) == ["predictions_e0000.png", "predictions_e0002.png"]


def test_eval_of_saved_checkpoint_reproduces_logged_metrics(trained, data, tmp_path):
    last = [r for r in records(trained) if "epoch" in r][-1]
    rec = script.main(parse(argv_for(data, tmp_path / "eval", "--eval", "--resume", str(trained / "checkpoint-2.pth"),
                                     "--num_vis", "0")))
    for k in METRICS + ("loss",):
        assert rec[f"val/{k}"] == pytest.approx(last[f"val/{k}"], rel=1e-9)


def test_taskonomy_target_through_the_same_script(data, tmp_path):
    out = tmp_path / "normal"
    argv = ["-c", str(REPO / "cfgs/finetune/taskonomy/rgb2normal-1k/ft_rgb2normal_multimae-b.yaml"),
            "--data_path", str(data / "train"), "--eval_data_path", str(data / "val"), "--test_data_path",
            str(data / "val"), "--output_dir", str(out), "--finetune", "", "--model", "multivit_tiny", "--input_size",
            "32", "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--num_vis", "1", "--device", "cpu"]
    args = parse(argv)
    assert (args.loss, args.aug_name, args.out_domains) == ("l1", "taskonomy", "normal")
    script.main(args)
    recs = records(out)
    epochs = [r for r in recs if "epoch" in r]
    best = min(epochs, key=lambda r: r["val/loss"])
    test = recs[-1]
    assert f"epoch {best['epoch']}" in test["test/weights"]
    assert test["test/loss"] == pytest.approx(best["val/loss"], rel=1e-9)  # test split == val split
    assert test["test/normal_loss"] == test["test/loss"]


def test_tmp_is_the_only_output_dir_rewrite(data, tmp_path):
    base = argv_for(data, tmp_path / "run", "--epochs", "1", "--max_steps_per_epoch", "1", "--no_save_ckpt",
                    "--num_vis", "0", "--max_val_images", "1")
    script.main(parse(base))
    assert (tmp_path / "run" / "config.yaml").is_file() and not (tmp_path / "run-tmp").exists()
    args = parse([*base, "--tmp", "--wandb_run_name", "x"])
    script.main(args)
    assert (tmp_path / "run-tmp" / "config.yaml").is_file() and args.wandb_run_name == "tmp-x"


def test_freeze_transformer_trains_only_adapters_and_head(data, tmp_path):
    args = parse(argv_for(data, tmp_path, "--freeze_transformer", "--loss", "l2"))
    model = build_regression_model(args)
    opt = create_optimizer(args.optim, dense_param_groups(args, model))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names and not any(n.startswith("encoder.") for n in names)
    assert any(n.startswith("input_adapters.") for n in names) and any(n.startswith("output_adapters.") for n in names)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20-40 s on 2 shared cores; the semseg twin (same sampler and reduction path) runs by default
def test_two_process_eval_equals_single_process(trained, data, tmp_path):
    ckpt = str(trained / "checkpoint-2.pth")
    extra = ("--eval", "--resume", ckpt, "--batch_size", "1", "--num_vis", "0")  # eval batch 1: same forward per image
    single = script.main(parse(argv_for(data, tmp_path / "single", *extra)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "run_finetuning_depth.py"), *argv_for(data, out, *extra, "--dist_eval")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = records(out)[-1]
    assert "rank 1/2" in proc.stdout + proc.stderr
    for k in METRICS + ("loss", "depth_loss"):  # float64 sums of the same per-pixel terms, added in another order
        assert dist[f"val/{k}"] == pytest.approx(single[f"val/{k}"], rel=1e-12)
