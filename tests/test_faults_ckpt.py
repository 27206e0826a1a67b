"""Checkpoint faults: a kill between two writes (the best checkpoint, the log.txt record), the temporary files of
killed writes, a corrupt checkpoint-last.pth, and an auto-resume with a changed configuration.

Kills are real SIGKILLs: of a forked training process at the exact point (a write wrapped to kill its own
process once it is done), or of run_pretraining_multimae.py from outside and through tests/fault_inject.py.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from test_engine import _state, _trainer
from test_faults import Proc, argv, data, epoch_log, load, run  # noqa: F401 (data: the fixture)

import utils.engine.checkpointing as engine_ckpt
import utils.engine.steplog as steplog
from utils.checkpoint import (CheckpointError, pick_resume_checkpoint, remove_stale_temporaries,
                              resolve_resume)
from utils.config.job import CheckpointConfig
from utils.engine.preemption import Preempted

METRIC = [1.0, 5.0, 3.0, 4.0]  # per epoch: epoch 1 is the best


def _metric(trainer, epoch, stats):
    return {"val_metric": METRIC[epoch]}


def _make(out: Path):
    return _trainer(out, epochs=4, best_metric="val_metric", best_mode="max")


def _killed_child(out: Path, patch) -> int:
    """Train in a forked process that ``patch`` arranges to SIGKILL itself; returns its exit code."""
    def child():
        patch()
        trainer, loader = _make(out)
        trainer.fit(loader, callbacks=[_metric])
        os._exit(0)  # reached only when the kill never came

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(120)
    return proc.exitcode


def _resume_and_finish(out: Path):
    trainer, loader = _make(out)
    assert trainer.resume(resolve_resume(CheckpointConfig(output_dir=str(out))))
    trainer.fit(loader, callbacks=[_metric])
    return trainer


def test_kill_after_the_best_epochs_checkpoint_still_ends_with_the_true_best(tmp_path):
    def patch():
        real = engine_ckpt.save_checkpoint

        def save_then_die(output_dir, tag, state, **kw):
            path = real(output_dir, tag, state, **kw)
            if str(tag) == "1":  # checkpoint-1.pth (the best epoch) is complete
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        engine_ckpt.save_checkpoint = save_then_die

    assert _killed_child(tmp_path, patch) == -signal.SIGKILL
    assert (tmp_path / "checkpoint-1.pth").is_file()
    trainer = _resume_and_finish(tmp_path)
    best = load(tmp_path / "checkpoint-best.pth")
    assert best["epoch"] == 1 and best["best_value"] == 5.0 and trainer.best_value == 5.0
    epoch_1 = load(tmp_path / "checkpoint-1.pth")["model"]
    assert all(torch.equal(v, epoch_1[k]) for k, v in best["model"].items())


def test_kill_between_checkpoint_and_log_append_loses_no_record(tmp_path):
    full, loader = _make(tmp_path / "full")
    full.fit(loader, callbacks=[_metric])

    out = tmp_path / "run"

    def patch():
        real = steplog.append_log_txt

        def die_before_epoch_1(output_dir, record, *a, **kw):
            if record.get("epoch") == 1:  # the epoch-1 checkpoint is written, its log line not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return real(output_dir, record, *a, **kw)
        steplog.append_log_txt = die_before_epoch_1

    assert _killed_child(out, patch) == -signal.SIGKILL
    assert [r["epoch"] for r in epoch_log(out)] == [0]
    assert load(out / "checkpoint-last.pth")["epoch"] == 1
    _resume_and_finish(out)
    assert epoch_log(out) == epoch_log(tmp_path / "full")  # every epoch once, the same numbers


def test_resume_log_record_is_not_duplicated(tmp_path):
    trainer, loader = _make(tmp_path)
    trainer.epochs = 2
    trainer.fit(loader, callbacks=[_metric])
    again, _ = _make(tmp_path)
    assert again.resume(str(tmp_path / "checkpoint-last.pth"))
    assert [r["epoch"] for r in epoch_log(tmp_path)] == [0, 1]


def test_corrupt_last_checkpoint_falls_back_to_newest_intact_one(tmp_path, capsys):
    full, loader = _make(tmp_path / "full")
    full.fit(loader, callbacks=[_metric])

    out = tmp_path / "run"
    first, loader = _make(out)
    inner, calls = first.step_fn, {"n": 0}

    def step(model, batch):
        calls["n"] += 1
        if calls["n"] == 20:  # 8 steps per epoch: epoch 2, step 4 -> checkpoint-last.pth is its own file
            first.stop.request("test")
        return inner(model, batch)

    first.step_fn = step
    with pytest.raises(Preempted):
        first.fit(loader, callbacks=[_metric])
    last = out / "checkpoint-last.pth"
    assert not last.is_symlink() and load(last)["data_position"]["epoch"] == 2
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    capsys.readouterr()

    trainer = _resume_and_finish(out)
    text = capsys.readouterr().out
    assert re.search(rf"cannot read checkpoint {re.escape(str(last))} \(\d+ bytes\): .*truncated", text), text
    assert (f"Resuming from {out / 'checkpoint-1.pth'} instead (end of epoch 1, global step 16): the training "
            "saved after that point in the unreadable file(s) is lost") in text
    assert "continuing at epoch 2 (global step 16)" in text
    a, b = _state(full), _state(trainer)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the lost steps were trained again, identically

    for p in out.glob("checkpoint-*.pth"):
        if not p.is_symlink():
            p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* can be read:\n  cannot read checkpoint "):
        pick_resume_checkpoint(out)


def test_stale_temporaries_removed_by_name_only(tmp_path, capsys):
    stale = [".checkpoint-3.pth.k2_x9.tmp", ".checkpoint-last.pth.4242.tmp", ".checkpoint-last.pth.77.hardlink",
             ".log.txt.ab1.tmp", ".config.yaml.zz.tmp", ".checkpoint-step12.pth.tmp", ".checkpoint-2.pth.old"]
    kept = ["checkpoint-3.pth", ".checkpoint-3.pth", ".notes.txt.ab.tmp", "data.tmp", ".other.pth.x.tmp", "log.txt"]
    for name in stale[:5] + kept:
        (tmp_path / name).write_bytes(b"x" * 10)
    os.remove(tmp_path / stale[1])
    os.symlink("checkpoint-3.pth", tmp_path / stale[1])  # point_last_at's temporary is a link
    for name in stale[5:]:  # DCP directories
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"y" * 100)
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    out = capsys.readouterr().out
    assert all(f"Removed {name} (" in out for name in stale)


# ---------------------------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_ten_random_sigkills_leave_no_temporary_file(data, tmp_path):  # noqa: F811
    """--save_every_steps 1: a checkpoint write at every step; every other kill lands inside one
    (tests/fault_inject.py), the others at a random moment from outside."""
    out, rng = tmp_path / "run", random.Random(0)
    extra = ("--save_every_steps", "1", "--epochs", "6")
    left, removed = 0, 0
    for k in range(10):
        if k % 2 == 0:
            code, text = run(argv(data, out, *extra), inject=["--kill_in_save", str(rng.randint(1, 3))])
        else:
            proc = Proc(argv(data, out, *extra))
            proc.wait_for(r"Epoch: \[\d\]")
            time.sleep(rng.uniform(0.0, 1.0))
            proc.signal(signal.SIGKILL)
            code, text = proc.finish(), proc.output
        assert code == -signal.SIGKILL, text[-3000:]
        removed += len(re.findall(r"Removed \.checkpoint-\S+\.tmp .*by an interrupted write", text))
        left += len(list(out.glob(".*.tmp")))
    assert left >= 5 and removed >= 4  # the injected kills left partial files, the next start removed them
    code, text = run(argv(data, out, *extra))
    assert code == 0, text[-4000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert [r["epoch"] for r in epoch_log(out)] == list(range(6))


def test_harmless_keys_are_not_changes():
    from utils.config.changes import HARMLESS_KEYS, config_changes, format_changes

    old = {"seed": 0, "blr": 0.02, "opt_betas": [0.9, 0.95], "num_workers": 10, "output_dir": "a", "rank": 0,
           "only_old": 1}
    new = {"seed": 0, "blr": 0.02, "opt_betas": (0.9, 0.95), "num_workers": 0, "output_dir": "b", "only_new": 2}
    assert config_changes(old, new) == {}
    changes = config_changes(old, {**new, "seed": 1, "data_path": "/x"})
    assert changes == {"seed": (0, 1)}  # data_path: not in the old args (older code), not compared
    assert format_changes(changes) == "  - seed: 0 -> 1"
    assert {"seed", "blr", "lr", "epochs", "batch_size", "model", "in_domains", "data_path", "mask_ratio",
            "num_encoded_tokens", "alphas", "amp"}.isdisjoint(HARMLESS_KEYS)


def _pretrain(out: Path, data_path: Path, *extra: str):
    """run_pretraining_multimae.py in this process (without --deterministic, a process-wide switch)."""
    import run_pretraining_multimae as script

    args = [a for a in argv(data_path, out, "--epochs", "1", *extra) if a != "--deterministic"]
    return script.main(script.parse_config(args))


def test_changed_seed_refused_unless_allowed(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    _pretrain(out, data)
    config = (out / "config.yaml").read_text()
    assert "\nseed: 0\n" in config
    capsys.readouterr()

    with pytest.raises(SystemExit) as info:
        _pretrain(out, data, "--seed", "1", "--blr", "3e-2", "--print_freq", "3")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "was written with another configuration" in err
    assert "  - seed: 0 -> 1" in err and "  - blr: 0.02 -> 0.03" in err and "print_freq" not in err
    assert "--allow_config_change" in err
    assert (out / "config.yaml").read_text() == config and not (out / "config_changes.txt").exists()

    _pretrain(out, data, "--epochs", "2", "--seed", "1", "--allow_config_change")
    text = capsys.readouterr().out
    assert "with a changed configuration (--allow_config_change):\n  - epochs: 1 -> 2\n  - seed: 0 -> 1" in text
    assert "\nseed: 1\n" in (out / "config.yaml").read_text()
    record = json.loads((out / "config_changes.txt").read_text())
    assert record["changes"] == {"epochs": [1, 2], "seed": [0, 1]} and record["epoch"] == 0
    assert [r["epoch"] for r in epoch_log(out)] == [0, 1]


def test_fallback_and_peek_with_sharded_checkpoint_folders(tmp_path, capsys):
    """``--fsdp`` checkpoints are folders: their trainer state is what is peeked at and checked."""
    from utils.checkpoint import peek_checkpoint

    for step, body in ((6, None), (9, b"torn")):
        folder = tmp_path / f"checkpoint-{'1' if step == 6 else 'step9'}.pth"
        folder.mkdir()
        (folder / ".metadata").write_bytes(b"m")
        if body is None:
            torch.save({"epoch": 1, "global_step": step, "args": {"seed": 3}}, folder / "trainer_state.pth")
        else:
            (folder / "trainer_state.pth").write_bytes(body)
    os.symlink("checkpoint-step9.pth", tmp_path / "checkpoint-last.pth", target_is_directory=True)
    assert pick_resume_checkpoint(tmp_path) == tmp_path / "checkpoint-1.pth"
    assert "Resuming from" in capsys.readouterr().out and "checkpoint-step9.pth" not in str(
        pick_resume_checkpoint(tmp_path))
    assert peek_checkpoint(tmp_path / "checkpoint-1.pth")["args"] == {"seed": 3}
