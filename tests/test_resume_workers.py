"""Exact mid-epoch resume with 2 data-loader workers, end to end on real processes: fine-tuning (semantic
segmentation, classification: persistent workers, augmentation seeded per sample) and pre-training with 2
processes x 2 workers. SIGTERM to the process group mid-epoch, exit 75, the same command again: the final
weights and optimizer state equal the uninterrupted run's bit for bit (``--deterministic``, CPU)."""
from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch

from test_faults import REPO, Proc, argv, assert_same_training_state, data, load, run  # noqa: F401

SEMSEG = ["-c", str(REPO / "cfgs/finetune/semseg/synthetic_rgb.yaml"), "--finetune", "", "--input_size", "32",
          "--batch_size", "4", "--decoder_dim", "64", "--decoder_depth", "1", "--max_train_images", "24",
          "--epochs", "2", "--warmup_epochs", "1", "--eval_freq", "2", "--log_images_freq", "0"]
CLS = ["-c", str(REPO / "cfgs/finetune/cls/synthetic.yaml"), "--finetune", "", "--input_size", "32",
       "--patch_size", "8", "--batch_size", "4", "--epochs", "2", "--warmup_epochs", "1", "--log_images_freq", "0",
       "--reprob", "0.25", "--aa", "rand-m9-mstd0.5"]  # RandAugment and random erasing: Python's random
COMMON = ["--num_workers", "2", "--print_freq", "1", "--save_ckpt_freq", "1", "--device", "cpu", "--deterministic"]
SCRIPTS = {"semseg": ("run_finetuning_semseg.py", SEMSEG), "cls": ("run_finetuning_cls.py", CLS)}


def assert_same_weights_and_optimizer(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} of {len(a['model'])} tensors differ, e.g. {differ[:3]}"
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in ("exp_avg", "exp_avg_sq")), ka
    assert a["global_step"] == b["global_step"]


@pytest.fixture(scope="module")
def ft_data(tmp_path_factory) -> Path:
    """24 training scenes (6 steps of 4), 4 validation scenes (every class of the classification split)."""
    from utils.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ft_synthetic")
    make_synthetic_dataset(str(root), num_train=24, num_val=4, image_size=32, seed=0)
    return root / "train"


def _finetune_argv(task: str, data: Path, out: Path) -> tuple[str, list[str]]:
    script, task_args = SCRIPTS[task]
    return script, [*task_args, "--data_path", str(data), "--eval_data_path", str(data.parent / "val"),
                    "--output_dir", str(out), *COMMON]


@pytest.mark.parametrize("task", ["semseg", pytest.param("cls", marks=pytest.mark.slow)])
def test_finetune_sigterm_mid_epoch_with_two_workers_resumes_bit_identical(task, ft_data, tmp_path):
    script, ref_argv = _finetune_argv(task, ft_data, tmp_path / "ref")
    code, text = run(ref_argv, script=script)
    assert code == 0, text[-4000:]
    _, run_argv = _finetune_argv(task, ft_data, tmp_path / "run")
    proc = Proc(run_argv, script=script)
    proc.wait_for(r"Epoch: \[1\] \[2/6\]")
    proc.signal(signal.SIGTERM)
    assert proc.finish() == 75, proc.output[-4000:]
    step = load(tmp_path / "run" / "checkpoint-last.pth")["data_position"]["step"]
    assert 3 <= step < 6
    code, text = run(run_argv, script=script)
    assert code == 0, text[-4000:]
    assert f"continuing at epoch 1, step {step}/6" in text and "Replaying" not in text, text[-3000:]
    assert_same_weights_and_optimizer(load(tmp_path / "ref" / "checkpoint-1.pth"),
                                      load(tmp_path / "run" / "checkpoint-1.pth"))


@pytest.mark.slow
def test_torchrun_two_workers_sigterm_mid_epoch_resumes_bit_identical(data, tmp_path):
    """2 processes (gloo) x 2 loader workers: the resumed run equals an uninterrupted 2 x 2 run."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run_pretraining_multimae.py"]
    extra = ("--batch_size", "2", "--num_workers", "2")
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, text = run([*launcher[1:], *argv(data, ref, *extra)], script=launcher[0])
    assert code == 0, text[-4000:]
    proc = Proc([*launcher[1:], *argv(data, out, *extra)], script=launcher[0])
    proc.wait_for(r"Epoch: \[1\] \[2/6\]")
    proc.signal(signal.SIGTERM)  # torchrun, both ranks and their workers, as on a SLURM node
    code = proc.finish()
    assert code != 0 and re.search(r"Stopped at epoch 1, step \d/6", proc.output), proc.output[-4000:]
    step = load(out / "checkpoint-last.pth")["data_position"]["step"]
    code, text = run([*launcher[1:], *argv(data, out, *extra)], script=launcher[0])
    assert code == 0, text[-4000:]
    assert f"continuing at epoch 1, step {step}/6" in text and "Replaying" not in text, text[-3000:]
    assert_same_training_state(load(ref / "checkpoint-2.pth"), load(out / "checkpoint-2.pth"))
