"""tools/pseudo_label.py + tools/lib/pseudo_labelers.py + utils/io.py: labels, resizing back, sharding, resuming."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


class TinyDepthNet(nn.Module):
    """A 'DPT-style' depth network for the tests: positive depth from a 1x1 convolution."""

    def __init__(self, scale: float = 2.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.scale = scale

    def forward(self, x):
        return {"depth": F.softplus(self.conv(x))[:, 0] * self.scale}  # (B, H, W), like DPT


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory):
    """Synthetic scenes with only the rgb folders left (what pseudo-labelling starts from)."""
    from utils.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("pl") / "data"
    make_synthetic_dataset(str(root), num_train=10, num_val=2, image_size=SIZE, seed=1)
    for split in ("train", "val"):
        for m in ("depth", "semseg", "mask_valid"):
            shutil.rmtree(root / split / m)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torchvision

    tmp = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    depth_net = TinyDepthNet()
    torch.save(depth_net.state_dict(), tmp / "tiny_depth.pth")
    seg = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                        num_classes=133)
    torch.save(seg.state_dict(), tmp / "deeplab.pth")
    return {"depth": tmp / "tiny_depth.pth", "seg": tmp / "deeplab.pth", "depth_net": depth_net.eval(),
            "seg_net": seg.eval()}


def _run(argv):
    from tools import pseudo_label
    from utils.config import parse_args

    args = parse_args(pseudo_label.get_args_parser(), [str(a) for a in argv], validate=pseudo_label.validate,
                      exit_on_error=False)
    return pseudo_label.main(args)


def _module_args(data, out, w, *extra):
    return ["--data_path", data, "--output_path", out, "--task", "depth", "--labeller", "module", "--class_path",
            "tests.test_pseudo_label:TinyDepthNet", "--output_key", "depth", "--weights", w["depth"],
            "--input_size", SIZE, "--resize_mode", "stretch", "--depth_scale", 1000, "--device", "cpu",
            "--num_workers", 0, "--batch_size", 4, "--print_freq", 1, *extra]


def _rgb(path, mean, std):
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _pretrain(argv):
    """run_pretraining_multimae.py in this process (saves a Python + torch start-up)."""
    import run_pretraining_multimae
    from utils.config import parse_args
    from utils.pretrain.multimae import validate_pretrain_args

    args = parse_args(run_pretraining_multimae.get_args_parser(), [str(a) for a in argv],
                      validate=validate_pretrain_args, exit_on_error=False)
    run_pretraining_multimae.main(args)


# ---------------------------------------------------------------------------------------------- utils/io
def test_png_writers_round_trip_and_atomicity(tmp_path):
    from utils.io import atomic_write, label_dtype, load_json, save_json, save_png

    d = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    save_png(tmp_path / "a/d.png", d)
    back = Image.open(tmp_path / "a/d.png")
    assert back.mode == "I;16" and np.array_equal(np.array(back), d)
    lab = (np.arange(12 * 16).reshape(12, 16) % 7).astype(np.uint8)
    save_png(tmp_path / "l.png", lab, palette=np.zeros((7, 3), np.uint8))
    assert Image.open(tmp_path / "l.png").mode == "P" and np.array_equal(np.array(Image.open(tmp_path / "l.png")), lab)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        save_png(tmp_path / "f.png", d.astype(np.float32))
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16
    save_json(tmp_path / "m.json", {"a": [1, 2]})
    assert load_json(tmp_path / "m.json") == {"a": [1, 2]}
    with pytest.raises(TypeError):  # failure while writing: the old file stays, no temporary is left
        atomic_write(tmp_path / "m.json", "not bytes")
    assert load_json(tmp_path / "m.json") == {"a": [1, 2]} and sorted(os.listdir(tmp_path)) == ["a", "l.png", "m.json"]


def test_shard_covers_every_item_exactly_once():
    from tools.lib.pseudo_labelers import shard

    items = [f"f{i}" for i in range(11)]
    for world in (1, 2, 3, 4):
        parts = [shard(items, r, world) for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(items) and max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------------------------------------- labellers
def test_torchvision_semseg_labels_match_direct_inference(rgb_data, weights, tmp_path):
    out = tmp_path / "out"
    stats = _run(["--data_path", rgb_data / "train", "--output_path", out, "--task", "semseg", "--labeller",
                  "torchvision", "--arch", "deeplabv3_mobilenet_v3_large", "--num_classes", 133, "--weights",
                  weights["seg"], "--input_size", SIZE, "--resize_mode", "stretch", "--device", "cpu",
                  "--num_workers", 0, "--batch_size", 3])
    assert stats["labelled_all"] == 10
    rgb = sorted((rgb_data / "train/rgb").rglob("*.png"))
    labels = sorted((out / "semseg").rglob("*.png"))
    assert [p.relative_to(out / "semseg") for p in labels] == [p.relative_to(rgb_data / "train/rgb") for p in rgb]
    meta = json.loads((out / "semseg/meta.json").read_text())
    assert meta["num_classes"] == 133 and meta["format"].startswith("8-bit") and meta["labeller"]["arch"]
    from utils.data.constants import IMAGENET_DEFAULT_MEAN as M, IMAGENET_DEFAULT_STD as S
    with torch.no_grad():
        expected = weights["seg_net"](_rgb(rgb[4], M, S))["out"].argmax(1)[0].numpy()
    got = np.array(Image.open(labels[4]))
    assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE)
    assert (got == expected).mean() > 0.99  # batch vs single inference may flip exact ties only


def test_module_depth_labels_resized_back_and_scaled(rgb_data, weights, tmp_path):
    out = tmp_path / "out"
    # pad mode at a different resolution: labels come back at the image size
    _run(_module_args(rgb_data / "train", out, weights, "--input_size", 48, "--resize_mode", "pad"))
    files = sorted((out / "depth").rglob("*.png"))
    assert len(files) == 10 and all(np.array(Image.open(f)).shape == (SIZE, SIZE) for f in files)
    # stretch at the image size: exactly the network output times depth_scale
    out2 = tmp_path / "out2"
    _run(_module_args(rgb_data / "train", out2, weights))
    meta = json.loads((out2 / "depth/meta.json").read_text())
    assert meta["depth_scale"] == 1000.0 and meta["format"] == "16-bit PNG"
    f = sorted((out2 / "depth").rglob("*.png"))[3]
    rgb = rgb_data / "train/rgb" / f.relative_to(out2 / "depth")
    with torch.no_grad():
        depth = weights["depth_net"](_rgb(rgb, (0.5,) * 3, (0.5,) * 3))["depth"][0]
    got = np.array(Image.open(f))
    assert got.dtype == np.uint16
    np.testing.assert_allclose(got, np.round(depth.numpy() * 1000), atol=1)
    # inverse (disparity) outputs
    out3 = tmp_path / "out3"
    _run(_module_args(rgb_data / "train", out3, weights, "--depth_output", "inverse"))
    inv = np.array(Image.open(out3 / "depth" / f.relative_to(out2 / "depth")))
    np.testing.assert_allclose(inv, np.round(1000 / depth.numpy()), atol=1)


def _finetuned_depth_checkpoint(path):
    import run_finetuning_depth
    from utils.config import args_to_dict, parse_args
    from utils.finetune.depth import build_regression_model

    args = parse_args(run_finetuning_depth.get_args_parser(),
                      ["-c", str(ROOT / "cfgs/finetune/depth/synthetic.yaml"), "--input_size", str(SIZE),
                       "--finetune", ""], exit_on_error=False)
    torch.manual_seed(0)
    model = build_regression_model(args).eval()
    torch.save({"model": model.state_dict(), "args": args_to_dict(args), "epoch": 0}, path)
    return model, args


def test_finetuned_depth_labeller_then_pretraining_step(rgb_data, weights, tmp_path):
    """Self-training route: a depth MultiViT of this project + a torchvision semseg model label the RGB
    folder; run_pretraining_multimae.py then trains on rgb + pseudo depth + pseudo semseg."""
    model, args = _finetuned_depth_checkpoint(tmp_path / "ft.pth")
    data = tmp_path / "data"
    shutil.copytree(rgb_data / "train", data / "train")
    _run(["--data_path", data / "train", "--task", "depth", "--labeller", "finetuned", "--weights", tmp_path / "ft.pth",
          "--resize_mode", "stretch", "--device", "cpu", "--num_workers", 0])
    _run(["--data_path", data / "train", "--task", "semseg", "--labeller", "torchvision", "--arch",
          "deeplabv3_mobilenet_v3_large", "--num_classes", 133, "--weights", weights["seg"], "--input_size", SIZE,
          "--device", "cpu", "--num_workers", 0])
    meta = json.loads((data / "train/depth/meta.json").read_text())
    assert "depth_mean 25000.0" in meta["depth_unit"] and meta["labeller"]["kind"] == "FinetunedMultiViTLabeller"
    f = sorted((data / "train/depth").rglob("*.png"))[0]
    rgb = data / "train/rgb" / f.relative_to(data / "train/depth")
    from utils.data.constants import IMAGENET_DEFAULT_MEAN as M, IMAGENET_DEFAULT_STD as S
    with torch.no_grad():
        pred = model({"rgb": _rgb(rgb, M, S)}, return_all_layers=True)["depth"][0, 0]
    np.testing.assert_allclose(np.array(Image.open(f)).astype(np.float64),
                               np.clip(np.round(pred.numpy() * args.depth_std + args.depth_mean), 0, 65535), atol=1)

    _pretrain(["--model", "pretrain_multimae_tiny", "--input_size", SIZE, "--num_encoded_tokens", 6, "--batch_size", 4,
               "--epochs", 1, "--max_steps_per_epoch", 1, "--decoder_dim", 32, "--decoder_depth", 1,
               "--decoder_num_heads", 4, "--data_path", data / "train", "--output_dir", tmp_path / "pre", "--device",
               "cpu", "--num_workers", 0, "--save_vis_freq", 0, "--warmup_epochs", 0, "--standardize_depth"])
    log = [json.loads(line) for line in (tmp_path / "pre/log.txt").read_text().splitlines()]
    losses = [v for r in log for k, v in r.items() if k.endswith(("] depth_loss", "] semseg_loss"))]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), log


def test_finetuned_semseg_labeller_skips_void_and_restores_zero_label(rgb_data, tmp_path):
    import run_finetuning_semseg
    from utils.config import args_to_dict, parse_args
    from utils.finetune.semseg import build_semseg_model

    args = parse_args(run_finetuning_semseg.get_args_parser(),
                      ["-c", str(ROOT / "cfgs/finetune/semseg/synthetic_rgb.yaml"), "--input_size", str(SIZE),
                       "--finetune", "", "--seg_reduce_zero_label", "--seg_use_void_label", "--decoder_dim", "256"],
                      exit_on_error=False)
    torch.manual_seed(0)
    model = build_semseg_model(args).eval()
    with torch.no_grad():  # make the void channel (index num_classes) win everywhere: it must still not be chosen
        model.output_adapters["semseg"].final_layer.bias[args.num_classes] = 1e4
    torch.save({"model": model.state_dict(), "args": args_to_dict(args)}, tmp_path / "seg.pth")
    out = tmp_path / "out"
    _run(["--data_path", rgb_data / "train", "--output_path", out, "--task", "semseg", "--labeller", "finetuned",
          "--weights", tmp_path / "seg.pth", "--resize_mode", "stretch", "--device", "cpu", "--num_workers", 0])
    f = sorted((out / "semseg").rglob("*.png"))[2]
    from utils.data.constants import IMAGENET_DEFAULT_MEAN as M, IMAGENET_DEFAULT_STD as S
    with torch.no_grad():
        logits = model({"rgb": _rgb(rgb_data / "train/rgb" / f.relative_to(out / "semseg"), M, S)})["semseg"][0]
    expected = logits[:args.num_classes].argmax(0).numpy() + 1  # label files count from 1 (0 = unlabelled)
    got = np.array(Image.open(f))
    assert (got == expected).mean() > 0.99 and got.min() >= 1 and got.max() <= args.num_classes
    assert json.loads((out / "semseg/meta.json").read_text())["num_classes"] == args.num_classes + 1


# ---------------------------------------------------------------------------------------------- robustness
def test_resume_skips_finished_labels_and_meta_pins_the_labeller(rgb_data, weights, tmp_path):
    out = tmp_path / "out"
    first = _run(_module_args(rgb_data / "train", out, weights, "--max_images", 4))
    assert first["labelled"] == 4
    done = {p: p.stat().st_mtime_ns for p in (out / "depth").rglob("*.png")}
    (out / "depth/boxes/.train_000099.png.x1.tmp").write_bytes(b"partial")  # left by a killed run
    second = _run(_module_args(rgb_data / "train", out, weights))
    assert (second["skipped"], second["labelled"]) == (4, 6)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished labels untouched
    assert not list((out / "depth").rglob("*.tmp")) and len(list((out / "depth").rglob("*.png"))) == 10
    with pytest.raises(ValueError, match="differs in \\['decode', 'depth_scale'\\]"):
        _run(_module_args(rgb_data / "train", out, weights, "--depth_scale", 500))
    third = _run(_module_args(rgb_data / "train", out, weights, "--depth_scale", 500, "--overwrite"))
    assert third["labelled"] == 10 and json.loads((out / "depth/meta.json").read_text())["depth_scale"] == 500


def test_crash_leaves_only_complete_labels(rgb_data, weights, tmp_path, monkeypatch):
    from tools.lib import pseudo_labelers

    calls = {"n": 0}
    original = pseudo_labelers.ModuleLabeller.forward

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(self, x)

    monkeypatch.setattr(pseudo_labelers.ModuleLabeller, "forward", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(_module_args(rgb_data / "train", out, weights))
    written = list((out / "depth").rglob("*.png"))
    assert len(written) == 4 and not list((out / "depth").rglob("*.tmp"))
    assert all(np.array(Image.open(p)).shape == (SIZE, SIZE) for p in written)
    monkeypatch.setattr(pseudo_labelers.ModuleLabeller, "forward", original)
    assert _run(_module_args(rgb_data / "train", out, weights))["labelled"] == 6


def test_unreadable_image_is_reported_and_skipped(rgb_data, weights, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(rgb_data / "val", data)
    (data / "rgb/boxes/broken.png").write_bytes(b"not a png")
    stats = _run(_module_args(data, tmp_path / "out", weights))
    assert stats["unreadable"] == ["boxes/broken.png"] and stats["labelled"] == 2
    assert not (tmp_path / "out/depth/boxes/broken.png").exists()


def test_errors_name_the_missing_piece(rgb_data, weights, tmp_path):
    from utils.config import ConfigError

    with pytest.raises(FileNotFoundError, match="nope.pth' does not exist.*never downloads"):
        _run(["--data_path", rgb_data / "train", "--labeller", "finetuned", "--weights", tmp_path / "nope.pth",
              "--device", "cpu"])
    with pytest.raises(ConfigError, match="must contain the input folder 'rgb/'"):
        _run(["--data_path", tmp_path, "--weights", weights["depth"], "--device", "cpu"])
    with pytest.raises(ValueError, match="unknown torchvision segmentation architecture 'deeplab'"):
        _run(["--data_path", rgb_data / "train", "--task", "semseg", "--labeller", "torchvision", "--arch", "deeplab",
              "--num_classes", 3, "--weights", weights["seg"], "--device", "cpu"])


def test_shards_of_two_ranks_label_every_file_once(rgb_data, weights, tmp_path):
    """The per-rank logic of a 2-process run, in this process (the real torchrun run is the slow test below)."""
    from tools.lib.pseudo_labelers import ModuleLabeller, label_folder

    labeller = ModuleLabeller("tests.test_pseudo_label:TinyDepthNet", str(weights["depth"]), "depth",
                              input_size=SIZE, output_key="depth").eval()
    out = tmp_path / "out/depth"
    runs = [label_folder(labeller, str(rgb_data / "train"), "rgb", str(out), torch.device("cpu"), rank=r, world_size=2,
                         num_workers=0, max_images=9) for r in (0, 1)]
    assert [(r["shard"], r["labelled"]) for r in runs] == [(5, 5), (4, 4)]
    assert len(list(out.rglob("*.png"))) == 9


@pytest.mark.slow
def test_two_processes_label_every_file_exactly_once(rgb_data, weights, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tools/pseudo_label.py", *map(str, _module_args(rgb_data / "train", out, weights, "--num_writers", 2))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout
    assert "[rank 0/2] 10 images" in lines and "[rank 1/2] 10 images" in lines
    assert lines.count("5 for this process, 0 already labelled, 5 to label") == 2
    assert "done: labelled 10 images, 0 already labelled, over 2 process(es)" in lines
    assert len(list((out / "depth").rglob("*.png"))) == 10


@pytest.mark.parametrize("cfg", sorted((ROOT / "cfgs/pseudo_label").glob("*.yaml")), ids=lambda p: p.stem)
def test_configs_parse(cfg):
    from tools import pseudo_label
    from utils.config import parse_args

    args = parse_args(pseudo_label.get_args_parser(), ["-c", str(cfg)], exit_on_error=False)
    assert args.weights and args.task in ("depth", "semseg")
    kw = pseudo_label.labeller_kwargs(args)  # model_kwargs JSON, input size
    assert args.labeller == "finetuned" or kw["input_size"] > 0
