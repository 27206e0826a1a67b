#!/usr/bin/env python
"""``torchrun`` that keeps a preempted run's exit code 75, for batch scripts that requeue on it.

    python -m tools.torchrun --standalone --nproc_per_node 8 run_pretraining_multimae.py -c cfgs/... \\
        --output_dir /checkpoints/run1; [ $? -eq 75 ] && scontrol requeue "$SLURM_JOB_ID"

Same arguments as ``torchrun`` (``torch.distributed.run``), same workers; two things differ:

* Exit code. When the workers exited with 75 (a stop signal, checkpoint written; see
  :func:`launcher_exit_code`) the launcher exits 75 too, and 130 when they all aborted on a second Ctrl-C. Plain torchrun exits 1 in
  both cases, so ``exit code 75 -> requeue`` never fires.
* Stop signals (SIGTERM, SIGUSR1, SIGINT) are passed to the workers as they are and the launcher then
  waits for the workers to exit on their own. torchrun starts each worker in a session of its own, so
  a signal to the launcher's process group reaches only the launcher; torchrun itself then passes
  SIGTERM/SIGINT on, but waits only ``--shutdown-timeout`` seconds (default 30, also
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) before it SIGKILLs the workers, which can cut a large checkpoint
  write short, and it does not handle SIGUSR1 at all (SLURM's ``--signal=USR1@90`` would kill the
  launcher at once and leave the workers training). Here the scheduler's own SIGKILL is the only deadline.

The other signals of ``--signals-to-handle`` (SIGHUP, SIGQUIT by default) keep torchrun's handling.
Keep ``--max-restarts 0`` (the default): torchrun would otherwise restart a preempted worker group in
place instead of letting the scheduler requeue the job.
"""
from __future__ import annotations

import glob
import os
import signal
import sys
from typing import Any, Sequence

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from utils.engine.preemption import ABORTED_EXIT_CODE, PREEMPTED_EXIT_CODE, STOP_SIGNALS

__all__ = ["main", "worker_pids", "launcher_exit_code"]


def worker_pids(parent: int | None = None) -> list[int]:
    """The child processes of ``parent`` (default: this process), i.e. the workers torchrun started.
    Linux: read from ``/proc/<pid>/task/*/children``, else by scanning ``/proc/*/stat``."""
    parent = os.getpid() if parent is None else parent
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{parent}/task/*/children"):
        try:
            with open(path) as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            continue
    if pids or not os.path.isdir("/proc"):
        return sorted(pids)
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:  # fields after the command: state, ppid, ...
            pids.add(int(path.split("/")[2]))
    return sorted(pids)


class _PassOn:
    """Signal handler of the launcher: pass the signal to every worker's process group and let the
    agent keep waiting for them (they stop at the next step boundary, save and exit 75)."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def __call__(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        pids = worker_pids()
        for pid in pids:
            try:
                os.killpg(pid, signum)  # the worker's own group: torchrun starts it in a new session
            except ProcessLookupError:
                pass
        sys.stderr.write(f"[torchrun] received {name}: passed to {len(pids)} worker(s); waiting for them to "
                         f"save and exit\n")
        sys.stderr.flush()
        if not pids:  # no worker yet: nothing to save, start again later
            raise SystemExit(PREEMPTED_EXIT_CODE)


def launcher_exit_code(failures: dict[int, Any]) -> int:
    """75 when a worker exited 75 (preempted) and every other failed worker exited 75 too or was killed by
    torchrun closing the group (SIGTERM, then SIGKILL, sent once the first worker is gone); 130 when they
    all aborted on Ctrl-C; else 1 (torchrun's own code). ``failures``: ``ChildFailedError.failures``.

    A worker exits 75 only after the barrier that follows rank 0's checkpoint write, so one 75 means the
    checkpoint is complete; the others may already be tearing down when torchrun's SIGTERM reaches them.
    """
    codes = {f.exitcode for f in failures.values()}
    if PREEMPTED_EXIT_CODE in codes and codes <= {PREEMPTED_EXIT_CODE, -signal.SIGTERM, -signal.SIGKILL}:
        return PREEMPTED_EXIT_CODE
    if codes == {ABORTED_EXIT_CODE}:
        return ABORTED_EXIT_CODE
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse torchrun's arguments, take over the stop signals, run; returns the exit code."""
    args = torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    own = {signal.Signals(s).name for s in STOP_SIGNALS}
    kept = [s.strip() for s in str(args.signals_to_handle).split(",") if s.strip() and s.strip() not in own]
    args.signals_to_handle = ",".join(kept) or "SIGHUP"  # torchrun needs at least one name
    handler = _PassOn()
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        code = launcher_exit_code(exc.failures)
        sys.stderr.write(exc.format_msg() + "\n")
        if code == PREEMPTED_EXIT_CODE:
            sys.stderr.write(f"[torchrun] every worker stopped with a checkpoint: exit code {code} "
                             "(start again with the same output_dir to resume)\n")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
