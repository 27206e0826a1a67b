"""One cell of the fault matrix: a fault injected into real runs of ``run_pretraining_multimae.py`` on the tiny
synthetic configuration, with a number of loader workers and processes, and what came of it.

Each fault starts the unchanged script (under ``tools.torchrun``, the launcher the docs give, for 2 processes, gloo on the CPU),
injects the fault as a cluster or a user would (SIGTERM and SIGKILL to every process of the run as SLURM sends
them, Ctrl-C to the process group as a terminal sends it, a truncated file, a corrupt checkpoint) or through ``tests/fault_inject.py`` (a NaN batch, a full disk during a save), and measures the exit
code, the seconds from the fault to the exit, and, where a resume makes sense, runs the same command again and
compares its final weights and optimizer state with an uninterrupted run's (``--deterministic``).

Public API: Setting, Cell, FAULTS, NO_RESUME, TINY, STEPS, EPOCHS, make_data, reference_run, run_cell.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]
INJECT = REPO / "tests" / "fault_inject.py"  # the injection the fault tests use (runs the unchanged script)
SCRIPT = "run_pretraining_multimae.py"
EPOCHS, STEPS, IMAGES, BATCH = 2, 4, 16, 4  # 16 images at a global batch of 4: 4 steps per epoch
TINY = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8", "--num_encoded_tokens", "12",
        "--decoder_dim", "64", "--decoder_depth", "0", "--decoder_num_heads", "2", "--epochs", str(EPOCHS),
        "--warmup_epochs", "1", "--blr", "2e-2", "--standardize_depth", "--fp32_output_adapters", "semseg",
        "--task_balancer", "uncertainty", "--device", "cpu", "--print_freq", "1", "--save_vis_freq", "0",
        "--save_ckpt_freq", "1", "--deterministic"]
MID_EPOCH = r"Epoch: \[1\] \[0/4\]"  # the fault comes after the first step of the second epoch
NAN_CALL = STEPS + 1  # the step function's call of epoch 1, step 1 (0-based) in every process
FINAL = f"checkpoint-{EPOCHS - 1}.pth"

__all__ = ["Setting", "Cell", "FAULTS", "NO_RESUME", "TINY", "STEPS", "EPOCHS", "make_data", "reference_run", "run_cell"]


@dataclasses.dataclass(frozen=True)
class Setting:
    workers: int
    procs: int


@dataclasses.dataclass
class Cell:
    """What one fault did in one setting. ``exit_code`` None: it hung and was killed after the timeout;
    ``seconds``: from the fault to the exit; ``exact``: the resumed run's final state equals the
    uninterrupted run's (None: no resume tried); ``steps_lost``: optimizer steps done before the fault that
    the resumed run had to do again."""
    fault: str
    workers: int
    procs: int
    exit_code: int | None = None
    outcome: str = ""
    seconds: float | None = None
    resume_exit: int | None = None
    exact: bool | None = None
    steps_lost: int | None = None


class Proc:
    """The script in its own process group; output lines are collected (with their time) by a thread."""

    def __init__(self, setting: Setting, data: Path, out: Path, inject: list[str] | None = None):
        cmd = [sys.executable]
        if setting.procs > 1:
            cmd += ["-m", "tools.torchrun", "--standalone", f"--nproc_per_node={setting.procs}"]
        if inject is not None:
            cmd += [str(INJECT), *inject, "--"]
        cmd += [SCRIPT, *TINY, "--batch_size", str(BATCH // setting.procs), "--num_workers", str(setting.workers),
                "--data_path", str(data), "--output_dir", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": str(REPO)}
        self.start = time.monotonic()
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            with self._new:
                self.lines.append((time.monotonic(), line))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> float | None:
        """The time the first line matching ``pattern`` was printed (None: not within ``timeout`` or exited)."""
        deadline, seen = time.monotonic() + timeout, 0
        with self._new:
            while True:
                for t, line in self.lines[seen:]:
                    if re.search(pattern, line):
                        return t
                seen = len(self.lines)
                if not self._reader.is_alive() or time.monotonic() > deadline:
                    return None
                self._new.wait(0.2)

    def signal(self, sig: int, every_process: bool = False) -> float:
        """``sig`` to the process group (workers included, as a terminal sends Ctrl-C) and, with
        ``every_process``, to every descendant too, as SLURM signals (and kills) every process of a job step:
        ``torch.distributed.run`` starts its ranks in process groups of their own."""
        targets = _descendants(self.p.pid) if every_process else []
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass
        for pid in targets:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return time.monotonic()

    def finish(self, timeout: float) -> tuple[int | None, float]:
        """(exit code or None after a hang, the time of the exit); a hang is ended with SIGKILL."""
        try:
            code: int | None = self.p.wait(timeout=max(1.0, timeout - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL, every_process=True)
            self.p.wait()
            code = None
        end = time.monotonic()
        self._reader.join(5)
        return code, end

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def make_data(root: Path) -> Path:
    """The tiny synthetic training split (16 images of 32 px) under ``root``; returns its ``train`` folder."""
    from utils.data.synthetic import make_synthetic_dataset

    if not (root / "train").is_dir():
        make_synthetic_dataset(str(root), num_train=IMAGES, num_val=2, image_size=32, seed=0)
    return root / "train"


def reference_run(setting: Setting, data: Path, out: Path, timeout: float) -> Path:
    """The uninterrupted run of ``setting``; its final checkpoint is what every resumed run must equal."""
    proc = Proc(setting, data, out)
    code, _ = proc.finish(timeout)
    if code != 0:
        raise RuntimeError(f"the uninterrupted reference run ({setting}) failed with exit code {code}:\n"
                           f"{proc.text[-3000:]}")
    return out / FINAL


# ---------------------------------------------------------------------------------------------- measuring
def steps_done(text: str) -> int:
    """Optimizer steps finished according to the furthest progress line ``Epoch: [e] [s/N]`` (printed after
    step s; with several processes the lines of a lagging rank may come last)."""
    found = re.findall(r"Epoch: \[(\d+)\] \[(\d+)/(\d+)\]", text)
    return max((int(e) * int(n) + int(s) + 1 for e, s, n in found), default=0)


def resumed_from(text: str) -> int:
    """The global step the run resumed at (0: it started from scratch)."""
    found = re.findall(r"Resumed from .*\(global step (\d+)\)", text)
    return int(found[-1]) if found else 0


def same_state(a: Path, b: Path) -> bool:
    """Bit-identical model, task balancer and optimizer state in two checkpoints."""
    if not (a.is_file() and b.is_file()):
        return False
    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    for key in ("model", "loss_balancer"):
        if x.get(key, {}).keys() != y.get(key, {}).keys():
            return False
        if not all(torch.equal(x[key][k], y[key][k]) for k in x.get(key, {})):
            return False
    for sa, sb in zip(x["optimizer"]["state"].values(), y["optimizer"]["state"].values()):
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return x.get("global_step") == y.get("global_step")


def _resume(cell: Cell, setting: Setting, data: Path, out: Path, ref: Path, done: int, timeout: float) -> str:
    """Run the same command again on ``out``; fills the resume columns, returns its output."""
    proc = Proc(setting, data, out)
    cell.resume_exit, _ = proc.finish(timeout)
    cell.exact = cell.resume_exit == 0 and same_state(ref, out / FINAL)
    cell.steps_lost = max(0, done - resumed_from(proc.text)) if cell.resume_exit == 0 else done
    return proc.text


# ---------------------------------------------------------------------------------------------- the faults
def _signal_mid_epoch(cell: Cell, setting: Setting, data: Path, out: Path, sig: int, timeout: float
                      ) -> tuple[Proc, int]:
    """Start a run, send ``sig`` to its process group mid-epoch; fills exit code and seconds."""
    proc = Proc(setting, data, out)
    if proc.wait_for(MID_EPOCH, timeout) is None:
        cell.exit_code, _ = proc.finish(1)
        cell.outcome = "never reached the fault point"
        return proc, 0
    sent = proc.signal(sig, every_process=sig != signal.SIGINT)  # Ctrl-C reaches the terminal's group only
    cell.exit_code, end = proc.finish(timeout)
    cell.seconds = end - sent
    return proc, steps_done(proc.text)


def _describe_stop(proc: Proc, code: int | None, timeout: float) -> str:
    if code is None:
        return f"hang, killed after {timeout:.0f} s"
    if re.search(r"Stopped at epoch \d+, step \d+/\d+", proc.text):
        return "stops at a step boundary, saves checkpoint-last"
    if "KeyboardInterrupt" in proc.text:
        return "KeyboardInterrupt traceback, nothing saved"
    return "killed, nothing saved" if code == -signal.SIGKILL else f"exits {code}"


def fault_sigterm(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    out = work / "run"
    proc, done = _signal_mid_epoch(cell, setting, data, out, signal.SIGTERM, timeout)
    cell.outcome = _describe_stop(proc, cell.exit_code, timeout)
    if (out / "checkpoint-last.pth").is_file():  # the starting point of the corrupt-checkpoint cell
        shutil.copytree(out, work / "interrupted")
        (work / "interrupted" / "steps_done").write_text(str(done))
    _resume(cell, setting, data, out, ref, done, timeout)


def fault_sigkill(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    proc, done = _signal_mid_epoch(cell, setting, data, work / "run", signal.SIGKILL, timeout)
    cell.outcome = _describe_stop(proc, cell.exit_code, timeout) + " (epoch-end checkpoints only)"
    _resume(cell, setting, data, work / "run", ref, done, timeout)


def fault_ctrl_c(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    proc, done = _signal_mid_epoch(cell, setting, data, work / "run", signal.SIGINT, timeout)
    cell.outcome = _describe_stop(proc, cell.exit_code, timeout)
    _resume(cell, setting, data, work / "run", ref, done, timeout)


def fault_truncated_image(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    bad = work / "data" / "train"
    shutil.copytree(data, bad)
    victim = sorted((bad / "rgb").rglob("*.png"))[IMAGES // 2]
    victim.write_bytes(victim.read_bytes()[:200])  # the header survives, the pixels do not
    proc = Proc(setting, bad, work / "run")
    cell.exit_code, end = proc.finish(timeout)
    cell.seconds = end - proc.start
    named = str(victim.relative_to(bad)) in proc.text or victim.name in proc.text
    cell.outcome = (f"hang, killed after {timeout:.0f} s" if cell.exit_code is None
                    else "error naming the file" if named else "error without the file name")
    cell.steps_lost = steps_done(proc.text)  # the data stays bad: no resume


def _injected(cell: Cell, setting: Setting, data: Path, out: Path, inject: list[str], timeout: float) -> Proc:
    proc = Proc(setting, data, out, inject=inject)
    fault = proc.wait_for(r"\[fault_inject\]", timeout)
    cell.exit_code, end = proc.finish(timeout)
    cell.seconds = end - (fault if fault is not None else proc.start)
    return proc


def fault_nan_loss(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    proc = _injected(cell, setting, data, work / "run", ["--nan_at_call", str(NAN_CALL)], timeout)
    named = re.search(r"non-finite loss nan at epoch 1, step 1/4", proc.text)
    cell.outcome = (f"hang, killed after {timeout:.0f} s" if cell.exit_code is None
                    else "error naming step, losses and files" if named else "error without the step")
    _resume(cell, setting, data, work / "run", ref, steps_done(proc.text), timeout)  # the NaN was one batch


def fault_full_disk(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    out = work / "run"
    proc = _injected(cell, setting, data, out, ["--enospc_at_save", "2"], timeout)  # epoch 1's checkpoint
    stale = [p.name for p in out.glob(".*.tmp")]
    cell.outcome = ("error: No space left on device" if "No space left on device" in proc.text
                    else f"exits {cell.exit_code}") + (f", {len(stale)} temporary file(s) left" if stale else "")
    _resume(cell, setting, data, out, ref, steps_done(proc.text), timeout)


def fault_corrupt_last(cell: Cell, setting: Setting, data: Path, work: Path, ref: Path, timeout: float) -> None:
    """checkpoint-last.pth of a run stopped mid-epoch 1 cut to half, checkpoint-0.pth intact beside it."""
    source = work.parent / "sigterm" / "interrupted"
    out = work / "run"
    if not source.is_dir():
        fault_sigterm(Cell("sigterm", cell.workers, cell.procs), setting, data, work.parent / "sigterm", ref, timeout)
    if not source.is_dir():
        cell.outcome = "no mid-epoch checkpoint-last.pth to corrupt (the SIGTERM run wrote none)"
        return
    shutil.copytree(source, out)
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:last.stat().st_size // 2])
    done = int((out / "steps_done").read_text())
    proc = Proc(setting, data, out)
    cell.exit_code, end = proc.finish(timeout)
    cell.seconds = end - proc.start
    cell.resume_exit = cell.exit_code
    cell.exact = cell.exit_code == 0 and same_state(ref, out / FINAL)
    cell.steps_lost = max(0, done - resumed_from(proc.text)) if cell.exit_code == 0 else done
    fell_back = re.search(r"Resumed from \S*checkpoint-\d+\.pth", proc.text)
    cell.outcome = ("falls back to checkpoint-0.pth" if fell_back else
                    "error naming checkpoint-last.pth" if cell.exit_code and "checkpoint-last.pth" in proc.text
                    else f"exits {cell.exit_code}")


FAULTS: dict[str, Callable[..., None]] = {
    "sigterm": fault_sigterm, "sigkill": fault_sigkill, "truncated_image": fault_truncated_image,
    "nan_loss": fault_nan_loss, "full_disk": fault_full_disk, "corrupt_last": fault_corrupt_last,
    "ctrl_c": fault_ctrl_c,
}

NO_RESUME = {"truncated_image"}  # the data stays bad: nothing to compare with an uninterrupted run


def run_cell(fault: str, setting: Setting, data: Path, work: Path, ref: Path | None, timeout: float) -> Cell:
    """Inject ``fault`` in ``setting`` under the fresh folder ``work``; ``ref``: the reference final checkpoint
    (unused, may be None, for the faults in ``NO_RESUME``)."""
    cell = Cell(fault, setting.workers, setting.procs)
    work.mkdir(parents=True, exist_ok=True)
    FAULTS[fault](cell, setting, data, work, ref, timeout)
    return cell
