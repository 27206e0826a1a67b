"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM and most schedulers send before killing a job) and Ctrl-C.

The signal handler only sets a flag; the training loop asks :meth:`StopRequest.agreed` at every optimizer
step boundary, and when it says yes every rank leaves the loop at the same step, rank 0 writes a checkpoint
and the process exits with :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "temporary
failure, try again"). Restarting with the same ``output_dir`` resumes from that checkpoint. A second
signal while saving is only reported: the save goes on (and is atomic, so even a SIGKILL in the middle
leaves the previous checkpoint intact).

Ctrl-C (SIGINT) once stops the same way (checkpoint, exit code 75: the run is resumable, exactly as after
a SIGTERM; 130, the shell's "killed by SIGINT", would say the opposite). A second Ctrl-C aborts at once
with ``KeyboardInterrupt``, even in the middle of a save (the write is atomic: the previous checkpoint
stays); the entry runner turns it into one line and exit code 130. Data-loader workers ignore all three
signals (:func:`ignore_stop_signals`), so a terminal's Ctrl-C, which reaches the whole foreground process
group, prints no traceback from inside them. Because they ignore SIGTERM, the interpreter's own exit could
not stop them (``multiprocessing`` terminates daemonic children with SIGTERM, then joins them): a script
that ends while a loader's workers are alive (persistent workers, an unfinished epoch) would wait forever.
An exit hook of this module kills the live loader workers first; they only read data, so nothing is lost.

Agreement across ranks. SLURM signals every task, torchrun forwards the signal to every worker, but not
necessarily at the same instant, so ranks could see the flag at different steps and deadlock in the next
collective. Every ``check_every`` boundaries each rank contributes its flag to an asynchronous MAX
all-reduce on a separate gloo group and reads the result launched at the previous check: no rank waits
for the network inside a step (the reduction of a 4-byte CPU tensor finishes long before the next check),
the CUDA stream is never synchronised (the tensor lives on the CPU, even with NCCL training), and all ranks
reach the same decision at the same boundary. The reduction has its own short timeout
(:data:`AGREEMENT_TIMEOUT_S`, at most ``--dist_timeout``): a stopped or hung rank makes the others fail
after it with a message naming that rank (:func:`utils.dist.describe_collective_failure`) instead of
blocking a SIGTERM save until the scheduler's SIGKILL. The price is a delay of ``check_every`` steps between the
signal and the stop, small next to the grace period of a scheduler (SLURM ``--signal=USR1@90``).

    with StopRequest() as stop:                 # installs the handlers (main thread), restores them after
        for step in ...:
            train_step()
            if stop.agreed():                   # collective: every rank calls it at the same boundaries
                save_checkpoint(...)
                raise Preempted(...)            # SystemExit(75)

Public API: PREEMPTED_EXIT_CODE, ABORTED_EXIT_CODE, STOP_SIGNALS, AGREEMENT_TIMEOUT_S, Preempted, StopRequest,
ignore_stop_signals.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # its exit hook (terminate + join children) must be registered before ours
import os
import signal
import sys
import threading
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from utils.dist import collective_timeout_s, get_world_size, is_dist_avail_and_initialized

__all__ = ['PREEMPTED_EXIT_CODE', 'ABORTED_EXIT_CODE', 'STOP_SIGNALS', 'AGREEMENT_TIMEOUT_S', 'Preempted',
           'StopRequest', 'ignore_stop_signals']

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a checkpoint was written, start again to resume
ABORTED_EXIT_CODE = 130  # 128 + SIGINT: a second Ctrl-C aborted without saving
STOP_SIGNALS: tuple[int, ...] = tuple(getattr(signal, n) for n in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, n))
AGREEMENT_TIMEOUT_S = 60.0  # the stop-flag reduction; a step plus the ranks' skew is far shorter


class Preempted(SystemExit):
    """Raised after the stop checkpoint is written; exits the interpreter with PREEMPTED_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def ignore_stop_signals(signals: Sequence[int] = STOP_SIGNALS) -> None:
    """Ignore the stop signals in this process (data-loader workers: the scheduler signals the whole
    process group, a terminal's Ctrl-C too, and a worker that dies would crash the main process, with
    a traceback of its own, before it can save)."""
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux ``/proc``; False where that cannot be read)."""
    try:
        with open(f'/proc/{pid}/status') as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith('SigIgn:'))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def _kill_loader_workers() -> None:
    """Exit hook: SIGKILL the live daemonic children that ignore SIGTERM (DataLoader workers after
    :func:`ignore_stop_signals`). ``multiprocessing``'s exit hook, which runs after this one (exit hooks run
    last registered first), would send them SIGTERM and join them forever; torch leaves its workers to it at
    interpreter exit."""
    stuck = [p for p in multiprocessing.active_children()
             if p.daemon and p.pid is not None and _ignores_sigterm(p.pid)]
    if not stuck:
        return
    if hasattr(signal, 'SIGCHLD') and threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would report each killed worker as a crash ("killed by signal: Killed")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in stuck:
        proc.kill()
    for proc in stuck:
        proc.join(5)


atexit.register(_kill_loader_workers)


class StopRequest:
    """Flag raised by the stop signals and agreed on by all ranks. See the module docstring.

    Args:
        signals: signals to catch (default SIGTERM, SIGUSR1 and SIGINT).
        check_every: number of :meth:`agreed` calls between two reductions in multi-process runs.
        timeout_s: the reduction's timeout (default :data:`AGREEMENT_TIMEOUT_S`, at most the process
            group's ``--dist_timeout``).
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, check_every: int = 1, timeout_s: float | None = None):
        self.signals = tuple(signals)
        self.check_every = max(1, int(check_every))
        self.timeout_s = float(timeout_s if timeout_s is not None else min(AGREEMENT_TIMEOUT_S, collective_timeout_s()))
        self.interrupts = 0
        self.count = 0
        self.signal_name: str | None = None
        self.saving = False
        self._reason: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid: int | None = None
        self._group: Any = None
        self._work: Any = None
        self._buf: torch.Tensor | None = None
        self._calls = 0

    # -------------------------------------------------------------------------------- local flag
    @property
    def requested(self) -> bool:
        """True once a stop signal (or :meth:`request`) reached this process."""
        return self.count > 0 or self._reason is not None

    @property
    def reason(self) -> str:
        return self._reason or (f'received {self.signal_name}' if self.signal_name else 'stop requested')

    def request(self, reason: str = 'stop requested') -> None:
        """Ask for a stop without a signal (tests, callbacks)."""
        self._reason = reason

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked data-loader worker inherited the handler: the main process decides
        self.count += 1
        name = signal.Signals(signum).name
        self.signal_name = self.signal_name or name
        if signum == getattr(signal, 'SIGINT', None):
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt(f'second {name}: aborting without a checkpoint')
        if self.count == 1:
            msg = (f'received {self.signal_name}: finishing the current step, then saving a checkpoint and '
                   f'exiting with code {PREEMPTED_EXIT_CODE}')
        elif self.saving:
            msg = (f'received {name} again while saving: the checkpoint is being written atomically, '
                   f'please wait (the previous checkpoint stays intact whatever happens)')
        else:
            msg = f'received {name} again: already stopping at the next step boundary'
        if self.interrupts == 1 and self.count == 1:
            msg += ' (press Ctrl-C again to abort without saving)'
        sys.stderr.write(f'[stop] {msg}\n')
        sys.stderr.flush()

    # -------------------------------------------------------------------------------- install
    def __enter__(self) -> 'StopRequest':
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if get_world_size() > 1:
            # Collective: every rank enters at the same point (start of Trainer.fit).
            self._group = dist.new_group(backend='gloo', timeout=timedelta(seconds=self.timeout_s))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.drain()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -------------------------------------------------------------------------------- agreement
    def agreed(self) -> bool:
        """Whether every rank stops now. Collective in multi-process runs: call it at the same step
        boundaries on every rank. Single process: the local flag, no delay."""
        if self._group is None or not is_dist_avail_and_initialized():
            return self.requested
        self._calls += 1
        if (self._calls - 1) % self.check_every:
            return False
        decided = False
        if self._work is not None:
            self._work.wait()
            decided = bool(self._buf.item())  # CPU tensor: no device synchronisation
        self._buf = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return decided

    def drain(self) -> None:
        """Wait for an outstanding reduction (before the process group goes away)."""
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError:
                pass  # the group is already broken (another rank died): nothing left to agree on
            self._work = None
