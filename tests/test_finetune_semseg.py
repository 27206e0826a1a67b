"""run_finetuning_semseg.py end to end on tiny synthetic scenes: the loss falls, checkpoints evaluate to the logged
numbers, pictures are written, the best checkpoint is what the final test uses, pseudo-labelled semseg inputs
load from a MultiMAE checkpoint, and a 2-process evaluation equals the single-process one exactly."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_finetuning_semseg as script
from utils.finetune.models import load_pretrained
from utils.finetune.semseg import build_semseg_model
from utils.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
N_VAL = 5  # odd: two processes get uneven shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(root), num_train=16, num_val=N_VAL, image_size=32)
    for split in ("train", "val"):  # pseudo labels = the ground truth (values 0..5 < 133 COCO classes)
        os.symlink(root / split / "semseg", root / split / "pseudo_semseg", target_is_directory=True)
    return root


def argv_for(data, out, *extra):
    return ["-c", str(REPO / "cfgs/finetune/semseg/synthetic_rgb.yaml"), "--data_path", str(data / "train"),
            "--eval_data_path", str(data / "val"), "--output_dir", str(out), "--finetune", "", "--input_size", "32",
            "--batch_size", "4", "--decoder_dim", "384", "--num_workers", "0", "--print_freq", "100",
            "--lr", "1e-3", "--drop_path_encoder", "0.0", *extra]


def run(argv):
    args = script.parse_config(argv, exit_on_error=False)
    return args, script.main(args)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def records(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "semseg"
    run(argv_for(data, out, "--epochs", "3", "--eval_freq", "1", "--log_images_freq", "2", "--num_vis", "3",
                 "--test_data_path", str(data / "val")))
    return out


def test_short_run_loss_falls_and_best_checkpoint_is_tested(trained):
    recs = records(trained)
    epochs = [r for r in recs if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert epochs[-1]["train/loss"] < 0.8 * epochs[0]["train/loss"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    best = max(epochs, key=lambda r: r["val/mean_iou"])
    ckpt = torch.load(trained / "checkpoint-best.pth", weights_only=True)
    assert ckpt["epoch"] == best["epoch"] and ckpt["best_value"] == best["val/mean_iou"]
    test = recs[-1]  # test split == val split here, so the best epoch's numbers must come back
    assert f"epoch {best['epoch']}" in test["test/weights"]
    for k in ("mean_iou", "mean_accuracy", "pixel_accuracy"):
        assert test[f"test/{k}"] == best[f"val/{k}"]
    assert (trained / "config.yaml").is_file()


def test_eval_of_saved_checkpoint_reproduces_logged_metrics(trained, data, tmp_path):
    last = [r for r in records(trained) if "epoch" in r][-1]
    out = tmp_path / "eval"
    _, rec = run(argv_for(data, out, "--eval", "--resume", str(trained / "checkpoint-2.pth"), "--num_vis", "2"))
    for k in ("mean_iou", "mean_accuracy", "pixel_accuracy"):
        assert rec[f"val/{k}"] == last[f"val/{k}"]
    assert rec["val/loss"] == pytest.approx(last["val/loss"], rel=1e-6)
    logged = records(out)[-1]
    assert logged["weights"].endswith("checkpoint-2.pth") and logged["val/mean_iou"] == last["val/mean_iou"]
    assert (out / "vis" / "predictions_val.png").is_file()


def test_prediction_pictures_written(trained):
    names = sorted(os.listdir(trained / "vis"))
    assert names == ["predictions_e0000.png", "predictions_e0002.png"]  # every 2 epochs and the last
    with Image.open(trained / "vis" / "predictions_e0002.png") as im:
        # 3 images x (rgb, prediction, ground truth), 128 px tiles with 2 px gaps
        assert im.size == (3 * 130, 14 + 3 * 130) and im.mode == "RGB"  # 14 px of column titles


def _tiny_multimae_checkpoint(path):
    from multimae import create_model
    from utils.data.modalities import build_input_adapters, build_pretrain_output_adapters

    domains = ["rgb", "depth", "semseg"]
    model = create_model("pretrain_multimae_tiny", input_adapters=build_input_adapters(domains, 16, 64),
                         output_adapters=build_pretrain_output_adapters(domains, domains, 16, 64, dim_tokens=64,
                                                                        depth=1, num_heads=2, extra_norm_pix_loss=True))
    torch.save({"model": model.state_dict(), "epoch": 3}, path)
    return model.state_dict()


def test_pseudo_semseg_input_from_multimae_checkpoint(data, tmp_path):
    weights = tmp_path / "multimae_tiny.pth"
    sd = _tiny_multimae_checkpoint(weights)
    argv = argv_for(data, tmp_path / "out", "--in_domains", "rgb-depth-pseudo_semseg", "--use_mask_valid",
                    "--decoder_main_tasks", "rgb-semseg", "--finetune", str(weights), "--epochs", "1",
                    "--max_steps_per_epoch", "2", "--no_save_ckpt", "--num_vis", "1")
    args = script.parse_config(argv, exit_on_error=False)
    model = build_semseg_model(args)
    report = load_pretrained(model, args.finetune)
    key = "input_adapters.semseg.class_emb.weight"
    assert report.padded[key] == ((133, 64), (134, 64))  # the padding class of pseudo labels
    assert report.interpolated["input_adapters.rgb.pos_emb"] == ((1, 192, 4, 4), (1, 192, 2, 2))
    assert report.dropped and all(k.startswith("output_adapters.") for k in report.dropped)
    assert torch.equal(model.state_dict()[key][:133], sd[key])
    assert torch.equal(model.state_dict()["encoder.3.mlp.fc1.weight"], sd["encoder.3.mlp.fc1.weight"])
    assert model.output_adapters["semseg"].proj_dec.in_features == 2 * 192  # rgb + semseg tokens
    script.main(args)
    assert records(tmp_path / "out")[0]["val/loss"] > 0


@pytest.mark.parametrize("head", ["segmenter", "dpt"])
def test_other_heads_with_void_label(head, data, tmp_path):
    argv = argv_for(data, tmp_path / "out", "--output_adapter", head, "--decoder_dim", "96", "--decoder_depth", "1",
                    "--in_domains", "rgb-depth", "--use_mask_valid", "--decoder_main_tasks", "depth",
                    "--seg_use_void_label", "--epochs", "1", "--max_steps_per_epoch", "2", "--no_save_ckpt",
                    "--num_vis", "0")
    args, rec = run(argv)
    model = build_semseg_model(args)
    out = model({"rgb": torch.zeros(1, 3, 32, 32), "depth": torch.zeros(1, 1, 32, 32)},
                return_all_layers=head == "dpt")["semseg"]
    assert out.shape == (1, 7, 32, 32)  # 6 classes + void
    assert model.output_adapters["semseg"].main_tasks == ["depth"]  # Segmenter honours decoder_main_tasks
    assert 0 <= rec["val/mean_iou"] <= 100


def test_two_process_eval_equals_single_process(trained, data, tmp_path):
    ckpt = str(trained / "checkpoint-2.pth")
    common = argv_for(data, tmp_path / "x", "--eval", "--resume", ckpt, "--batch_size", "1", "--num_vis", "0")
    _, single = run(common)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "run_finetuning_semseg.py"), *argv_for(data, out, "--eval", "--resume", ckpt, "--batch_size", "1",
                                                             "--num_vis", "0", "--dist_eval")]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = records(out)[-1]
    for k in ("mean_iou", "mean_accuracy", "pixel_accuracy"):
        assert dist[f"val/{k}"] == single[f"val/{k}"]
    assert dist["val/loss"] == pytest.approx(single["val/loss"], rel=1e-9)
    assert "rank 1/2" in proc.stdout + proc.stderr  # it really ran as two processes


def test_label_out_of_range_names_the_file(data):
    from utils.data.datasets import BadSampleError
    from utils.finetune.semseg import build_semseg_dataset

    args = script.parse_config(argv_for(data, "unused", "--num_classes", "2"), exit_on_error=False)
    ds = build_semseg_dataset(args, "val")
    with pytest.raises(BadSampleError, match=r"semseg file '.*\.png' holds class id"):
        for i in range(len(ds)):  # every synthetic scene has floor, wall and at least one object (id >= 2)
            ds[i]


def test_channels_last_gives_the_same_run(data, tmp_path):
    """--channels_last on (the CUDA default) changes the memory layout of the convolutions only."""
    from utils.finetune.models import use_channels_last

    assert use_channels_last("auto", torch.device("cuda")) and not use_channels_last("auto", torch.device("cpu"))
    assert use_channels_last("on", torch.device("cpu")) and not use_channels_last("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="--channels_last must be"):
        use_channels_last("yes", torch.device("cpu"))
    recs = {}
    for mode in ("off", "on"):
        _, recs[mode] = run(argv_for(data, tmp_path / mode, "--channels_last", mode, "--epochs", "1",
                                     "--max_steps_per_epoch", "2", "--no_save_ckpt", "--num_vis", "0", "--seed", "3"))
    assert recs["on"]["val/loss"] == pytest.approx(recs["off"]["val/loss"], rel=1e-4)
    assert recs["on"]["val/mean_iou"] == pytest.approx(recs["off"]["val/mean_iou"], abs=1e-3)


def test_semseg_layer_decay_scales_the_input_adapters_too(tmp_path):
    """run_finetuning_semseg.py has no --scale_input_lr: its input adapters and global tokens are layer 0 of
    the decay, ``ld ** (L + 1)``, block i gets ``ld ** (L - i)``, the head 1 (a typed-config default once
    left the input adapters at scale 1)."""
    import run_finetuning_semseg as script
    from utils.finetune.dense import dense_param_groups
    from utils.jobs import get_job

    cfg = script.parse_config(['-c', 'cfgs/finetune/semseg/synthetic_rgb.yaml', '--data_path', str(tmp_path),
                               '--eval_data_path', str(tmp_path), '--finetune', '', '--output_dir', str(tmp_path / 'out')], exit_on_error=False)
    model = get_job('finetune', 'semseg').model(cfg)
    scale = {n: g['lr_scale'] for g in dense_param_groups(cfg, model) for n, p in model.named_parameters()
             if any(p is q for q in g['params'])}
    ld, depth = cfg.optim.layer_decay, model.get_num_layers()
    assert scale['input_adapters.rgb.proj.weight'] == pytest.approx(ld ** (depth + 1))
    assert scale['global_tokens'] == pytest.approx(ld ** (depth + 1))
    assert scale['encoder.0.attn.qkv.weight'] == pytest.approx(ld ** depth)
    assert scale[f'encoder.{depth - 1}.mlp.fc2.weight'] == pytest.approx(ld)
    assert all(v == 1.0 for n, v in scale.items() if n.startswith('output_adapters.'))
