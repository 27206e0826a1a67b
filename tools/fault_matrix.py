#!/usr/bin/env python
"""The fault matrix: each fault x setting (loader workers, processes) on the tiny synthetic pre-training run,
measured on real processes.

Faults: ``sigterm`` (to every process of the run mid-epoch, as SLURM sends it, then the same command again),
``sigkill`` (the same with SIGKILL), ``truncated_image`` (a cut PNG in the data), ``nan_loss`` (one NaN batch,
injected), ``full_disk`` (ENOSPC half-way through a checkpoint write, injected), ``corrupt_last`` (the
mid-epoch ``checkpoint-last.pth`` of the ``sigterm`` cell cut to half, ``checkpoint-0.pth`` intact beside it),
``ctrl_c`` (SIGINT to the process group, as a terminal sends it). Per cell: the exit code, what happened, the seconds from the fault to the exit, and
for the faults that can be resumed the resumed run's exit code, whether its final weights and optimizer state
equal an uninterrupted run's bit for bit (``--deterministic``), and the optimizer steps done before the fault
that had to be done again. Two processes run under ``tools.torchrun`` (torchrun keeping exit code 75; gloo) with half the batch each.

    python -m tools.fault_matrix                                   # everything: 7 faults x 4 settings
    python -m tools.fault_matrix --faults sigterm,nan_loss --workers 2 --procs 1 --out /tmp/fm

Writes ``fault_matrix.md`` (a Markdown table) and ``fault_matrix.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from tools.lib.fault_cells import FAULTS, NO_RESUME, Cell, Setting, make_data, reference_run, run_cell
from utils.io import atomic_open

COLUMNS = ["fault", "workers", "processes", "exit code", "what happens", "s to exit", "resumed run",
           "resume exact", "steps lost"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--workers", default="0,2", help="data-loader workers per process, comma-separated")
    p.add_argument("--procs", default="1,2", help="processes, comma-separated (1 or 2)")
    p.add_argument("--out", default="output/fault_matrix", help="folder for the tables and the runs")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a run counts as hung and is killed (default: %(default)s)")
    p.add_argument("--keep_runs", action="store_true", help="keep the output folders of the runs")
    return p


def _ints(text: str, name: str, allowed: set[int] | None = None) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--{name}: expected comma-separated integers, got {text!r}")
    bad = [v for v in values if v < 0 or (allowed is not None and v not in allowed)]
    if not values or bad:
        raise SystemExit(f"--{name}: {text!r} is not a list of {sorted(allowed) if allowed else 'counts >= 0'}")
    return values


def _faults(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAULTS]
    if not names or unknown:
        raise SystemExit(f"--faults: unknown {unknown or text!r}; expected some of {', '.join(FAULTS)}")
    if "corrupt_last" in names and "sigterm" in names:  # corrupt_last starts from the sigterm cell's stop
        names.remove("corrupt_last")
        names.insert(names.index("sigterm") + 1, "corrupt_last")
    return names


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def markdown(cells: list[Cell]) -> str:
    """The matrix as a Markdown table, one row per cell."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for c in cells:
        values = [c.fault, c.workers, c.procs, "hang" if c.exit_code is None else c.exit_code, c.outcome,
                  c.seconds, c.resume_exit, c.exact, c.steps_lost]
        rows.append("| " + " | ".join(_fmt(v) for v in values) + " |")
    return "\n".join(rows) + "\n"


def write_results(out: Path, cells: list[Cell], meta: dict) -> None:
    """``fault_matrix.md`` and ``fault_matrix.json`` in ``out`` (atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "fault_matrix.md", "w") as f:
        f.write(f"Measured {meta['date']} with `{meta['command']}` ({meta['seconds']:.0f} s, torch "
                f"{meta['torch']}, {meta['machine']}).\n\n")
        f.write(markdown(cells))
    with atomic_open(out / "fault_matrix.json", "w") as f:
        json.dump({"meta": meta, "cells": [dataclasses.asdict(c) for c in cells]}, f, indent=1)


def main(argv: list[str] | None = None) -> list[Cell]:
    args = get_args_parser().parse_args(argv)
    faults = _faults(args.faults)
    settings = [Setting(w, p) for p in _ints(args.procs, "procs", {1, 2}) for w in _ints(args.workers, "workers")]
    out = Path(args.out)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    start = time.monotonic()
    data = make_data(runs / "data")
    refs: dict[int, Path] = {}
    cells: list[Cell] = []
    for s in settings:
        # the augmentation is seeded per sample: one reference per process count, whatever the workers
        if s.procs not in refs and set(faults) - NO_RESUME:
            refs[s.procs] = reference_run(Setting(0, s.procs), data, runs / f"reference_p{s.procs}", args.timeout)
        for fault in faults:
            t = time.monotonic()
            cell = run_cell(fault, s, data, runs / f"w{s.workers}_p{s.procs}" / fault, refs.get(s.procs),
                            args.timeout)
            cells.append(cell)
            print(f"[fault matrix] {fault}, {s.workers} workers, {s.procs} process(es): exit {cell.exit_code}, "
                  f"{cell.outcome}; resume exact: {_fmt(cell.exact)} ({time.monotonic() - t:.0f} s)", flush=True)
    meta = {"command": "python -m tools.fault_matrix " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.monotonic() - start,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {platform.system()}"}
    write_results(out, cells, meta)
    if not args.keep_runs:
        shutil.rmtree(runs, ignore_errors=True)
    print(markdown(cells))
    print(f"Written: {out / 'fault_matrix.md'}, {out / 'fault_matrix.json'} ({meta['seconds']:.0f} s)")
    return cells


if __name__ == "__main__":
    main()
