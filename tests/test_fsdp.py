"""--fsdp (FSDP2 on CPU with gloo) against DDP, sharded (DCP) checkpoints: resume on 2 and on 1 process,
export to the single-file format, atomic layout. One torchrun of tests/fsdp_worker.py serves the first tests.

CUDA-only parts (the MixedPrecisionPolicy in fp16/bf16, ShardedGradScaler) are not exercised on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_pretraining_multimae as script
from tests.fsdp_worker import TINY
from tools.export_checkpoint import main as export_main
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.engine.dcp import TRAINER_STATE, export_checkpoint, is_sharded_checkpoint, load_sharded, save_sharded

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """DDP, --fsdp and --fsdp resumed from the sharded epoch-0 checkpoint, 2 gloo processes each."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "tests/fsdp_worker.py", str(out), str(synthetic_root / "train")]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def epoch_losses(out):
    return [json.loads(line)["[Epoch] loss"] for line in (Path(out) / "log.txt").read_text().splitlines()]


def test_fsdp_losses_and_weights_equal_ddp(runs, tmp_path):
    ddp, fsdp = epoch_losses(runs / "ddp"), epoch_losses(runs / "fsdp")
    assert len(ddp) == len(fsdp) == 2
    assert fsdp == pytest.approx(ddp, rel=1e-6)
    exported = export_checkpoint(runs / "fsdp" / "checkpoint-1.pth", tmp_path / "fsdp.pth")
    a, b = torch.load(exported, weights_only=True), torch.load(runs / "ddp" / "checkpoint-1.pth", weights_only=True)
    assert set(a) == set(b) and a["epoch"] == b["epoch"] == 1 and a["global_step"] == 4
    assert set(a["model"]) == set(b["model"])
    start = torch.load(runs / "ddp" / "checkpoint-0.pth", weights_only=True)["model"]
    for k in a["model"]:
        # 4 AdamW steps of lr <= 6e-4 from equal weights; rounding noise moves a few values by ~2e-5
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-4), k
    assert sum((a["model"][k] - start[k]).abs().sum() for k in a["model"]) > 1.0  # training moved the weights
    assert [g["params"] for g in a["optimizer"]["param_groups"]] == [g["params"] for g in b["optimizer"]["param_groups"]]
    for i, s in b["optimizer"]["state"].items():
        assert torch.allclose(a["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], atol=1e-5)
        assert torch.equal(a["optimizer"]["state"][i]["step"], s["step"])
    assert torch.allclose(a["loss_balancer"]["log_vars"], b["loss_balancer"]["log_vars"], atol=1e-6)


def test_sharded_checkpoint_layout(runs):
    out = runs / "fsdp"
    assert os.readlink(out / "checkpoint-last.pth") == "checkpoint-1.pth"
    for tag in (0, 1):
        ck = out / f"checkpoint-{tag}.pth"
        assert is_sharded_checkpoint(ck) and {"__0_0.distcp", "__1_0.distcp", TRAINER_STATE} <= set(os.listdir(ck))
    state = load_checkpoint(out / "checkpoint-0.pth" / TRAINER_STATE)
    assert state["epoch"] == 0 and len(state["rng"]) == 2 and "model" not in state and "optimizer" not in state
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_sharded_checkpoint_resumes_on_two_ranks(runs, tmp_path):
    assert epoch_losses(runs / "resumed") == epoch_losses(runs / "fsdp")[1:]
    a = torch.load(export_checkpoint(runs / "fsdp" / "checkpoint-1.pth", tmp_path / "a.pth"), weights_only=True)
    b = torch.load(export_checkpoint(runs / "resumed" / "checkpoint-1.pth", tmp_path / "b.pth"), weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][name]), (i, name)
    assert torch.equal(a["loss_balancer"]["log_vars"], b["loss_balancer"]["log_vars"])


def test_sharded_checkpoint_resumes_on_one_process(runs, synthetic_root, tmp_path, capsys):
    """A plain single-process run (no process group, no FSDP) loads what 2 ranks wrote."""
    ck = runs / "fsdp" / "checkpoint-0.pth"
    cfg = script.parse_config([*TINY, "--data_path", str(synthetic_root / "train"), "--output_dir",
                               str(tmp_path / "one"), "--epochs", "1", "--resume", str(ck)], exit_on_error=False)
    trainer = script.main(cfg)  # epoch 0 is done: loads and stops
    assert "RNG states in" in capsys.readouterr().out  # 2 ranks' RNG states, 1 process: not restored
    assert trainer.start_epoch == 1 and trainer.global_step == 2
    assert export_main([str(ck), str(tmp_path / "e.pth")]) == 0
    full = torch.load(tmp_path / "e.pth", weights_only=True)
    model = trainer.model.state_dict()
    assert set(model) == set(full["model"])
    for k, v in full["model"].items():
        assert torch.equal(model[k], v), k
    optim = trainer.optimizer.state_dict()
    assert len(optim["state"]) == len(full["optimizer"]["state"]) == 177
    for i, s in full["optimizer"]["state"].items():
        for name, v in s.items():
            assert torch.equal(optim["state"][i][name], v), (i, name)
    assert torch.equal(trainer.modules["loss_balancer"].log_vars.detach(), full["loss_balancer"]["log_vars"])


def test_save_sharded_single_process_atomic_and_pruned(tmp_path):
    """Mid-epoch saves go to checkpoint-step<N>.pth with checkpoint-last.pth swapped onto them; older step
    directories, numbered ones beyond keep_last and a temp directory left by a killed save disappear."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    (tmp_path / ".checkpoint-1.pth.tmp").mkdir()  # killed while saving epoch 1
    for step, tag in ((1, 0), (2, "last"), (3, "last"), (4, 1), (6, 2)):
        save_sharded(tmp_path, tag, {"epoch": 0, "global_step": step, "args": {}}, model, opt, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    assert os.readlink(tmp_path / "checkpoint-last.pth") == "checkpoint-2.pth"
    save_sharded(tmp_path, "last", {"epoch": 2, "global_step": 7, "args": {}}, model, opt)
    assert os.readlink(tmp_path / "checkpoint-last.pth") == "checkpoint-step7.pth"
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = load_sharded(tmp_path / "checkpoint-last.pth", fresh, fresh_opt)
    assert state["global_step"] == 7 and torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="is not a sharded checkpoint directory"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "x.pth")
    wrong = torch.nn.Linear(3, 5)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_sharded(tmp_path / "checkpoint-last.pth", wrong, torch.optim.AdamW(wrong.parameters()))
