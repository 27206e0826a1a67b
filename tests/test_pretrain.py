"""Pre-training end to end on the synthetic data: step wiring against the published fixture, a short run
against the golden loss curve, exact resume, config handling of run_pretraining_multimae.py."""
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run_pretraining_multimae as script
from utils.config import ConfigError, parse_args
from utils.engine.trainer import Trainer
from utils.data.modalities import build_pretrain_losses
from utils.pretrain.multimae import PerSampleSeed, PretrainStep, validate_pretrain_args
from utils.pretrain.task_balancing import NoWeightingStrategy

GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny_loss.json"

# A tiny but complete configuration: ViT-Ti encoder, rgb/depth/semseg in and out (+ norm_rgb), 32 px.
TINY = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8",
        "--num_encoded_tokens", "12", "--decoder_dim", "64", "--decoder_depth", "0", "--decoder_num_heads", "2",
        "--batch_size", "8", "--epochs", "3", "--warmup_epochs", "1", "--blr", "2e-2", "--standardize_depth",
        "--fp32_output_adapters", "semseg", "--num_workers", "0", "--device", "cpu", "--print_freq", "2",
        "--save_vis_freq", "0", "--save_ckpt_freq", "1", "--deterministic"]


def parse(argv):
    return parse_args(script.get_args_parser(), argv, validate=validate_pretrain_args, exit_on_error=False)


def run(root, out, *extra):
    return script.main(parse([*TINY, "--data_path", str(root / "train"), "--output_dir", str(out), *extra]))


def epoch_log(out):
    return [json.loads(line) for line in (Path(out) / "log.txt").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ step wiring
class _FixtureModel(torch.nn.Module):
    """Returns the published model's predictions and masks for one fixture sample."""

    def __init__(self, sample):
        super().__init__()
        self.sample, self.calls = sample, []

    def forward(self, inputs, **kw):
        self.calls.append((sorted(inputs), kw))
        return self.sample["preds"], self.sample["task_masks"]


def test_step_losses_match_published(fixtures_dir):
    fx = torch.load(fixtures_dir / "public_pretrain.pt", weights_only=True)
    losses = build_pretrain_losses(["rgb", "depth", "semseg"], patch_size=16, extra_norm_pix_loss=True)
    step = PretrainStep(["rgb", "depth", "semseg"], losses, NoWeightingStrategy(), num_encoded_tokens=8,
                        standardize_depth=True, fp32_output_adapters=["semseg"])
    for i, sample in enumerate(fx["samples"]):
        x = {"rgb": fx["inputs"]["rgb"][i:i + 1], "depth": fx["depth_raw"][i:i + 1],
             "semseg": fx["inputs"]["semseg"][i:i + 1]}
        model = _FixtureModel(sample)
        loss, logs = step(model, (x, torch.zeros(1)))
        # depth went through the truncated standardisation before becoming input and target
        assert model.calls[0][0] == ["depth", "rgb", "semseg"]
        assert model.calls[0][1]["fp32_output_adapters"] == ["semseg"]
        assert model.calls[0][1]["num_encoded_tokens"] == 8
        torch.testing.assert_close(step.prepare(x)["depth"], fx["inputs"]["depth"][i:i + 1], atol=1e-5, rtol=1e-5)
        for task, expected in sample["losses"].items():
            assert logs[f"{task}_loss"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6), task
        assert loss.item() == pytest.approx(sum(v.item() for v in sample["losses"].values()), rel=1e-5)
        assert logs["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_on_unmasked_uses_every_pixel(fixtures_dir):
    fx = torch.load(fixtures_dir / "public_pretrain.pt", weights_only=True)
    sample = fx["samples"][0]
    losses = build_pretrain_losses(["rgb"], patch_size=16)
    step = PretrainStep(["rgb", "depth", "semseg"], losses, NoWeightingStrategy(), 8, loss_on_unmasked=True)
    x = {k: v[:1] for k, v in fx["inputs"].items()}
    _, logs = step(_FixtureModel(sample), (x, 0))
    expected = torch.nn.functional.mse_loss(sample["preds"]["rgb"], x["rgb"])
    assert logs["rgb_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_per_sample_seed_is_independent_of_history():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(())

    ds = PerSampleSeed(Noise(), seed=3)
    a = [ds[i].item() for i in range(4)]
    torch.rand(5)  # the global stream is neither used nor advanced by the wrapper
    state = torch.get_rng_state()
    assert [ds[i].item() for i in reversed(range(4))] == a[::-1]
    assert torch.equal(state, torch.get_rng_state())
    ds.set_epoch(1)
    assert ds[0].item() != a[0]


# ------------------------------------------------------------------------------------------ config
def test_config_precedence_and_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_size: 16\nblr: 1e-3\nin_domains: rgb-depth\ndecoder_use_xattn: false\n")
    args = parse(["-c", str(cfg), "--batch_size", "4"])
    assert args.batch_size == 4 and args.blr == 1e-3 and args.in_domains == "rgb-depth"
    assert args.decoder_use_xattn is False and args.epochs == 1600 and args.warmup_epochs == 40
    assert args.opt_betas == [0.9, 0.95] and args.weight_decay == 0.05 and args.amp == "auto"
    bad = tmp_path / "bad.yaml"
    bad.write_text("decoder_dimm: 128\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'decoder_dimm' in .*bad.yaml; did you mean 'decoder_dim'"):
        parse(["-c", str(bad)])
    with pytest.raises(ConfigError) as e:
        parse(["--num_encoded_tokens", "700", "--in_domains", "rgb-dpeth", "--fp32_output_adapters", "xyz"])
    assert "did you mean 'depth'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(["--num_encoded_tokens", "700", "--fp32_output_adapters", "xyz"])
    assert "--num_encoded_tokens 700 must be in 1..588" in str(e.value)
    assert "'xyz' is not an output adapter" in str(e.value)


@pytest.mark.parametrize("name", ["multimae-b_98_rgb+-depth-semseg_1600e", "multimae-b_98_rgb+-depth-semseg_400e"])
def test_published_configs_values(name):
    args = parse(["-c", f"cfgs/pretrain/{name}.yaml"])
    assert (args.in_domains, args.out_domains) == ("rgb-depth-semseg", "rgb-depth-semseg")
    assert args.standardize_depth and args.extra_norm_pix_loss and not args.loss_on_unmasked
    assert (args.decoder_dim, args.decoder_depth, args.num_encoded_tokens, args.num_global_tokens) == (256, 2, 98, 1)
    assert (args.blr, args.warmup_epochs, args.batch_size, args.input_size) == (1e-4, 40, 256, 224)
    assert args.epochs == int(name.split("_")[-1][:-1]) and args.fp32_output_adapters == "semseg"
    assert args.opt == "adamw" and args.min_lr == 0.0 and args.hflip == 0.5 and args.alphas == 1.0


@pytest.mark.parametrize("name", ["multimae-b_98_rgb+-depth-semseg_1600e", "multimae-b_98_rgb+-depth-semseg_400e"])
def test_published_configs_run_with_tiny_sizes(name, synthetic_root, tmp_path):
    """Each released recipe runs unchanged but for paths, sizes (model, image, visible tokens, decoder),
    batch and epochs: one optimizer step on the synthetic scenes."""
    out = tmp_path / "run"
    args = parse(["-c", f"cfgs/pretrain/{name}.yaml", "--data_path", str(synthetic_root / "train"),
                  "--output_dir", str(out), "--model", "pretrain_multimae_tiny", "--input_size", "32",
                  "--patch_size", "8", "--num_encoded_tokens", "12", "--decoder_dim", "64", "--decoder_num_heads", "2",
                  "--batch_size", "2", "--epochs", "1", "--max_steps_per_epoch", "1", "--num_workers", "0",
                  "--device", "cpu", "--save_vis_freq", "0"])
    trainer = script.main(args)
    assert trainer.global_step == 1 and math.isfinite(epoch_log(out)[0]["[Epoch] loss"])


# ------------------------------------------------------------------------------------------ runs
def test_short_run_matches_golden_loss_curve(synthetic_root, tmp_path):
    out = tmp_path / "run"
    trainer = run(synthetic_root, out)
    assert isinstance(trainer, Trainer)
    log = epoch_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    losses = [r["[Epoch] loss"] for r in log]
    assert losses[-1] < 0.8 * losses[0], losses
    keys = ["[Epoch] loss", "[Epoch] rgb_loss", "[Epoch] depth_loss", "[Epoch] semseg_loss", "[Epoch] norm_rgb_loss"]
    curve = {k: [r[k] for r in log] for k in keys}
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"args": TINY, "curve": curve}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == TINY, "the golden curve was made with other arguments; regenerate with UPDATE_GOLDEN=1"
    for k in keys:
        assert curve[k] == pytest.approx(golden["curve"][k], rel=2e-3), k
    # files: resolved config, numbered + last checkpoints with the published keys
    assert (out / "config.yaml").is_file()
    again = parse(["-c", str(out / "config.yaml")])
    assert again.num_encoded_tokens == 12 and again.decoder_dim == 64 and again.standardize_depth
    ck = torch.load(out / "checkpoint-2.pth", weights_only=True)
    assert {"model", "optimizer", "epoch", "scaler", "args", "loss_balancer"} <= set(ck)
    assert ck["epoch"] == 2 and ck["args"]["lr"] == pytest.approx(2e-2 * 8 / 256)
    assert os.path.realpath(out / "checkpoint-last.pth") == os.path.realpath(out / "checkpoint-2.pth")


def test_resume_gives_identical_parameters(synthetic_root, tmp_path, monkeypatch):
    extra = ["--task_balancer", "uncertainty", "--save_vis_freq", "1", "--num_vis", "2"]
    run(synthetic_root, tmp_path / "full", *extra)

    original = Trainer.train_one_epoch

    def killed_at_epoch_2(self, loader, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, loader, epoch)

    monkeypatch.setattr(Trainer, "train_one_epoch", killed_at_epoch_2)
    with pytest.raises(SystemExit) as aborted:  # the runner turns an interrupt into exit 130
        run(synthetic_root, tmp_path / "split", *extra)
    assert aborted.value.code == 130
    monkeypatch.setattr(Trainer, "train_one_epoch", original)
    assert not (tmp_path / "split" / "checkpoint-2.pth").exists()
    trainer = run(synthetic_root, tmp_path / "split", *extra)  # auto-resumes from checkpoint-last.pth
    assert trainer.start_epoch == 2

    a = torch.load(tmp_path / "full" / "checkpoint-2.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint-2.pth", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["loss_balancer"]["log_vars"], b["loss_balancer"]["log_vars"])
    assert a["loss_balancer"]["log_vars"].shape == (4,)  # rgb, depth, semseg and norm_rgb
    assert not torch.equal(a["loss_balancer"]["log_vars"], torch.zeros(4))
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [r["[Epoch] loss"] for r in epoch_log(tmp_path / "full")] == \
        [r["[Epoch] loss"] for r in epoch_log(tmp_path / "split")]
    assert sorted(p.name for p in (tmp_path / "split" / "vis").iterdir()) == \
        ["reconstruction_e0000.png", "reconstruction_e0001.png", "reconstruction_e0002.png"]


def _model_state(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(synthetic_root, tmp_path):
    """2 x batch 4 under torchrun (gloo) == 1 x batch 8: same samples per global step (sampler split), same
    augmentation (seeded per sample), every token visible and the loss over all pixels (so the per-rank
    random masks do not matter), gradients averaged by DDP."""
    import subprocess
    import sys

    common = ["--num_encoded_tokens", "48", "--loss_on_unmasked", "--epochs", "2", "--no_deterministic",
              "--data_path", str(synthetic_root / "train")]
    run(synthetic_root, tmp_path / "single", *common)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "run_pretraining_multimae.py", *TINY, *common, "--batch_size", "4", "--output_dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1/2" in proc.stdout + proc.stderr and "backend gloo" in proc.stdout + proc.stderr
    single, ddp = epoch_log(tmp_path / "single"), epoch_log(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp):
        assert b["[Epoch] loss"] == pytest.approx(a["[Epoch] loss"], rel=1e-4)
        assert b["[Epoch] lr"] == pytest.approx(a["[Epoch] lr"], rel=1e-9)  # lr = blr * 4 * 2 / 256
    a, b = _model_state(tmp_path / "single" / "checkpoint-1.pth"), _model_state(tmp_path / "ddp" / "checkpoint-1.pth")
    start = _model_state(tmp_path / "single" / "checkpoint-0.pth")
    # Adam turns rounding noise in (mathematically zero) key-bias gradients into updates of up to lr, so
    # compare the whole parameter vector relative to how far training moved it (measured: 7e-4).
    diff = math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in a))
    moved = math.sqrt(sum(((a[k] - start[k]) ** 2).sum().item() for k in a))
    assert moved > 0.1 and diff / moved < 1e-2, (diff, moved)


@pytest.mark.slow
def test_published_vitb_config_runs_unchanged(synthetic_root, tmp_path):
    """The released recipe, overriding only paths, batch size and epochs (+ a step cap): ViT-B, 224 px,
    98 visible tokens, four decoders, fp32 semseg decoder, uncapped warm-up of 40 epochs."""
    out = tmp_path / "vitb"
    args = parse(["-c", "cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml",
                  "--data_path", str(synthetic_root / "train"), "--output_dir", str(out), "--batch_size", "2",
                  "--epochs", "1", "--max_steps_per_epoch", "2"])
    trainer = script.main(args)
    assert trainer.global_step == 2
    # the 40-epoch warm-up is cut off after the 2 steps of this run (lr = 1e-4 * 2 / 256)
    assert list(trainer.lr_schedule) == pytest.approx(list(np.linspace(1e-6, 1e-4 * 2 / 256, 80)[:2]))
    (record,) = epoch_log(out)
    assert math.isfinite(record["[Epoch] loss"]) and record["n_parameters"] > 9e7
    ck = torch.load(out / "checkpoint-0.pth", weights_only=True)
    keys = json.loads((Path(__file__).parent / "fixtures" / "vitb_keys.json").read_text())["multimae"]
    assert {k: list(v.shape) for k, v in ck["model"].items()} == {k: list(v) for k, v in keys.items()}
    assert (out / "vis" / "reconstruction_e0000.png").is_file()


def test_wandb_offline_smoke(synthetic_root, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(synthetic_root, tmp_path / "out", "--epochs", "1", "--log_wandb", "--wandb_project", "multimae-test",
        "--save_vis_freq", "1", "--num_vis", "2")
    deadline = time.time() + 30  # the wandb service process may still be flushing after finish()
    while time.time() < deadline:
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        if len(runs) == 1 and list(runs[0].rglob("*.wandb")) and list(
                runs[0].rglob("files/media/images/reconstructions*.png")):
            break
        time.sleep(0.2)
    assert len(runs) == 1
    assert list(runs[0].rglob("*.wandb")), "no run data written"
    assert list(runs[0].rglob("files/media/images/reconstructions*.png")), "reconstruction picture not logged"


def test_demo_config_builds_the_finetuning_compatible_tiny_model():
    """cfgs/pretrain/demo.yaml (make demo) must stay loadable by the synthetic fine-tuning configs:
    ViT-Ti (12 blocks, 192 wide), patch 16, rgb/depth/semseg in and out."""
    from utils.pretrain.multimae import build_pretrain_model

    args = parse(["-c", "cfgs/pretrain/demo.yaml"])
    assert args.model == "pretrain_multimae_tiny" and args.patch_size == 16
    assert args.in_domains == args.out_domains == "rgb-depth-semseg" and args.extra_norm_pix_loss
    assert args.encoder_depth is None and args.encoder_dim is None
    model = build_pretrain_model(args)
    assert model.get_num_layers() == 12 and model.global_tokens.shape == (1, 1, 192)
    assert sorted(model.output_adapters) == ["depth", "norm_rgb", "rgb", "semseg"]
