"""Signals and cluster faults on real processes: the launcher's exit code, a stopped rank, Ctrl-C, start-up
checks of data and weights, skipped bad images in classification fine-tuning.

* ``tools/torchrun.py`` under SIGTERM to its process group (2 gloo ranks) exits 75, not torchrun's 1.
* One rank SIGSTOPped, the other SIGTERMed: it fails within ``--dist_timeout`` naming the stopped rank.
* SIGINT once: checkpoint and exit 75; twice: exit 130; no traceback from the loader workers (2 of them).
* A script that ends while loader workers (which ignore SIGTERM) are alive exits at once, cleanly.
* Missing or unreadable weights, a missing split, unknown ``--opt``, ``--batch_size 0``: exit code 2, one
  line each, no ``output_dir`` (an unpaired modality file: tests/test_faults.py).
* ``run_finetuning_cls.py --on_bad_sample skip`` skips zero-byte images and counts files (4), not
  replacements.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults import ENV, REPO, TINY, Proc, argv, data, load  # noqa: F401

TORCHRUN = ["tools.torchrun", "--standalone", "--nproc_per_node=2", "run_pretraining_multimae.py"]


# ---------------------------------------------------------------------------------------------- launcher
_LIVE_WORKERS_AT_EXIT = """
import sys, torch
from torch.utils.data import DataLoader, TensorDataset
from utils.data.loader import track_loader
loader = track_loader(DataLoader(TensorDataset(torch.arange(64.)), batch_size=4, num_workers=2,
                                 persistent_workers=sys.argv[1] == 'persistent'))
it = iter(loader)
next(it)
print('leaving with workers alive', flush=True)
"""


@pytest.mark.parametrize("kind", ["persistent", "mid_epoch"])
def test_exit_with_live_loader_workers_does_not_hang(kind):
    """multiprocessing stops daemonic children at exit with SIGTERM, which the workers ignore: without the
    exit hook of utils.engine.preemption this waited forever; no 'killed by signal' report either."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _LIVE_WORKERS_AT_EXIT, kind], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "leaving with workers alive" in out.stdout, out.stderr[-3000:]
    assert "killed by signal" not in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert time.monotonic() - start < 30


def test_launcher_exit_code_keeps_75_of_a_preempted_group():
    from types import SimpleNamespace as F

    from tools.torchrun import launcher_exit_code

    assert launcher_exit_code({0: F(exitcode=75), 1: F(exitcode=75)}) == 75
    assert launcher_exit_code({1: F(exitcode=130)}) == 130
    # the others killed by torchrun closing the group after the first one left: the checkpoint is complete
    assert launcher_exit_code({0: F(exitcode=-15), 1: F(exitcode=75)}) == 75
    assert launcher_exit_code({0: F(exitcode=75), 1: F(exitcode=-9)}) == 75
    assert launcher_exit_code({0: F(exitcode=75), 1: F(exitcode=1)}) == 1
    assert launcher_exit_code({0: F(exitcode=-15)}) == 1
    assert launcher_exit_code({0: F(exitcode=1)}) == 1


def test_launcher_exits_75_after_sigterm_to_its_process_group(data, tmp_path):
    """torchrun starts each worker in a session of its own: the launcher passes the signal on and exits 75
    once both ranks have stopped with a checkpoint (plain torchrun: exit code 1)."""
    out = tmp_path / "run"
    proc = Proc([*TORCHRUN, *argv(data, out, "--batch_size", "2")], script="-m")
    proc.wait_for(r"Epoch: \[0\] \[2/6\]")
    proc.signal(signal.SIGTERM)
    code = proc.finish()
    assert code == 75, proc.output[-4000:]
    assert "[torchrun] received SIGTERM: passed to 2 worker(s)" in proc.output
    assert "Stopped at epoch 0, step" in proc.output
    assert load(out / "checkpoint-last.pth")["data_position"]["epoch"] == 0


# ---------------------------------------------------------------------------------------------- stopped rank
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks of the pre-training script as srun starts them (SLURM_* environment), each in its
    own session so that a signal reaches exactly one rank."""
    port, procs = str(_free_port()), []
    for r in range(world):
        env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
        env.update(SLURM_PROCID=str(r), SLURM_NTASKS=str(world), SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "run_pretraining_multimae.py", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def test_stopped_rank_makes_the_other_fail_in_time_naming_it(data, tmp_path):
    """Rank 1 SIGSTOPped (a hung node), rank 0 SIGTERMed: rank 0 cannot agree on the stop; it exits
    non-zero within --dist_timeout (6 s) plus the 6-s roll call, naming rank 1, instead of hanging."""
    procs = _slurm_ranks(argv(data, tmp_path / "run", "--batch_size", "2", "--dist_timeout", "0.1"))
    try:
        lines = []
        for line in procs[0].stdout:
            lines.append(line)
            if "Epoch: [0] [2/6]" in line:
                break
        assert procs[0].poll() is None, "".join(lines)[-3000:]
        os.killpg(procs[1].pid, signal.SIGSTOP)
        time.sleep(0.5)
        start = time.monotonic()
        os.killpg(procs[0].pid, signal.SIGTERM)
        out, _ = procs[0].communicate(timeout=90)
        took = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode == 1 and took < 60, (procs[0].returncode, took, out[-3000:])
    assert "[stop] received SIGTERM" in out
    # waiting in the step's gradient all-reduce (trainer.py) or in the stop agreement (preemption.py)
    assert (re.search(r"error: rank 0: a collective at utils/engine/(trainer|preemption)\.py:\d+ in \w+ failed", out)
            and "waited for rank(s) 1, which did not answer" in out and "--dist_timeout 0.1 min" in out), out[-3000:]
    assert not (tmp_path / "run" / "checkpoint-last.pth").exists()


# ---------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_once_stops_with_checkpoint_twice_aborts(presses, data, tmp_path):
    """SIGINT to the whole process group (what a terminal sends), with 2 loader workers."""
    out = tmp_path / "run"
    proc = Proc(argv(data, out, "--num_workers", "2"))
    proc.wait_for(r"Epoch: \[0\] \[2/6\]")
    for _ in range(presses):
        proc.signal(signal.SIGINT)
        time.sleep(0.05)
    code = proc.finish()
    text = proc.output
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-4000:]
    assert "[stop] received SIGINT: finishing the current step" in text
    if presses == 1:
        assert code == 75, text[-3000:]
        assert "Stopped at epoch 0, step" in text and "(received SIGINT)" in text
        assert load(out / "checkpoint-last.pth")["data_position"]["epoch"] == 0
    else:
        assert code == 130, text[-3000:]
        assert "aborted (second SIGINT: aborting without a checkpoint)" in text
        assert not (out / "checkpoint-last.pth").exists()


# ---------------------------------------------------------------------------------------------- start-up checks
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny MultiMAE state dict at patch 16 (what the fine-tuning scripts load)."""
    import torch

    from multimae import create_model
    from utils.data.modalities import build_input_adapters

    model = create_model("pretrain_multimae_tiny", input_adapters=build_input_adapters(["rgb"], 16, 32),
                         output_adapters={})
    path = tmp_path_factory.mktemp("weights") / "w.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _startup_cases(data: Path, weights: Path, tmp: Path) -> dict:
    (tmp / "empty.pth").write_bytes(b"")
    (tmp / "random.pth").write_bytes(os.urandom(1000))
    val = str(data.parent / "val")
    semseg = ["run_finetuning_semseg", "-c", "cfgs/finetune/semseg/synthetic_rgb.yaml", "--data_path", str(data),
              "--eval_data_path", val]
    cls = ["run_finetuning_cls", "-c", "cfgs/finetune/cls/synthetic.yaml", "--data_path", str(data),
           "--eval_data_path", val, "--finetune", str(weights)]
    return {
        "finetune missing": ([*semseg, "--finetune", str(tmp / "no.pth")],
                             r"--finetune: checkpoint file not found: '.*no\.pth'"),
        "finetune empty": ([*semseg, "--finetune", str(tmp / "empty.pth")],
                           r"--finetune: '.*empty\.pth' \(0 bytes\) is not a checkpoint.*\(it is empty\)"),
        "finetune random bytes": ([*semseg, "--finetune", str(tmp / "random.pth")],
                                  r"--finetune: '.*random\.pth' \(1000 bytes\) is not a checkpoint"),
        "split missing": ([*cls, "--eval_data_path", str(tmp / "val")],
                          r"--eval_data_path: folder not found: '.*val'"),
        "opt unknown": ([*cls, "--opt", "adamx"], r"--opt 'adamx' is not an optimizer; did you mean 'adamax'\?"),
        "batch size": (["run_finetuning_depth", "-c", "cfgs/finetune/depth/synthetic.yaml", "--data_path",
                        str(data), "--eval_data_path", val, "--finetune", str(weights), "--batch_size", "0"],
                       r"--batch_size must be >= 1, got 0"),
        "dist timeout": ([*cls, "--dist_timeout", "0"], r"--dist_timeout is in minutes and must be > 0, got 0"),
    }


@pytest.mark.parametrize("case", ["finetune missing", "finetune empty", "finetune random bytes", "split missing",
                                  "opt unknown", "batch size", "dist timeout"])
def test_startup_problem_exits_2_before_anything_is_made(case, data, weights, tmp_path, capsys):
    import importlib

    (script, *args), pattern = _startup_cases(data, weights, tmp_path)[case]
    out = tmp_path / "out"
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exc:
        module.parse_config([*args, "--output_dir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(re.search(pattern, line) for line in lines) and len(lines) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- bad images, cls
@pytest.fixture(scope="module")
def cls_bad_data(tmp_path_factory) -> Path:
    """32 training images, the first 4 of one class emptied (consecutive indices: each replacement of a
    bad image lands on the next bad one, 10 replacement events for 4 files)."""
    from utils.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("cls_bad")
    make_synthetic_dataset(str(root), num_train=32, num_val=8, image_size=32)
    cls_dir = sorted((root / "train" / "rgb").iterdir())[0]
    for f in sorted(cls_dir.glob("*.png"))[:4]:
        f.write_bytes(b"")
    return root


CLS_RUN = ["--model", "multivit_tiny", "--num_workers", "2", "--device", "cpu", "--print_freq", "100",
           "--input_size", "32", "--nb_classes", "4", "--data_set", "image_folder", "--batch_size", "8",
           "--epochs", "2", "--warmup_epochs", "1", "--lr", "1e-3", "--mixup", "0", "--cutmix", "0", "--aa", "",
           "--color_jitter", "0", "--save_ckpt_freq", "100"]


@pytest.mark.parametrize("mode", ["skip", "error"])
def test_cls_on_bad_sample_skip_counts_files(mode, cls_bad_data, tmp_path):
    from run_finetuning_cls import cli
    from utils.data.datasets import BadSampleError

    out = tmp_path / "run"
    args = [*CLS_RUN, "--data_path", str(cls_bad_data / "train"), "--eval_data_path", str(cls_bad_data / "val"),
            "--output_dir", str(out), "--on_bad_sample", mode]
    if mode == "error":
        with pytest.raises(BadSampleError, match=r"rgb file '.*\.png' cannot be read as an image \(0 bytes\)"):
            cli(args)
        return
    cli(args)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["train_bad_samples"] for r in log] == [4, 4]
