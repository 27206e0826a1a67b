#!/usr/bin/env python
"""Run an entry script on SLURM through submitit; preempted or timed-out jobs checkpoint, requeue and resume.

    python tools/submit.py run_pretraining_multimae.py --nodes 2 --gpus_per_node 8 --partition learn \\
        --time 72:00:00 --account myproj --qos high --constraint volta32gb \\
        -- -c cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml --output_dir /checkpoints/mmae-b

Everything after ``--`` goes to the script unchanged (the same YAML and overrides as with torchrun). Each
of ``nodes x gpus_per_node`` SLURM tasks runs the script in-process (its ``main(parse_config(argv))``)
with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set from submitit's ``JobEnvironment``. SLURM is asked for SIGUSR1
``--signal_delay_s`` seconds before the time limit; a preemption sends SIGTERM. Either signal reaches the
trainer's stop handler (utils/engine/preemption.py): all ranks stop at the same step, rank 0 writes
``checkpoint-last.pth`` and the script exits with 75; the job then requeues itself (submitit's checkpoint
protocol) and the new run auto-resumes from ``output_dir``. ``--cluster local`` runs the same job on this
machine (submitit's LocalExecutor) for a try-out.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

# submitit reads its preemption signal when imported; USR1 is the one the trainer already handles.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
import submitit  # noqa: E402
from submitit.core.job_environment import SignalHandler  # noqa: E402

from utils.engine.preemption import PREEMPTED_EXIT_CODE  # noqa: E402

__all__ = ["TrainingJob", "parse_time", "build_executor", "main"]


def parse_time(value: str) -> int:
    """A SLURM time limit in whole minutes: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``."""
    text = value.strip()
    try:
        days, rest = (text.split("-", 1) if "-" in text else ("0", text))
        parts = [int(x) for x in rest.split(":")]
        if len(parts) > 3 or min(parts) < 0 or int(days) < 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--time {value!r}: expected M, M:S, H:M:S or D-H[:M[:S]]") from None
    if "-" in text:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else [0, *parts, 0][:3]
    return int(days) * 1440 + h * 60 + m + (1 if sec else 0)


def _set_dist_env() -> None:
    """torch.distributed's env:// variables from submitit's view of the job (SLURM or local)."""
    env = submitit.JobEnvironment()
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank))
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0] if env.num_nodes > 1 else "127.0.0.1")
    # The same port after a requeue (same job id), different ones for jobs sharing a node.
    os.environ.setdefault("MASTER_PORT", str(15000 + zlib.crc32(str(env.job_id).encode()) % 20000))


def _load_entry(script: str) -> dict[str, Any]:
    """The entry script's globals (not run as ``__main__``); it must define ``parse_config`` and ``main``."""
    module = runpy.run_path(script, run_name="submit_entry")
    missing = [name for name in ("parse_config", "main") if not callable(module.get(name))]
    if missing:
        raise SystemExit(f"error: {script} defines no {' and no '.join(missing)}(); expected an entry script "
                         f"with parse_config(argv) and main(cfg)")
    return module


class TrainingJob:
    """The submitted callable: runs ``script`` with ``argv`` in this process; requeues on exit code 75.

    ``checkpoint()`` (submitit's protocol) returns a fresh submission of the same command: the training
    state lives in the script's output_dir, which the new run auto-resumes from."""

    def __init__(self, script: str, argv: Sequence[str]):
        self.script, self.argv = str(Path(script).resolve()), list(argv)
        self._started = time.time()

    def __call__(self) -> int:
        self._started = time.time()
        _set_dist_env()
        entry = _load_entry(self.script)
        try:
            entry["main"](entry["parse_config"](self.argv))
        except SystemExit as exc:
            if exc.code == PREEMPTED_EXIT_CODE:
                self._requeue()
                raise
            if exc.code not in (0, None):
                raise
        return 0

    def _requeue(self) -> None:
        """Rank 0 dumps ``checkpoint()`` and requeues the job (and exits); other ranks return and exit 75."""
        env = submitit.JobEnvironment()
        delayed = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
        handler = SignalHandler(env, env.paths, delayed)
        handler._start_time = self._started  # tells a time-out (counted) from a preemption (not counted)
        print(f"checkpoint written; requeueing {self.script} (job {env.job_id})", flush=True)
        handler.checkpoint_and_try_requeue(signal.SIGUSR1)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainingJob(self.script, self.argv), *args, **kwargs)


def build_executor(args: argparse.Namespace, folder: Path) -> submitit.Executor:
    """A submitit executor for ``--cluster`` (slurm / local) with the resources of ``args``."""
    executor = submitit.AutoExecutor(folder=folder, cluster=None if args.cluster == "slurm" else "local",
                                     slurm_max_num_timeout=args.max_timeouts)
    params: dict[str, Any] = dict(name=args.name or Path(args.script).stem, timeout_min=args.time,
                                  nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                  tasks_per_node=args.gpus_per_node or 1, cpus_per_task=args.cpus_per_task)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if args.cluster == "slurm":
        params.update(slurm_signal_delay_s=args.signal_delay_s)
        for key in ("partition", "account", "qos", "constraint", "comment", "exclude"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
    executor.update_parameters(**params)
    return executor


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Submit an entry script to SLURM (submitit), with requeue on preemption",
                                usage="%(prog)s SCRIPT [options] -- [script arguments]")
    p.add_argument("script", help="entry script, e.g. run_pretraining_multimae.py or run_finetuning_cls.py")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8, help="also the number of tasks (processes) per node")
    p.add_argument("--cpus_per_task", type=int, default=10)
    p.add_argument("--mem_gb", type=int, default=None)
    p.add_argument("--time", type=parse_time, default=parse_time("72:00:00"), help="time limit per job")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--comment", default=None)
    p.add_argument("--exclude", default=None, help="nodes to avoid")
    p.add_argument("--signal_delay_s", type=int, default=120, help="SIGUSR1 this long before the time limit")
    p.add_argument("--max_timeouts", type=int, default=20, help="requeues after reaching the time limit")
    p.add_argument("--name", default=None, help="job name (default: the script name)")
    p.add_argument("--folder", default=None, help="submitit logs (default: <output_dir>/submitit)")
    p.add_argument("--cluster", default="slurm", choices=["slurm", "local"])
    return p


def main(argv: Sequence[str] | None = None) -> submitit.Job:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = get_parser().parse_args(ours)
    if not Path(args.script).is_file():
        raise SystemExit(f"error: entry script not found: {args.script}")
    output_dir = _script_option(args.script, script_argv, "output_dir")
    if not output_dir:
        raise SystemExit("error: the script needs an --output_dir (in the YAML or after --): a requeued job resumes "
                         "from its checkpoint-last.pth")
    if _script_option(args.script, script_argv, "auto_resume") is False:
        raise SystemExit("error: --no_auto_resume: a requeued job would start again from scratch")
    folder = Path(args.folder or Path(output_dir) / "submitit")
    job = build_executor(args, folder).submit(TrainingJob(args.script, script_argv))
    print(f"submitted job {job.job_id}: {args.script} on {args.nodes} node(s) x {args.gpus_per_node} GPU(s); "
          f"logs in {folder}, checkpoints in {output_dir}")
    return job


def _script_option(script: str, script_argv: list[str], key: str) -> Any:
    """A value of the script's resolved configuration (YAML and overrides, checks included)."""
    cfg = _load_entry(script)["parse_config"](script_argv)
    return getattr(cfg, key, None)


if __name__ == "__main__":
    main()
