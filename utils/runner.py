"""The one job runner: every entry script is a parser plus ``run(cfg, job)``.

``run`` sets up the process (group, seeds, determinism, precision), writes ``config.yaml``, lets the job
build its data and model, then either evaluates only or trains: the job's :class:`TrainingPlan` becomes a
Trainer through :func:`utils.engine.factory.build_trainer`, which resumes (explicit ``--resume`` or the
newest readable checkpoint of ``output_dir``) and fits with the job's callbacks.

Before anything is written, the main process removes the temporary files that killed writes left in
``output_dir``, and an automatic resume is checked against the checkpoint's configuration: a change that
alters the run (see :mod:`utils.config.changes`) stops with exit code 2, naming each key, unless
``--allow_config_change`` is given; then the change is printed and appended to ``config_changes.txt``.

Two ways out are rewritten here: a collective that failed for want of a peer becomes
:class:`utils.dist.CollectiveFailure` naming the ranks that did not answer, and a second Ctrl-C
(``KeyboardInterrupt``) becomes one line on stderr and exit code 130 instead of a traceback.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Mapping, Sequence

from utils.checkpoint import peek_checkpoint, remove_stale_temporaries, resolve_resume
from utils.config import parse_args, save_config
from utils.config.changes import config_changes, format_changes
from utils.config.job import JobConfig
from utils.dist import (CollectiveFailure, describe_collective_failure, destroy_distributed, init_distributed,
                        seed_everything, set_deterministic)
from utils.engine.factory import build_trainer
from utils.engine.preemption import ABORTED_EXIT_CODE
from utils.engine.progress import RunProgress, console_copy
from utils.jobs import Job, get_job
from utils.logger import WandbLogger, append_log_txt

__all__ = ["run", "entry_point"]


def run(cfg: JobConfig, job: Job) -> Any:
    """Run ``job`` with ``cfg``; returns the last record (an epoch, evaluation or test record), or the
    trainer for pre-training jobs (whose ``finish`` returns it)."""
    show_own_warnings(cfg.runtime.show_user_warnings)
    ctx = init_distributed(cfg.dist, cfg.runtime.device, cfg.runtime.tf32)
    seed_everything(cfg.runtime.seed, ctx.rank)
    set_deterministic(cfg.runtime.deterministic)
    ctx = ctx._replace(amp=job.resolve_amp(cfg, ctx.device))
    try:
        with console_copy(cfg.checkpoint.output_dir, ctx.is_main):
            return _run(cfg, job, ctx)
    except KeyboardInterrupt as exc:
        sys.stderr.write(f"aborted ({exc or 'KeyboardInterrupt'}); the last checkpoint written, if any, is intact\n")
        raise SystemExit(ABORTED_EXIT_CODE) from None
    except CollectiveFailure as exc:  # one line: where this rank waited and for whom, not two tracebacks
        sys.stderr.write(f"error: {exc}\n")
        # Leave without interpreter teardown: gloo's threads may still wait on the dead peer, and destroying
        # them then calls std::terminate (exit -6, seen under load) instead of this exit code. Nothing is
        # lost: checkpoints are written atomically, the log file is closed, wandb finished above.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _run(cfg: JobConfig, job: Job, ctx: Any) -> Any:
    wandb = None
    try:
        if cfg.checkpoint.output_dir and ctx.is_main:
            remove_stale_temporaries(cfg.checkpoint.output_dir)
        resume = resolve_resume(cfg.checkpoint)
        if resume and not cfg.checkpoint.resume:  # auto-resume: this output_dir's own run
            check_config_change(cfg, ctx, resume)
        if cfg.checkpoint.output_dir and ctx.is_main and job.saves_config(cfg):
            save_config(cfg, cfg.checkpoint.output_dir)
        parts = job.build(cfg, ctx)
        if cfg.wandb.log_wandb:
            wandb = WandbLogger(cfg.wandb, cfg.to_dict(), cfg.checkpoint.output_dir)
        results = job.evaluate_only(cfg, ctx, parts, wandb)
        if results is not None:
            return results
        trainer = build_trainer(cfg, ctx, parts.model, parts.train_loader, job.plan(cfg, ctx, parts), wandb)
        callbacks = job.callbacks(cfg, ctx, parts, trainer, wandb)
        trainer.start_epoch = cfg.checkpoint.start_epoch
        trainer.resume(resume)  # last: restores the RNG states
        epochs = cfg.get('epochs')
        if trainer.start_epoch >= epochs:
            print(f"Nothing to train: {cfg.checkpoint.output_dir or cfg.checkpoint.resume} holds a finished run "
                  f"(epoch {trainer.start_epoch} of {epochs}). To continue it, raise --epochs and add "
                  "--allow_config_change; or use another --output_dir")
        else:
            print(f"Training epochs {trainer.start_epoch}..{epochs - 1} on {ctx.device} (amp: {ctx.amp})")
        callbacks = [*callbacks, RunProgress(epochs, trainer.start_epoch)]
        record = trainer.fit(parts.train_loader, callbacks=callbacks)
        return job.finish(cfg, ctx, parts, trainer, record, wandb)
    except RuntimeError as exc:
        failure = describe_collective_failure(exc)  # before the group is torn down: it asks the other ranks
        if failure is None:
            raise
        raise failure from exc
    finally:
        if wandb is not None:
            wandb.finish()
        destroy_distributed()


def check_config_change(cfg: JobConfig, ctx: Any, path: str) -> None:
    """Compare ``cfg`` with the ``args`` of the checkpoint ``path`` an auto-resume is about to continue.
    A change outside :data:`utils.config.changes.HARMLESS_KEYS` exits with code 2 naming each key (old ->
    new), unless ``--allow_config_change``: then it is printed and recorded in ``config_changes.txt``."""
    ck = peek_checkpoint(path)
    old = ck.get("args")
    if not isinstance(old, Mapping):
        return
    new = {**cfg.to_dict(), "amp": ctx.amp}  # checkpoints store the resolved precision and peak lr
    if cfg.get("lr") is None:
        new.pop("lr", None)
    changes = config_changes(old, new)
    if not changes:
        return
    listing = format_changes(changes)
    if not cfg.checkpoint.allow_config_change:
        if ctx.is_main:
            print(f"ERROR: {path} was written with another configuration than this run's; resuming it would "
                  f"continue that run under settings it was not trained with:\n{listing}\nUse another "
                  f"--output_dir for a new run, or --allow_config_change to continue it with these changes "
                  f"(they are then recorded in config_changes.txt). config.yaml and the checkpoints are "
                  f"unchanged.", file=sys.stderr, flush=True)
        raise SystemExit(2)
    print(f"Resuming {path} with a changed configuration (--allow_config_change):\n{listing}", flush=True)
    append_log_txt(cfg.checkpoint.output_dir, {
        "resumed_from": str(path), "epoch": ck.get("epoch"), "global_step": ck.get("global_step"),
        "changes": {k: [a, b] for k, (a, b) in changes.items()}}, filename="config_changes.txt")


def show_own_warnings(show_all: bool) -> None:
    """Every script alike: the project's own warnings (raised in ``utils``, ``multimae``, ``tools``) are always
    shown; other libraries' UserWarnings only with ``--show_user_warnings``."""
    if not show_all:
        warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("default", category=UserWarning, module=r"(utils|multimae|tools)(\.|$)")


def entry_point(get_args_parser: Callable[[], Any], config_class: type[JobConfig], kind: str, name: str,
                validate: Any = None, prepare: Callable | None = None) -> tuple[Callable, Callable]:
    """``(parse_config, main)`` of an entry script: ``parse_config(argv=None, exit_on_error=True)`` parses
    command line + YAML into ``config_class`` (``prepare`` rewrites the parsed values first, ``validate``
    checks them); ``main(cfg)`` runs the registered job ``kind``/``name`` on it."""
    def parse_config(argv: Sequence[str] | None = None, exit_on_error: bool = True) -> JobConfig:
        return parse_args(get_args_parser(), argv, validate=validate, config_class=config_class,
                          prepare=prepare, exit_on_error=exit_on_error)

    def main(cfg: JobConfig) -> Any:
        return run(cfg, get_job(kind, name))

    return parse_config, main
