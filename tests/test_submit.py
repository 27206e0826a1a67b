"""tools/submit.py: a real submitit LocalExecutor job of a tiny pre-training, preempted by SIGTERM (forwarded
by the local controller as SLURM would send it), checkpointed, requeued and resumed to the end."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from tools.submit import TrainingJob, build_executor, get_parser, main, parse_time

submitit = pytest.importorskip("submitit")

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 8
TINY = ["--model", "pretrain_multimae_tiny", "--encoder_depth", "2", "--input_size", "32", "--patch_size", "8",
        "--num_encoded_tokens", "12", "--decoder_dim", "32", "--decoder_depth", "0", "--decoder_num_heads", "2",
        "--batch_size", "4", "--epochs", str(EPOCHS), "--max_steps_per_epoch", "2", "--warmup_epochs", "1",
        "--num_workers", "0", "--device", "cpu", "--print_freq", "1", "--save_vis_freq", "0", "--save_ckpt_freq", "1",
        "--keep_last", "2"]


def test_parse_time_and_options(synthetic_root, capsys):
    assert [parse_time(t) for t in ("90", "30:30", "72:00:00", "2-12", "1-01:30")] == [90, 31, 4320, 3600, 1530]
    with pytest.raises(Exception, match="expected M, M:S"):
        parse_time("3h")
    args = get_parser().parse_args(["run_pretraining_multimae.py", "--nodes", "2", "--partition", "p", "--qos", "q",
                                    "--time", "1:00:00", "--cluster", "local"])
    assert (args.nodes, args.partition, args.qos, args.time, args.gpus_per_node) == (2, "p", "q", 60, 8)
    data = ["--data_path", str(synthetic_root / "train")]
    with pytest.raises(SystemExit, match="needs an --output_dir"):
        main(["run_pretraining_multimae.py", "--cluster", "local", "--", *data, "--output_dir", ""])
    with pytest.raises(SystemExit, match="--no_auto_resume"):
        main(["run_pretraining_multimae.py", "--cluster", "local", "--", *data, "--output_dir", "o", "--no_auto_resume"])
    # the script's own checks run at submission, before anything is queued
    with pytest.raises(SystemExit) as exc:
        main(["run_pretraining_multimae.py", "--cluster", "local", "--", "--data_path", str(synthetic_root / "none"),
              "--output_dir", "o"])
    assert exc.value.code == 2 and "--data_path: folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="defines no parse_config"):
        main(["tools/export_checkpoint.py", "--cluster", "local", "--", "--output_dir", "o"])


def test_local_job_preempted_requeued_and_resumed(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    argv = [*TINY, "--data_path", str(synthetic_root / "train"), "--output_dir", str(out)]
    args = get_parser().parse_args(["run_pretraining_multimae.py", "--cluster", "local", "--time", "10",
                                    "--gpus_per_node", "0"])
    job = build_executor(args, tmp_path / "logs").submit(TrainingJob("run_pretraining_multimae.py", argv))
    deadline = time.time() + 60
    while not (out / "checkpoint-0.pth").exists():  # the trainer is in its loop: SIGTERM is handled there
        assert time.time() < deadline and job.state == "RUNNING", job.stdout()
        time.sleep(0.05)
    os.kill(job._process.pid, signal.SIGTERM)  # the local controller forwards it to the task
    assert job.result() == 0
    log = job.stdout()
    assert "received SIGTERM" in log and "Stopped at" in log and "requeueing" in log, log[-3000:]
    assert "Resumed from" in log and "checkpoint-last.pth" in log.split("Resumed from", 1)[1].splitlines()[0]
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs == list(range(EPOCHS))  # each epoch exactly once across the two runs
    assert (out / f"checkpoint-{EPOCHS - 1}.pth").is_file()
    assert log.count("Starting with JobEnvironment") == 2  # the first run and the requeued one
