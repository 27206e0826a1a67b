"""tools/visualize.py on a tiny checkpoint pre-trained here for two steps by run_pretraining_multimae.py."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tools import visualize
from utils.checkpoint import load_checkpoint
from utils.data.synthetic import make_synthetic_dataset

SIZE, PATCH = 64, 16
N_TOK = (SIZE // PATCH) ** 2


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vis")
    make_synthetic_dataset(str(tmp / "data"), num_train=8, num_val=4, image_size=SIZE, seed=3)
    import run_pretraining_multimae
    from utils.config import parse_args
    from utils.pretrain.multimae import validate_pretrain_args

    argv = ["--model", "pretrain_multimae_tiny", "--input_size", str(SIZE), "--num_encoded_tokens", "12",
            "--batch_size", "4", "--epochs", "1", "--decoder_dim", "32", "--decoder_depth", "1",
            "--decoder_num_heads", "4", "--data_path", str(tmp / "data/train"), "--output_dir", str(tmp / "run"),
            "--device", "cpu", "--num_workers", "0", "--save_vis_freq", "0", "--warmup_epochs", "0",
            "--standardize_depth"]
    run_pretraining_multimae.main(parse_args(run_pretraining_multimae.get_args_parser(), argv,
                                             validate=validate_pretrain_args, exit_on_error=False))
    return tmp, tmp / "run" / "checkpoint-last.pth"


def _demo(ckpt, data_path, argv=()):
    args = visualize.get_args_parser().parse_args(["--checkpoint", str(ckpt), "--data_path", str(data_path),
                                                   "--device", "cpu", *argv])
    model, cfg = visualize.load_pretrained_multimae(args.checkpoint, torch.device("cpu"))
    domains = ["rgb", "depth", "semseg"]
    samples = visualize.collect_samples(args, domains)
    batch, present = visualize.load_batch(samples, cfg, domains)
    names = [Path(s["rgb"]).stem for s in samples]
    return visualize.Demo(model, cfg, batch, present, names, args, torch.device("cpu"))


def test_cli_writes_every_figure(pretrained, tmp_path):
    tmp, ckpt = pretrained
    paths = visualize.main(["--checkpoint", str(ckpt), "--data_path", str(tmp / "data/val"), "--device", "cpu",
                            "--output_dir", str(tmp_path), "--num_images", "3", "--num_visible", "10"])
    assert sorted(paths) == ["from_depth", "from_rgb", "from_semseg", "hue_edit", "masked"]
    tile = 128  # 64 px images drawn at 2x
    widths = {"masked": 9, "from_rgb": 5, "hue_edit": 7}  # tiles per row
    for name, path in paths.items():
        img = np.array(Image.open(path))
        assert img.shape[0] == 14 + 3 * (tile + 2), name  # header + 3 rows
        if name in widths:
            assert img.shape[1] > widths[name] * tile, name
        assert img.std() > 10, name  # not blank


def test_masks_counts_and_pasted_visible_patches(pretrained):
    tmp, ckpt = pretrained
    demo = _demo(ckpt, tmp / "data/val", ["--visible_per_modality", "rgb=5", "depth=3"])
    counts = visualize.parse_counts(demo.args.visible_per_modality, demo.inputs, demo.present, N_TOK)
    assert counts == {"rgb": 5, "depth": 3}
    masks = visualize.random_masks(demo.rng, counts, {t: N_TOK for t in demo.inputs})
    assert [(m == 0).sum().item() for m in masks.values()] == [5, 3, 0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = visualize.visible_counts(rng, 13, [1.0, 0.5, 2.0], [N_TOK, N_TOK, 0])
        assert sum(c) == 13 and c[2] == 0 and all(0 <= v <= N_TOK for v in c)
    # prediction tiles show the visible input patches unchanged
    x = demo.batch["rgb"][0]
    pred = torch.randn_like(x)
    masked, shown, ref = demo.painter.tiles("rgb", x, pred, masks["rgb"], True)
    vis = (masks["rgb"] == 0).reshape(4, 4).repeat_interleave(32, 0).repeat_interleave(32, 1).numpy()
    assert (shown[vis] == ref[vis]).all() and (shown[~vis] != ref[~vis]).any()
    assert (masked[~vis] == visualize.GREY).all()


def test_single_modality_prediction_ignores_hidden_inputs(pretrained):
    tmp, ckpt = pretrained
    demo = _demo(ckpt, tmp / "data/val")
    B = len(demo.names)
    masks = {t: torch.full((B, N_TOK), int(t != "depth"), dtype=torch.long) for t in demo.inputs}
    a = demo.predict(demo.batch, masks)
    other = {**demo.batch, "rgb": torch.randn_like(demo.batch["rgb"]),
             "semseg": torch.randint_like(demo.batch["semseg"], 5)}
    b = demo.predict(other, masks)
    assert torch.allclose(a["rgb"], b["rgb"], atol=1e-5) and torch.allclose(a["semseg"], b["semseg"], atol=1e-5)
    c = demo.predict({**demo.batch, "depth": demo.batch["depth"].flip(-1)}, masks)
    assert not torch.allclose(a["rgb"], c["rgb"], atol=1e-3)


def test_config_inferred_from_bare_weights_gives_the_same_model(pretrained, tmp_path):
    tmp, ckpt = pretrained
    stored = load_checkpoint(ckpt)
    inferred = visualize.config_from_state_dict(stored["model"])
    for k, v in inferred.items():
        assert stored["args"][k] == v, k
    save_file({k: v.contiguous() for k, v in stored["model"].items()}, str(tmp_path / "bare.safetensors"))
    m1, _ = visualize.load_pretrained_multimae(str(ckpt), torch.device("cpu"))
    m2, cfg2 = visualize.load_pretrained_multimae(str(tmp_path / "bare.safetensors"), torch.device("cpu"),
                                                  {"decoder_num_heads": 4})
    x = {"rgb": torch.randn(1, 3, SIZE, SIZE), "depth": torch.randn(1, 1, SIZE, SIZE),
         "semseg": torch.randint(0, 6, (1, SIZE // 4, SIZE // 4))}
    masks = {t: (torch.arange(N_TOK) % 3 != 0).long()[None] for t in x}
    with torch.no_grad():
        p1, _ = m1(x, task_masks=masks)
        p2, _ = m2(x, task_masks=masks)
    assert all(torch.allclose(p1[k], p2[k], atol=1e-6) for k in p1)


def test_hue_edit_changes_only_the_chosen_patch(pretrained, tmp_path):
    tmp, ckpt = pretrained
    files = sorted((tmp / "data/val/rgb").rglob("*.png"))[:2]
    depth = tmp / "data/val/depth"
    demo = _demo(ckpt, "", ["--images", *map(str, files), "--depth", str(depth), "--hue_patch", "1", "2"])
    assert demo.present == {"rgb": True, "depth": True, "semseg": False}
    fig = demo.hue()
    assert fig.shape[0] == 14 + 2 * (128 + 2)
    # the edit: only patch (1, 2) changes; its brightness stays, its hue turns by the shift
    rgb = demo.batch["rgb"][0]
    out = visualize.recolour_patch(rgb, (1, 2), PATCH, [0.0, 0.33], demo.painter.mean, demo.painter.std)
    assert torch.equal(out[0], rgb)
    changed = (out[1] - rgb).abs().amax(0) > 1e-4
    assert changed[32:48, 16:32].any() and not changed[:32].any() and not changed[48:].any()
    assert not changed[:, :16].any() and not changed[:, 32:].any()
    std, mean = torch.tensor(demo.painter.std).view(3, 1, 1), torch.tensor(demo.painter.mean).view(3, 1, 1)
    un = lambda t: t * std + mean  # noqa: E731
    a, b = un(rgb)[:, 32:48, 16:32].clamp(0, 1), un(out[1])[:, 32:48, 16:32]
    assert torch.allclose(a.amax(0), b.amax(0), atol=1e-4)  # HSV value kept


def test_rgb_only_inputs_and_errors(pretrained, tmp_path, capsys):
    tmp, ckpt = pretrained
    rgb = sorted((tmp / "data/val/rgb").rglob("*.png"))[:2]
    paths = visualize.main(["--checkpoint", str(ckpt), "--images", *map(str, rgb), "--device", "cpu",
                            "--output_dir", str(tmp_path)])
    assert sorted(paths) == ["from_rgb", "masked"]
    assert "hue edit skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="depth has no input files"):
        visualize.main(["--checkpoint", str(ckpt), "--images", str(rgb[0]), "--device", "cpu",
                        "--output_dir", str(tmp_path), "--visible_per_modality", "depth=3"])
    sd = {k: v for k, v in load_checkpoint(ckpt)["model"].items() if not k.startswith("output_adapters.")}
    torch.save({"model": sd}, tmp_path / "multivit.pth")
    with pytest.raises(SystemExit, match="has no decoders"):
        visualize.main(["--checkpoint", str(tmp_path / "multivit.pth"), "--images", str(rgb[0]), "--device", "cpu"])
