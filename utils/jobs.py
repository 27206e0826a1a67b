"""Pre-training methods and fine-tuning tasks as registered plugins behind one small protocol.

A job is a class with four hooks, registered under a kind and a name::

    @register_job('pretrain', 'multimae')
    class MultiMAEPretraining(Job):
        config_class = PretrainConfig
        def build(self, cfg, ctx): ...        # data and model (on ctx.device), in the job's own order
        def plan(self, cfg, ctx, parts): ...  # TrainingPlan: step function, parameter groups, peak lr
        def callbacks(self, cfg, ctx, parts, trainer, wandb): ...   # evaluation, pictures
        def finish(self, cfg, ctx, parts, trainer, record, wandb): ...  # e.g. test of the best checkpoint

:func:`utils.runner.run` drives every job the same way: process group, seeds, precision, config.yaml,
``build``, either ``evaluate_only`` (``--eval``) or ``plan`` -> Trainer -> resume -> fit -> ``finish``.
Adding a method or a task is a module with one such class plus its config; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from utils.config.job import JobConfig
from utils.dist import DistContext
from utils.engine.factory import TrainingPlan
from utils.engine.trainer import resolve_amp

__all__ = ["Parts", "Job", "register_job", "get_job", "list_jobs"]

_REGISTRY: dict[str, dict[str, type["Job"]]] = {}


@dataclass
class Parts:
    """What :meth:`Job.build` made: the model, the training loader and anything else the job's later
    hooks need (evaluation sets, the dataset, a teacher ...)."""
    model: nn.Module
    train_loader: DataLoader | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Job:
    """Base class of every pre-training method and fine-tuning task (see the module docstring)."""
    kind: str = ""
    name: str = ""
    config_class: type[JobConfig] = JobConfig

    def resolve_amp(self, cfg: JobConfig, device: torch.device) -> str:
        """The run's precision: ``--amp auto`` is fp16 on CUDA (as published) and none elsewhere."""
        return resolve_amp(cfg.runtime.amp, device)

    def saves_config(self, cfg: JobConfig) -> bool:
        """Whether this run writes ``config.yaml`` (evaluation-only runs of some tasks do not)."""
        return True

    def build(self, cfg: JobConfig, ctx: DistContext) -> Parts:
        raise NotImplementedError

    def evaluate_only(self, cfg: JobConfig, ctx: DistContext, parts: Parts, wandb: Any) -> dict | None:
        """Results of an evaluation-only run (``--eval``), or None to train."""
        return None

    def plan(self, cfg: JobConfig, ctx: DistContext, parts: Parts) -> TrainingPlan:
        raise NotImplementedError

    def callbacks(self, cfg: JobConfig, ctx: DistContext, parts: Parts, trainer: Any, wandb: Any) -> list[Callable]:
        return []

    def finish(self, cfg: JobConfig, ctx: DistContext, parts: Parts, trainer: Any, record: dict,
               wandb: Any) -> dict:
        return record


def register_job(kind: str, name: str) -> Callable[[type[Job]], type[Job]]:
    """Class decorator: make ``cls`` the job ``name`` of ``kind`` ('pretrain' or 'finetune')."""
    def add(cls: type[Job]) -> type[Job]:
        jobs = _REGISTRY.setdefault(kind, {})
        if name in jobs and jobs[name] is not cls:
            raise ValueError(f"{kind} job '{name}' is already registered ({jobs[name].__name__})")
        cls.kind, cls.name = kind, name
        jobs[name] = cls
        return cls
    return add


def get_job(kind: str, name: str) -> Job:
    """An instance of the registered job; an unknown name lists the registered ones."""
    jobs = _REGISTRY.get(kind, {})
    if name not in jobs:
        raise ValueError(f"unknown {kind} job '{name}'; registered: {', '.join(sorted(jobs)) or 'none'}")
    return jobs[name]()


def list_jobs(kind: str) -> list[str]:
    """Names of the registered jobs of ``kind``."""
    return sorted(_REGISTRY.get(kind, {}))
