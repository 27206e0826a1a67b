"""What the data-set preparation tools (tools/prepare_*.py) share: input checks with clear errors, atomic
placement of files (copy or symbolic link), split CSVs, lazy optional imports and a bounded thread pool.

Every check runs before anything is written, so a missing folder of the release stops the tool with the
folder's name and leaves no half-built output (and, with ``--link``, no dangling link).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

from utils.io import atomic_open

__all__ = ["PrepareError", "require", "require_dirs", "require_files", "read_csv", "place_file", "run_jobs",
           "prepare_parser"]


class PrepareError(SystemExit):
    """Bad input to a preparation tool; the message names the path and what was expected (exit status 1
    with the message when it reaches the interpreter, catchable as SystemExit in tests)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def require(module: str, tool: str):
    """Import ``module`` (e.g. 'h5py') or stop with the pip command that installs it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise PrepareError(f"{tool} needs '{module.split('.')[0]}' (pip install -r requirements.txt): {e}") from e


def _listing(paths: Sequence[str], what: str, hint: str) -> str:
    shown = ", ".join(f"'{p}'" for p in paths[:5])
    more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
    return f"{len(paths)} {what} missing: {shown}{more}" + (f" ({hint})" if hint else "")


def require_dirs(paths: Iterable[str], hint: str = "") -> None:
    """Stop naming every folder of ``paths`` that does not exist (up to five, then a count)."""
    missing = [p for p in paths if not os.path.isdir(p)]
    if missing:
        raise PrepareError(_listing(missing, "folder(s)", hint))


def require_files(paths: Iterable[str], hint: str = "") -> None:
    """Stop naming every file of ``paths`` that does not exist (up to five, then a count)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise PrepareError(_listing(missing, "file(s)", hint))


def read_csv(path: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file with a header holding at least ``columns`` (surrounding spaces stripped)."""
    require_files([path], hint=f"the split CSV, with columns {', '.join(columns)}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise PrepareError(f"{path}: column(s) {missing} missing (header: {header}; expected {list(columns)})")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def place_file(src: str, dst: str, link: bool) -> None:
    """Copy ``src`` to ``dst`` (through a temporary file) or make ``dst`` a symbolic link to the absolute
    ``src``; either way ``dst`` appears complete or not at all, replacing what was there. The source is
    expected to exist (callers check first)."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    if not link:
        with open(src, "rb") as fin, atomic_open(dst, "wb", fsync=False) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return
    tmp = os.path.join(os.path.dirname(dst) or ".", f".{os.path.basename(dst)}.{os.getpid()}.link.tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.abspath(src), tmp)
    os.replace(tmp, dst)


def run_jobs(fn: Callable, jobs: Iterable[tuple], num_threads: int, window: int = 64) -> int:
    """Run ``fn(*job)`` for every job on ``num_threads`` threads (at most ``window`` per thread in flight,
    so memory stays bounded); re-raises the first error. Returns the number of jobs run."""
    done, pending = 0, deque()
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for job in jobs:
            while len(pending) >= window * max(1, num_threads):
                pending.popleft().result()
            pending.append(pool.submit(fn, *job))
            done += 1
        while pending:
            future: Future = pending.popleft()
            future.result()
    return done


def prepare_parser(doc: str, inputs: dict[str, str], save_path_help: str, num_threads_help: str,
                   num_threads_default: int = 8, link: bool = False) -> argparse.ArgumentParser:
    """The command line every preparation tool starts from: the required input paths (``{flag: help}``,
    in order), ``--save_path``, ``--num_threads`` and, when ``link``, ``--link`` (symbolic links instead
    of copies). The tool adds its own options and parses."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, help_text in inputs.items():
        p.add_argument(flag, required=True, help=help_text)
    p.add_argument("--save_path", required=True, help=save_path_help)
    if link:
        p.add_argument("--link", action="store_true", help="symbolic links to the release instead of copies")
    p.add_argument("--num_threads", type=int, default=num_threads_default, help=num_threads_help)
    return p
