"""The one Trainer factory: what every method and task shares between "here is my step" and a running loop.

A pre-training method or fine-tuning task describes its training in a :class:`TrainingPlan` (step function,
parameter groups, peak learning rate, extra modules, ...); :func:`build_trainer` turns a plan plus the
typed config into a :class:`utils.engine.trainer.Trainer`: steps per epoch (with the debugging cap), the
optimizer, the per-step schedules, activation checkpointing, DDP or FSDP2 (``--fsdp``) / ``torch.compile``
wrapping and the loop's policies (checkpointing, fault handling, logging).
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from utils.config.job import JobConfig, OptimConfig
from utils.dist import DistContext, ddp_find_unused_parameters
from utils.engine.fsdp import apply_fsdp
from utils.engine.optim import cosine_scheduler, create_optimizer, weight_decay_scheduler
from utils.engine.trainer import StepFn, Trainer

__all__ = ["TrainingPlan", "peak_lr", "steps_per_epoch", "build_schedules", "wrap_model", "shard_model", "ddp_wrap",
           "count_params", "run_record", "build_trainer"]


@dataclass
class TrainingPlan:
    """What a method or task contributes to its Trainer.

    ``modules``: extra trainable modules, checkpointed under their key (e.g. the loss balancer, wrapped
    with :func:`ddp_wrap` by the job when it has parameters). ``fit_warmup``: shorten a warm-up that
    is longer than the run to the whole run (a few epochs of a full recipe's config) instead of
    failing. ``describe``: the start-up line, given the steps per epoch and the optimizer.
    """
    step_fn: StepFn
    param_groups: list[dict]
    lr: float
    modules: dict[str, nn.Module] = field(default_factory=dict)
    batch_transform: Callable[[Any], Any] | None = None
    model_ema: nn.Module | None = None
    log_prefix: str = "[Epoch] "
    best_metric: str | None = None
    best_mode: str = "max"
    epoch_start_hooks: list[Callable] = field(default_factory=list)
    fit_warmup: bool = False
    find_unused_parameters: bool | None = None
    describe: Callable[[int, torch.optim.Optimizer, int], str] | None = None


def peak_lr(optim: OptimConfig, batch_size: int, update_freq: int, world_size: int) -> tuple[float, str]:
    """``optim.lr`` when given, else ``blr * batch_size * update_freq * world_size / 256``; with a note
    saying which (for the start-up line)."""
    if optim.lr is not None:
        return float(optim.lr), "--lr"
    if optim.blr is None:
        raise ValueError("neither --lr nor --blr is set")
    lr = optim.blr * batch_size * update_freq * world_size / 256
    return lr, f"blr {optim.blr} x batch {batch_size} x update_freq {update_freq} x {world_size} processes / 256"


def steps_per_epoch(loader: DataLoader, update_freq: int = 1, cap: int | None = None) -> int:
    """Optimizer steps per epoch: full accumulation cycles of the loader, at most ``cap`` when set."""
    steps = len(loader) // max(1, update_freq)
    return min(steps, cap) if cap else steps


def build_schedules(optim: OptimConfig, lr: float, epochs: int, steps: int, fit_warmup: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-step lr (linear warm-up from ``warmup_lr``, then cosine to ``min_lr``) and weight decay."""
    warm_epochs, warm_steps = optim.warmup_epochs, optim.warmup_steps
    total = epochs * steps
    wanted = warm_steps if warm_steps > 0 else warm_epochs * steps
    if wanted > total and fit_warmup:
        print(f"warning: warm-up of {wanted} steps is longer than the run ({total} steps): warming up over the "
              "whole run")
        warm_epochs, warm_steps = 0, total
    elif wanted > total:  # the schedule is kept as it is (the run ends inside the warm-up)
        print(f"warning: warm-up of {wanted} steps is longer than the run ({total} steps): the learning rate "
              "never reaches its peak")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # cosine_scheduler's own warning: already said above
        lr_s = cosine_scheduler(lr, optim.min_lr, epochs, steps, warm_epochs, optim.warmup_lr, warm_steps)
    wd_s = weight_decay_scheduler(optim.weight_decay, optim.weight_decay_end, epochs, steps)
    return lr_s, wd_s


def wrap_model(model: nn.Module, ctx: DistContext, compile: bool = False, find_unused_parameters: bool = False
               ) -> nn.Module:
    """DDP (when several processes) and ``torch.compile`` around ``model``."""
    wrapped = model
    if ctx.world_size > 1:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def shard_model(model: nn.Module, ctx: DistContext, optimizer: torch.optim.Optimizer, plan: TrainingPlan,
                compile: bool = False) -> nn.Module:
    """``--fsdp`` on several processes: FSDP2 over ``model`` (one unit per transformer block) and over each
    extra module of ``plan`` with parameters, ``optimizer`` re-pointed at the shards; then ``torch.compile``."""
    if plan.model_ema is not None:
        raise ValueError("--fsdp does not support --model_ema (the EMA would need a full copy of the weights on "
                         "every rank); run without --model_ema or without --fsdp")
    wrapped = [k for k, m in plan.modules.items() if isinstance(m, DistributedDataParallel)]
    if wrapped:
        raise ValueError(f"--fsdp: the extra module(s) {wrapped} are already in DDP; build them with "
                         f"ddp_wrap(..., fsdp=True), which leaves them to the sharding")
    apply_fsdp(model, device=ctx.device, amp=ctx.amp, optimizer=optimizer, extra_modules=list(plan.modules.values()))
    return torch.compile(model) if compile else model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def ddp_wrap(module: nn.Module, ctx: DistContext, fsdp: bool = False) -> nn.Module:
    """``module`` in DDP when several processes train and it has parameters (e.g. a learned loss
    balancer, whose gradients must be averaged like the model's); unchanged otherwise, and under ``fsdp``
    (:func:`build_trainer` then shards it with the model)."""
    if not fsdp and ctx.world_size > 1 and any(True for _ in module.parameters()):
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    return module


def run_record(cfg: JobConfig, ctx: DistContext, lr: float) -> dict[str, Any]:
    """The ``'args'`` entry of checkpoints: the configuration plus what the run resolved from it (peak lr,
    precision, ranks), the same keys a checkpoint of the published code holds."""
    return {**cfg.to_dict(), "lr": lr, "amp": ctx.amp, "rank": ctx.rank, "world_size": ctx.world_size,
            "gpu": ctx.local_rank, "distributed": ctx.distributed, "dist_backend": ctx.backend}


def build_trainer(cfg: JobConfig, ctx: DistContext, model: nn.Module, loader: DataLoader, plan: TrainingPlan,
                  wandb: Any = None) -> Trainer:
    """The Trainer of a run: ``cfg`` gives epochs, batch, accumulation, the optimizer section, the
    checkpoint and runtime policies; ``ctx`` the device, world size and resolved precision."""
    update_freq = int(cfg.get("update_freq", 1) or 1)
    steps = steps_per_epoch(loader, update_freq, cfg.get("max_steps_per_epoch"))
    if steps < 1:
        raise ValueError(f"the train split ({len(loader.dataset)} samples) gives no full step of batch_size "
                         f"{cfg.get('batch_size')} x update_freq {update_freq} x {ctx.world_size} processes")
    optimizer = create_optimizer(cfg.optim, plan.param_groups, lr=plan.lr)
    lr_s, wd_s = build_schedules(cfg.optim, plan.lr, cfg.get("epochs"), steps, plan.fit_warmup)
    rt, ck = cfg.runtime, cfg.checkpoint
    if rt.grad_ckpt:
        model.set_grad_checkpointing(True)
    n_parameters = count_params(model)
    requested = cfg.dist.find_unused_params if plan.find_unused_parameters is None else plan.find_unused_parameters
    find_unused = ddp_find_unused_parameters(model, requested)  # forced on for heads that need it (DPT)
    if cfg.dist.fsdp and ctx.world_size > 1:
        wrapped = shard_model(model, ctx, optimizer, plan, rt.compile)
    else:
        wrapped = wrap_model(model, ctx, rt.compile, find_unused)
    if plan.describe is not None:
        print(plan.describe(steps, optimizer, n_parameters))
    return Trainer(wrapped, optimizer, plan.step_fn, lr_schedule=lr_s, wd_schedule=wd_s, steps_per_epoch=steps,
                   epochs=cfg.get("epochs"), device=ctx.device, amp=ctx.amp, clip_grad=cfg.optim.clip_grad,
                   skip_grad=cfg.optim.skip_grad, update_freq=update_freq, modules=plan.modules,
                   model_ema=plan.model_ema, output_dir=ck.output_dir, save_ckpt=ck.save_ckpt,
                   save_ckpt_freq=ck.save_ckpt_freq, keep_last=ck.keep_last, print_freq=rt.print_freq,
                   config=run_record(cfg, ctx, plan.lr), wandb=wandb, batch_size=cfg.get("batch_size"),
                   log_prefix=plan.log_prefix, best_metric=plan.best_metric, best_mode=plan.best_mode,
                   extra_log={"n_parameters": n_parameters}, epoch_start_hooks=plan.epoch_start_hooks,
                   save_every_steps=ck.save_every_steps, skip_nonfinite=rt.skip_nonfinite,
                   on_bad_sample=rt.on_bad_sample, batch_transform=plan.batch_transform)
