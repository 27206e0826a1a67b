"""What a person watching a run sees: a run-level progress line per epoch and a copy of the console.

* :class:`RunProgress` -- a Trainer callback printing, at each epoch end,
  ``Run: epoch 3/10 done  elapsed 0:04:10  ETA 0:09:43`` (the ETA extrapolates the epochs of this session).
* :func:`console_copy` -- while active, everything written to stdout/stderr also goes to
  ``output_dir/console.txt`` (appended, so a resumed run continues the same file; the main process only).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

__all__ = ["RunProgress", "console_copy", "hms"]


def hms(seconds: float) -> str:
    """``3725.2 -> '1:02:05'``."""
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RunProgress:
    """Trainer callback ``cb(trainer, epoch, stats)``: one progress line for the whole run (returns None, so
    the epoch record is unchanged). Must come last among the callbacks, so the ETA includes evaluation."""

    def __init__(self, epochs: int, start_epoch: int, clock: Any = time.time):
        self.epochs, self.start_epoch, self.clock = int(epochs), int(start_epoch), clock
        self.t0 = clock()

    def line(self, epoch: int) -> str:
        done_here = epoch + 1 - self.start_epoch
        elapsed = self.clock() - self.t0
        eta = elapsed / max(done_here, 1) * (self.epochs - epoch - 1)
        return f"Run: epoch {epoch + 1}/{self.epochs} done  elapsed {hms(elapsed)}  ETA {hms(eta)}"

    def __call__(self, trainer: Any, epoch: int, stats: dict) -> None:
        print(self.line(epoch))
        return None


class _Tee:
    def __init__(self, stream: TextIO, copy: TextIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def console_copy(output_dir: str | os.PathLike, enabled: bool = True, filename: str = "console.txt"
                 ) -> Iterator[Path | None]:
    """Copy stdout and stderr to ``output_dir/filename`` while the block runs (a no-op when not ``enabled``
    or without ``output_dir``); the streams are restored afterwards. Yields the file's path or None."""
    if not enabled or not output_dir:
        yield None
        return
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    with open(path, "a", encoding="utf-8", buffering=1) as f:
        sys.stdout, sys.stderr = _Tee(out, f), _Tee(err, f)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = out, err
