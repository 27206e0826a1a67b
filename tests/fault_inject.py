"""Run an entry script with a fault injected, for the subprocess tests in ``tests/test_faults.py``.

    python tests/fault_inject.py [--nan_at_call K] [--enospc_at_save N] [--kill_in_save N] -- run_pretraining_multimae.py ARGS...

``--nan_at_call K``: the K-th (0-based) call of the pre-training step in this process gets an rgb input
full of NaN (a corrupt batch: every task loss becomes NaN). ``--enospc_at_save N``: the N-th (1-based)
checkpoint write fails half-way with ``OSError(ENOSPC)`` (a full disk). ``--kill_in_save N``: the process
SIGKILLs itself half-way through its N-th checkpoint write (the temporary file is left as a kill leaves it).
Everything else is the real script.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _HalfFullDisk:
    """File object that accepts ``limit`` bytes and then fails like a full disk."""

    def __init__(self, f, limit: int, kill: bool = False):
        self.f, self.limit, self.written, self.kill = f, limit, 0, kill

    def write(self, data):
        room = self.limit - self.written
        if len(data) > room:
            self.f.write(bytes(data[:max(room, 0)]))
            self.written = self.limit
            if self.kill:
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _inject_enospc(nth: int, kill: bool = False) -> None:
    import utils.checkpoint as ckpt

    real = ckpt.atomic_open
    calls = {'n': 0}

    @contextlib.contextmanager
    def failing(path, mode='wb', **kw):
        name = os.path.basename(os.fspath(path))
        with real(path, mode, **kw) as f:
            if name.startswith('checkpoint-') and name.endswith('.pth'):
                calls['n'] += 1
                if calls['n'] == nth:
                    sys.stderr.write(f"[fault_inject] {'SIGKILL' if kill else 'disk full'} while writing {name}\n")
                    yield _HalfFullDisk(f, 64 * 1024, kill)
                    return
            yield f

    ckpt.atomic_open = failing


def _inject_nan(k: int) -> None:
    import torch

    from utils.pretrain.multimae import PretrainStep

    real = PretrainStep.__call__
    calls = {'n': 0}

    def corrupt(self, model, batch):
        if calls['n'] == k:
            x = dict(batch[0])
            x['rgb'] = torch.full_like(x['rgb'], float('nan'))
            batch = (x, *batch[1:])
            sys.stderr.write(f'[fault_inject] NaN input at step call {k}\n')
        calls['n'] += 1
        return real(self, model, batch)

    PretrainStep.__call__ = corrupt


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index('--')
    p = argparse.ArgumentParser()
    p.add_argument('--nan_at_call', type=int, default=None)
    p.add_argument('--enospc_at_save', type=int, default=None)
    p.add_argument('--kill_in_save', type=int, default=None)
    opts = p.parse_args(argv[:split])
    script, *rest = argv[split + 1:]
    sys.path.insert(0, REPO)
    if opts.nan_at_call is not None:
        _inject_nan(opts.nan_at_call)
    if opts.enospc_at_save is not None:
        _inject_enospc(opts.enospc_at_save)
    if opts.kill_in_save is not None:
        _inject_enospc(opts.kill_in_save, kill=True)
    sys.argv = [script, *rest]
    runpy.run_path(os.path.join(REPO, script), run_name='__main__')


if __name__ == '__main__':
    main()
