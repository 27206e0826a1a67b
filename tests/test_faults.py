"""Faults, end to end: real processes of run_pretraining_multimae.py (and a fine-tuning script) on real files.

Preemption (SIGTERM to the whole process group, a second signal, exit code 75, automatic resume), SIGKILL
after a --save_every_steps checkpoint, exact resume (bit-identical parameters and optimizer state), a full
disk while writing a checkpoint, NaN losses (stop naming step/losses/files, or --skip_nonfinite), bad
samples (--on_bad_sample error|skip), bad configurations, untrusted and mismatched checkpoints.

Faults that cannot be produced from outside a process (a full disk, a NaN batch) are injected by
tests/fault_inject.py, which runs the unchanged script. Smaller variants run in-process on real files.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}

# Tiny MultiMAE, rgb/depth/semseg in and out (+ norm_rgb), 32 px, uncertainty balancing; 24 training
# images at batch 4 -> 6 steps per epoch, 18 steps in all.
TINY = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8", "--num_encoded_tokens", "12",
        "--decoder_dim", "64", "--decoder_depth", "0", "--decoder_num_heads", "2", "--batch_size", "4", "--epochs", "3",
        "--warmup_epochs", "1", "--blr", "2e-2", "--standardize_depth", "--fp32_output_adapters", "semseg",
        "--task_balancer", "uncertainty", "--num_workers", "0", "--device", "cpu", "--print_freq", "1",
        "--save_vis_freq", "0", "--save_ckpt_freq", "1", "--deterministic"]
STEPS = 6


# ---------------------------------------------------------------------------------------------- helpers
class Proc:
    """A script run in its own process group, its combined output read line by line."""

    def __init__(self, argv: list[str], script: str = "run_pretraining_multimae.py", inject: list[str] | None = None,
                 timeout: float = 300):
        cmd = [sys.executable]
        if inject is not None:
            cmd += [str(REPO / "tests" / "fault_inject.py"), *inject, "--"]
        self.p = subprocess.Popen(cmd + [script, *argv], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._timer = threading.Timer(timeout, self.signal, args=(signal.SIGKILL,))
        self._timer.start()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)  # the whole group, data-loader workers included, as SLURM does
        except ProcessLookupError:
            pass

    def wait_for(self, pattern: str) -> str:
        for line in self.p.stdout:
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"'{pattern}' never printed:\n{self.output[-4000:]}")

    def finish(self) -> int:
        self.lines.extend(self.p.stdout)
        code = self.p.wait()
        self._timer.cancel()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def run(argv: list[str], **kw) -> tuple[int, str]:
    proc = Proc(argv, **kw)
    code = proc.finish()
    return code, proc.output


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bit-identical model, balancer and optimizer state."""
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["loss_balancer"]["log_vars"], b["loss_balancer"]["log_vars"])
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in ("exp_avg", "exp_avg_sq", "step")), ka
    assert a["global_step"] == b["global_step"]


def epoch_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from utils.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(str(root), num_train=24, num_val=2, image_size=32, seed=0)
    return root / "train"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("reference")
    code, text = run([*TINY, "--data_path", str(data), "--output_dir", str(out)])
    assert code == 0, text[-4000:]
    assert [r["epoch"] for r in epoch_log(out)] == [0, 1, 2]
    return out


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "--data_path", str(data), "--output_dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------- preemption
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_bit_identical(data, reference, tmp_path):
    out = tmp_path / "run"
    # one data-loader worker: SLURM signals the whole process group, workers included
    proc = Proc(argv(data, out, "--num_workers", "1"))
    proc.wait_for(r"Epoch: \[1\] \[2/6\]")
    proc.signal(signal.SIGTERM)
    proc.wait_for(r"\[stop\] received SIGTERM")
    proc.signal(signal.SIGUSR1)  # a second signal while stopping/saving changes nothing
    code = proc.finish()
    assert code == 75, proc.output[-4000:]
    assert "received SIGUSR1 again" in proc.output
    assert re.search(r"Stopped at epoch 1, step \d/6 \(global step \d+\) \(received SIGTERM\); checkpoint "
                     r"\S*checkpoint-last\.pth written", proc.output), proc.output[-3000:]
    ck = load(out / "checkpoint-last.pth")
    pos = ck["data_position"]
    assert pos["epoch"] == 1 and 3 <= pos["step"] < STEPS and ck["epoch"] == 0  # mid-epoch, not at a boundary
    assert ck["global_step"] == STEPS + pos["step"]
    assert not list(out.glob(".*.tmp"))

    code, text = run(argv(data, out))  # same output_dir: resumes automatically
    assert code == 0, text[-4000:]
    assert f"continuing at epoch 1, step {pos['step']}/6" in text
    assert_same_training_state(load(reference / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))
    ref_log, log = epoch_log(reference), epoch_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for a, b in zip(ref_log, log):  # the epoch averages survive the interruption too
        assert b["[Epoch] loss"] == pytest.approx(a["[Epoch] loss"], rel=1e-12)


def test_sigkill_after_periodic_checkpoint_loses_only_later_steps(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = Proc(argv(data, out, "--save_every_steps", "4"))
    proc.wait_for(r"Saved .*checkpoint-last\.pth \(epoch 1, step 2/6\)")  # global step 8
    proc.signal(signal.SIGKILL)
    assert proc.finish() == -signal.SIGKILL
    ck = load(out / "checkpoint-last.pth")
    assert ck["global_step"] >= 8 and ck["data_position"]["epoch"] >= 1

    code, text = run(argv(data, out, "--save_every_steps", "4", "--keep_last", "1"))
    assert code == 0, text[-4000:]
    assert "Resumed from" in text
    assert_same_training_state(load(reference / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2.pth", "checkpoint-last.pth"]


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_while_saving_keeps_previous_checkpoint(data, reference, tmp_path):
    out = tmp_path / "run"
    code, text = run(argv(data, out), inject=["--enospc_at_save", "2"])  # the epoch-1 checkpoint
    assert code != 0 and "No space left on device" in text, text[-4000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-0.pth", "checkpoint-last.pth"]
    assert not list(out.glob(".*.tmp")), "temporary file left behind"
    assert_same_training_state(load(reference / "checkpoint-0.pth"), load(out / "checkpoint-last.pth"))
    assert [r["epoch"] for r in epoch_log(out)] == [0]  # log.txt intact

    code, text = run(argv(data, out))
    assert code == 0, text[-4000:]
    assert_same_training_state(load(reference / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))


# ---------------------------------------------------------------------------------------------- NaN
def test_nonfinite_loss_stops_naming_step_losses_and_files(data, reference, tmp_path):
    out = tmp_path / "run"
    code, text = run(argv(data, out), inject=["--nan_at_call", "8"])  # epoch 1, step 2
    assert code == 1, text[-4000:]
    assert "non-finite loss nan at epoch 1, step 2/6 (global step 8); stopping without saving" in text
    assert re.search(r"rgb_loss=nan.*depth_loss=", text)
    files = re.findall(r"#\d+: rgb: (\S+\.png), depth: \S+, semseg: \S+", text)
    assert len(files) == 4 and all(Path(f.rstrip(",")).is_file() for f in files)
    # nothing was saved over the last good checkpoint (epoch 0)
    assert_same_training_state(load(reference / "checkpoint-0.pth"), load(out / "checkpoint-last.pth"))


def test_skip_nonfinite_skips_and_counts(data, tmp_path):
    out = tmp_path / "run"
    code, text = run(argv(data, out, "--skip_nonfinite", "1", "--epochs", "2"), inject=["--nan_at_call", "8"])
    assert code == 0, text[-4000:]
    assert "Skipped non-finite step (1/1 allowed, no update): epoch 1, step 2/6" in text
    log = epoch_log(out)
    assert [r["[Epoch] nonfinite_skipped"] for r in log] == [0, 1]
    assert all(np.isfinite(r["[Epoch] loss"]) for r in log)
    assert all(torch.isfinite(v).all() for v in load(out / "checkpoint-1.pth")["model"].values())


# ---------------------------------------------------------------------------------------------- bad samples
def _corrupt(root: Path) -> dict[str, str]:
    """One fault per sample; returns {file: expected message}."""
    rgb = sorted((root / "rgb").rglob("*.png"))
    name = lambda i, mod: root / mod / rgb[i].parent.name / rgb[i].name  # noqa: E731
    faults = {}
    p = name(1, "rgb")
    p.write_bytes(p.read_bytes()[:200])
    faults[str(p)] = "cannot read rgb file"
    p = name(5, "depth")
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(p)
    faults[str(p)] = "is an 8-bit image; expected a 16-bit"
    p = name(9, "semseg")
    Image.fromarray(np.full((32, 32), 200, np.uint8)).save(p)
    faults[str(p)] = r"class id\(s\) \[200\] out of range; expected ids 0..132"
    p = name(13, "rgb")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(p)
    faults[str(p)] = "different sizes"
    return faults


@pytest.fixture
def bad_data(data, tmp_path) -> tuple[Path, dict[str, str]]:
    import shutil

    root = tmp_path / "bad" / "train"
    shutil.copytree(data, root)
    return root, _corrupt(root)


def test_bad_samples_skipped_logged_and_counted(bad_data, tmp_path):
    root, faults = bad_data
    out = tmp_path / "run"
    code, text = run(argv(root, out, "--on_bad_sample", "skip", "--epochs", "1"))
    assert code == 0, text[-4000:]
    skipped = [line for line in text.splitlines() if line.startswith("[bad sample] skipped sample")]
    for path, message in faults.items():
        assert sum(path in line and bool(re.search(message, line)) for line in skipped) == 1, (path, skipped)
    assert "Epoch 0: 4 bad sample(s) skipped" in text
    assert epoch_log(out)[0]["[Epoch] bad_samples"] == 4


def test_bad_sample_stops_naming_the_file(bad_data, tmp_path):
    root, faults = bad_data
    code, text = run(argv(root, tmp_path / "run", "--epochs", "1"))
    assert code == 1
    hit = [p for p in faults if p in text]
    assert len(hit) == 1 and re.search(faults[hit[0]], text), text[-3000:]


def test_missing_modality_file_fails_at_start_up(data, tmp_path):
    import shutil

    root = tmp_path / "d" / "train"
    shutil.copytree(data, root)
    victim = sorted((root / "depth").rglob("*.png"))[3]
    victim.unlink()
    code, text = run(argv(root, tmp_path / "run"))
    assert code == 2 and not (tmp_path / "run").exists()  # a start-up check, like a configuration error
    stem = str(victim.with_suffix(""))
    assert f"1 depth file(s) missing, e.g. '{stem}.*'" in text and "Epoch: [0]" not in text


def test_each_bad_input_error_names_file_and_expectation(bad_data, tmp_path):
    """In-process, every fault at load time, and the start-up errors of empty folders."""
    from utils.data.datasets import BadSampleError, MultiModalImageFolder

    root, faults = bad_data
    ds = MultiModalImageFolder(str(root), ["rgb", "depth", "semseg"], label_ranges={"semseg": (133, ())})
    seen = {}
    for i in range(len(ds)):
        try:
            ds[i]
        except BadSampleError as err:
            seen[i] = str(err)
    assert len(seen) == 4
    for path, message in faults.items():
        assert any(path in m and re.search(message, m) for m in seen.values()), (path, seen)
    # target-only labels may carry the ignore index, inputs may not
    ok = MultiModalImageFolder(str(root), ["rgb", "semseg"], label_ranges={"semseg": (133, (255,))})
    semseg = next(p for p in faults if "/semseg/" in p)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(semseg)
    idx = next(i for i in range(len(ok)) if ok.samples_paths(i)["semseg"] == semseg)
    assert ok[idx][0]["semseg"].max() == 255
    empty = tmp_path / "empty"
    for m in ("rgb", "depth"):
        (empty / m / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no image files .* modality 'rgb' under '.*empty/rgb/<class>/'"):
        MultiModalImageFolder(str(empty), ["rgb", "depth"])


# ---------------------------------------------------------------------------------------------- config
def test_bad_config_fails_before_anything_starts(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("warmup_epoch: 3\nbatch_size: eight\n")
    out = tmp_path / "never"
    code, text = run(["-c", str(cfg), "--output_dir", str(out), "--num_encoded_tokens", "1000", "--input_size", "64",
                      "--keep_last", "0", "--resume", str(tmp_path / "missing.pth"), "--decoder_dim", "30",
                      "--data_path", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.startswith("  - ")]
    expected = [r"unknown config key 'warmup_epoch' in .*c\.yaml; did you mean 'warmup_epochs'\?",
                r"config key 'batch_size' in .*c\.yaml: expected int, got 'eight'",
                r"--num_encoded_tokens 1000 must be in 1\.\.48",
                r"--keep_last must be >= 1, got 0",
                r"--resume: checkpoint file not found: '.*missing\.pth'",
                r"--decoder_dim 30 is not divisible by --decoder_num_heads 8",
                r"--data_path: folder not found: '.*nowhere'"]
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in lines) == 1, (pattern, text)
    assert len(lines) == len(expected), text
    assert not out.exists() and "distributed init" not in text and "Data:" not in text


def test_config_combinations_in_process(data):
    import run_finetuning_depth
    import run_pretraining_multimae
    from utils.config import ConfigError, parse_args
    from utils.finetune.depth import validate_regression_args
    from utils.pretrain.multimae import validate_pretrain_args
    from utils.config.checks import check_pretrain_args

    def errors(parser, argv, validate):
        with pytest.raises(ConfigError) as info:
            parse_args(parser, argv, validate=validate, exit_on_error=False)
        return info.value.errors

    pre = run_pretraining_multimae.get_args_parser()
    checks = [validate_pretrain_args, check_pretrain_args]
    errs = errors(pre, ["--out_domains", "rgb-normals", "--data_path", str(data)], checks)
    assert any("unknown modality 'normals'" in e for e in errs), errs
    errs = errors(pre, ["--model", "pretrain_multimae_tiniest", "--patch_size", "6", "--input_size", "36",
                        "--data_path", str(data)], checks)
    assert any("'pretrain_multimae_tiniest' is not a registered model; did you mean 'pretrain_multimae_tiny'" in e
               for e in errs), errs
    assert any("--patch_size 6 is not divisible by the stride level 4 of 'semseg'" in e for e in errs), errs
    dep = run_finetuning_depth.get_args_parser()
    errs = errors(dep, ["--in_domains", "rgb", "--decoder_main_tasks", "rgb-depth"], validate_regression_args)
    assert any("--decoder_main_tasks: unknown value 'depth'" in e for e in errs), errs


# ---------------------------------------------------------------------------------------------- checkpoints
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_by_resume(data, tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model": {}, "args": _Evil(str(marker))}, evil)
    code, text = run(argv(data, tmp_path / "run", "--resume", str(evil)))
    assert code == 1 and "refusing to load checkpoint" in text and str(evil) in text, text[-3000:]
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_checkpoint_is_refused_by_finetune(data, tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"model": _Evil(str(marker))}, evil)
    code, text = run(["--model", "multivit_tiny", "--input_size", "32", "--patch_size", "8", "--finetune", str(evil),
                      "--data_path", str(data), "--eval_data_path", str(data), "--nb_classes", "4",
                      "--batch_size", "4", "--epochs", "1", "--device", "cpu", "--num_workers", "0"],
                     script="run_finetuning_cls.py")
    assert code == 1 and str(evil) in text and "weights_only" in text, text[-3000:]
    assert not marker.exists()


def test_published_format_checkpoint_resumes(data, reference, tmp_path):
    """The released .pth files pickle an argparse.Namespace under 'args': allowed, nothing else is."""
    import argparse

    ck = load(reference / "checkpoint-1.pth")
    published = {k: ck[k] for k in ("model", "optimizer", "epoch", "scaler", "loss_balancer")}
    published["args"] = argparse.Namespace(**ck["args"])
    path = tmp_path / "published.pth"
    torch.save(published, path)
    out = tmp_path / "run"
    code, text = run(argv(data, out, "--resume", str(path)))
    assert code == 0 and "continuing at epoch 2" in text, text[-3000:]
    # only the RNG state was not in the published file: same weights after the resume, training went on
    assert load(out / "checkpoint-2.pth")["global_step"] == 3 * STEPS


def test_shape_mismatch_names_key_shapes_and_cause(reference, data, tmp_path):
    code, text = run(argv(data, tmp_path / "run", "--input_size", "48", "--resume",
                          str(reference / "checkpoint-0.pth")))
    assert code == 1
    assert re.search(r"shape mismatch for 'input_adapters\.rgb\.pos_emb': checkpoint \[1, 192, 4, 4\] vs model "
                     r"\[1, 192, 6, 6\]; likely cause: other image size or patch size", text), text[-3000:]


# ---------------------------------------------------------------------------------------------- in-process
def test_second_signal_during_save_does_not_interrupt_it(tmp_path):
    """The stop handler only counts: a SIGTERM arriving inside the checkpoint write leaves a complete file."""
    from test_engine import _trainer

    import utils.engine.checkpointing as engine  # where the trainer's checkpoint writes happen
    from utils.engine.preemption import PREEMPTED_EXIT_CODE, Preempted

    trainer, loader = _trainer(tmp_path, epochs=2)
    real_save = engine.save_checkpoint
    saves = []

    def save_with_signal(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while "saving"
        saves.append(a[1])
        return real_save(*a, **kw)

    inner = trainer.step_fn
    calls = {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            engine.save_checkpoint = save_with_signal
        return inner(model, batch)

    trainer.step_fn = step
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Preempted) as info:
            trainer.fit(loader)
    finally:
        engine.save_checkpoint = real_save
    assert info.value.code == PREEMPTED_EXIT_CODE == 75
    assert trainer.stop is None and signal.getsignal(signal.SIGTERM) is handler  # handlers restored
    assert saves == ["last"]
    ck = load(tmp_path / "checkpoint-last.pth")
    assert ck["data_position"] == {"epoch": 0, "step": 3, "steps_per_epoch": 8, "update_freq": 1}


@pytest.mark.parametrize("update_freq", [1, 2])
def test_mid_epoch_resume_in_process_with_ema_and_accumulation(tmp_path, update_freq):
    from test_engine import _state, _trainer

    from utils.engine.preemption import Preempted

    kw = dict(epochs=3, balancer=True, ema=True, update_freq=update_freq, batch_size=4)
    full, loader = _trainer(tmp_path / "full", **kw)
    full.fit(loader)

    first, loader = _trainer(tmp_path / "split", **kw)
    inner, calls = first.step_fn, {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == 20:  # 16 batches per epoch: inside epoch 1
            first.stop.request("test")
        return inner(model, batch)

    first.step_fn = step
    with pytest.raises(Preempted):
        first.fit(loader)
    torch.manual_seed(4321)
    second, loader = _trainer(tmp_path / "split", seed=7, **kw)
    assert second.resume(str(tmp_path / "split" / "checkpoint-last.pth"))
    assert second.start_epoch == 1 and second.start_step > 0
    second.fit(loader)
    a, b = _state(full), _state(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_skip_nonfinite_makes_no_update_in_process(tmp_path):
    from test_engine import _trainer

    from utils.engine.trainer import NonFiniteLossError

    trainer, loader = _trainer(tmp_path, epochs=1, skip_nonfinite=1)
    inner, calls, params = trainer.step_fn, {"n": 0}, {}

    def step(model, batch):
        calls["n"] += 1
        params[calls["n"]] = [p.detach().clone() for p in model.parameters()]
        loss, logs = inner(model, batch)
        if calls["n"] in (3, 5):
            loss = loss * float("inf")
        return loss, logs

    trainer.step_fn = step
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite steps, more than --skip_nonfinite 1; stopping"):
        trainer.fit(loader)
    assert all(torch.equal(a, b) for a, b in zip(params[3], params[4]))  # step 3: no update at all
    assert not any(torch.equal(a, b) for a, b in zip(params[4], params[5]))  # step 4 trained normally
    assert trainer.nonfinite_skipped == 2 and not any(tmp_path.glob("checkpoint*"))


@pytest.mark.slow
def test_torchrun_sigterm_all_ranks_stop_together_and_resume_exactly(data, tmp_path):
    """2 processes (gloo): every rank stops at the same step (no hang), rank 0 saves, the resumed run ends
    bit-identical to an uninterrupted 2-process run."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run_pretraining_multimae.py"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, text = run([*launcher[1:], *argv(data, ref, "--batch_size", "2")], script=launcher[0])
    assert code == 0, text[-4000:]
    proc = Proc([*launcher[1:], *argv(data, out, "--batch_size", "2")], script=launcher[0])
    proc.wait_for(r"Epoch: \[1\] \[2/6\]")
    proc.signal(signal.SIGTERM)  # torchrun and both ranks, as on a SLURM node
    code = proc.finish()
    assert code != 0 and "Stopped at epoch 1, step" in proc.output, proc.output[-4000:]
    assert re.search(r"exitcode\s*:\s*75", proc.output) or "exit code 75" in proc.output
    assert load(out / "checkpoint-last.pth")["data_position"]["epoch"] == 1
    code, text = run([*launcher[1:], *argv(data, out, "--batch_size", "2")], script=launcher[0])
    assert code == 0, text[-4000:]
    assert_same_training_state(load(ref / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))


def test_resume_from_safetensors_and_untrusted_formats_in_process(tmp_path):
    """``--resume`` of a .safetensors file sets the weights; a file without weights is named in the error."""
    from safetensors.torch import save_file
    from test_engine import _trainer

    from utils.checkpoint import CheckpointError

    src, _ = _trainer(seed=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    trainer, _ = _trainer(seed=4)
    assert trainer.resume(str(path)) and trainer.start_epoch == 0
    assert all(torch.equal(a, b) for a, b in zip(src.model.state_dict().values(), trainer.model.state_dict().values()))
    torch.save({"epoch": 3, "args": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match=r"empty\.pth has no 'model' entry"):
        trainer.resume(str(tmp_path / "empty.pth"))
