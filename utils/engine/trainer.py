"""The one training loop, shared by pre-training and the fine-tuning scripts.

A script builds its model, data loader, optimizer and schedules, writes a ``step_fn`` that does the
task-specific work, and hands everything to a :class:`Trainer`::

    def step_fn(model, batch):                  # batch is on the device (and through batch_transform),
                                                # autocast is active
        x, y = batch
        loss = criterion(model(x), y)
        return loss, {'loss': loss.detach()}    # logs: scalar tensors (or floats)

    trainer = Trainer(model, optimizer, step_fn, lr_schedule=lr_s, wd_schedule=wd_s,
                      steps_per_epoch=n, epochs=cfg.epochs, device=ctx.device, amp='bf16',
                      clip_grad=cfg.optim.clip_grad, output_dir=cfg.checkpoint.output_dir, config=cfg.to_dict())
    trainer.resume(resolve_resume(cfg.checkpoint))  # model, optimizer, scaler, extra modules, EMA, RNG, epoch
    trainer.fit(train_loader, callbacks=[eval_callback])

Per optimizer step: lr/wd are set from the precomputed schedules (``lr = lr_schedule[step] *
group['lr_scale']``; weight decay only for groups that start with ``weight_decay > 0``), the forward runs
under ``torch.autocast`` (``amp='bf16'|'fp16'|'none'``; a GradScaler only for fp16), ``update_freq``
micro-batches are accumulated (DDP gradient sync only on the last one), gradients are unscaled, clipped
(``clip_grad``) or the step is skipped when their norm reaches ``skip_grad``, the optimizer steps and the
EMA (timm ``ModelEmaV3``) is updated.

Nothing in the hot path waits for the device: logged values stay tensors and are converted in one batch
every ``print_freq`` steps. That is also where non-finite losses are detected (the run stops with
:class:`NonFiniteLossError` naming the step, its logged losses and the files of the batch, before any
checkpoint is written over the last good one: every save flushes the pending values first). With
``skip_nonfinite=N`` a step whose loss (or, without fp16 loss scaling, gradient) is not finite makes no
update instead, up to N times per run; that check needs the value on the host, so it synchronises once
per step. ``skip_grad`` needs the gradient norm on the host and therefore synchronises once per step; so
does the fp16 GradScaler (inside ``scaler.step``).

Faults (see :mod:`utils.engine.preemption` and :mod:`utils.data.loader`):

* SIGTERM/SIGUSR1 during :meth:`Trainer.fit`: all ranks stop at the same optimizer-step boundary, rank 0
  writes ``checkpoint-last.pth`` with the position inside the epoch, and :class:`utils.engine.preemption.Preempted`
  exits with code 75; ``resume`` continues from that very step.
* ``save_every_steps=N``: the same mid-epoch checkpoint every N optimizer steps (SIGKILL loses < N steps).
* Mid-epoch resume skips the batches already used without loading them when augmentation is seeded per
  sample (dataset attribute ``seeded_per_sample``, e.g. ``utils.pretrain.multimae.PerSampleSeed``) or the loader has
  no workers, and replays them otherwise; either way, with ``--deterministic``, the parameters end
  bit-identical to an uninterrupted run (persistent workers with worker-side randomness excepted).
* ``on_bad_sample='skip'``: unreadable samples are replaced by the next index and counted per epoch.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import math
import random
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from utils.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from utils.dist import all_gather_object, all_reduce_sum, barrier, get_rank, get_world_size, is_main_process
from utils.logger import MetricLogger, append_log_txt
from utils.engine.preemption import Preempted, StopRequest
from utils.data.loader import ResumableBatchSampler, TrackedBatch, describe_samples, track_loader

__all__ = [
    "AMP_DTYPES", "NonFiniteLossError", "Trainer", "StepFn", "Callback", "resolve_amp", "autocast",
    "make_grad_scaler", "move_to_device", "unwrap_model", "get_rng_state", "set_rng_state",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

StepFn = Callable[[nn.Module, Any], "tuple[Tensor, Mapping[str, Tensor | float]]"]
Callback = Callable[["Trainer", int, dict], "dict | None"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step, its logged values and the files
    of the batch."""


# ----------------------------------------------------------------------------------------------
# small helpers

def resolve_amp(amp: str | None, device: torch.device | str) -> str:
    """``'auto'``/None -> ``'fp16'`` on CUDA (the published setting) and ``'none'`` elsewhere; other
    values are checked against ``'bf16' | 'fp16' | 'none'``."""
    device = torch.device(device)
    if amp in (None, "auto"):
        return "fp16" if device.type == "cuda" else "none"
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {amp!r}; expected 'auto', 'bf16', 'fp16' or 'none'")
    return amp


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` on ``device`` (a null context for ``'none'``)."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(device: torch.device | str, amp: str) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for fp16, None otherwise (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type) if amp == "fp16" else None


def move_to_device(obj: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device`` (asynchronous copies from pinned
    memory on CUDA)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to_device(v, device, non_blocking) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, non_blocking) for v in obj)
    return obj


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (whose state_dict has the published
    keys)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def get_rng_state() -> dict:
    """Python, numpy, torch (CPU) and CUDA generator states of this process, as tensors and plain
    containers (loadable with ``torch.load(weights_only=True)``)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: resumable on fewer GPUs
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng_state(state["cuda"])


def _set_cuda_rng_state(saved: Tensor | Sequence[Tensor]) -> None:
    """Restore the current device's generator from one state (this process's device) or from a list with
    one per visible GPU (older checkpoints); warn, restoring nothing, when the list has no entry for it."""
    if isinstance(saved, Tensor):
        torch.cuda.set_rng_state(saved)
        return
    index = torch.cuda.current_device()
    if index < len(saved):
        torch.cuda.set_rng_state(saved[index])
    else:
        warnings.warn(f"checkpoint holds CUDA RNG states for {len(saved)} device(s), none for cuda:{index}; "
                      f"its generator is not restored (resume is not bit-identical)")


def _infer_batch_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = _infer_batch_size(item)
            if n is not None:
                return n
    return None


# ----------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Runs epochs of ``step_fn`` with schedules, AMP, accumulation, clipping, EMA, logging and
    checkpointing. See the module docstring for the per-step contract.

    Args:
        model: the module ``step_fn`` receives (may be DDP- or ``torch.compile``-wrapped; checkpoints
            store the unwrapped state dict under ``'model'``).
        optimizer: param groups carry ``lr_scale`` (default 1) and ``weight_decay``.
        step_fn: ``step_fn(model, batch) -> (loss, logs)``; ``loss`` is the scalar to minimise, ``logs``
            scalar tensors/floats to log (``'loss'`` defaults to the loss itself).
        lr_schedule / wd_schedule: one value per optimizer step (``epochs * steps_per_epoch``).
        steps_per_epoch: optimizer steps per epoch (each consumes ``update_freq`` batches).
        amp: ``'bf16' | 'fp16' | 'none' | 'auto'``.
        modules: extra trainable modules checkpointed under their key and restored on resume (e.g.
            ``{'loss_balancer': balancer}``); DDP-wrapped ones skip gradient sync during accumulation too.
        model_ema: a timm ``ModelEmaV3`` updated after every optimizer step, saved as ``'model_ema'``.
        config: plain dict stored under ``'args'`` in checkpoints.
        wandb: a ``utils.logger.WandbLogger`` (or None): every step's values at the print interval, the
            epoch record at the end of each epoch.
        batch_size: samples per batch per process, for the images/s figure (inferred when None).
        log_prefix: prefix of the train statistics in ``log.txt`` (published: ``'[Epoch] '``).
        best_metric / best_mode: save ``checkpoint-best.pth`` when this key of the epoch record improves.
        extra_log: constant entries added to every epoch record (e.g. ``n_parameters``).
        epoch_start_hooks: ``hook(trainer, epoch)`` called after ``model.train()`` at each epoch start.
        save_every_steps: also write ``checkpoint-last.pth`` (with the position in the epoch) every N optimizer
            steps; 0 = only at epoch ends.
        skip_nonfinite: skip up to N optimizer steps with a non-finite loss/gradient (no update, counted in
            the log) before stopping; 0 = stop at the first.
        on_bad_sample: ``'error'`` (stop, naming the file) or ``'skip'`` (replace the sample by the next one,
            count it).
        stop_check_every: optimizer steps between two stop-flag reductions across ranks (see
            :mod:`utils.engine.preemption`).
        batch_transform: applied to every batch on the device, before autocast and ``step_fn`` (e.g.
            :meth:`utils.data.transforms.PretrainTransform.finish`, which normalises uint8 rgb there).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, step_fn: StepFn, *,
                 lr_schedule: Sequence[float], wd_schedule: Sequence[float] | None = None,
                 steps_per_epoch: int, epochs: int, device: torch.device | str = "cpu",
                 amp: str = "none", clip_grad: float | None = None, skip_grad: float | None = None,
                 update_freq: int = 1, modules: Mapping[str, nn.Module] | None = None,
                 model_ema: nn.Module | None = None, output_dir: str = "", save_ckpt: bool = True,
                 save_ckpt_freq: int = 20, keep_last: int | None = None, print_freq: int = 20,
                 config: Mapping[str, Any] | None = None, wandb: Any = None, batch_size: int | None = None,
                 log_prefix: str = "[Epoch] ", best_metric: str | None = None, best_mode: str = "max",
                 extra_log: Mapping[str, Any] | None = None,
                 epoch_start_hooks: Iterable[Callable[["Trainer", int], None]] = (),
                 save_every_steps: int = 0, skip_nonfinite: int = 0,
                 on_bad_sample: str = "error", stop_check_every: int = 1,
                 batch_transform: Callable[[Any], Any] | None = None):
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the dataset smaller "
                             f"than one batch per process?)")
        if len(lr_schedule) < epochs * steps_per_epoch:
            raise ValueError(f"lr_schedule has {len(lr_schedule)} values; {epochs} epochs x {steps_per_epoch} "
                             f"steps need {epochs * steps_per_epoch}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        self.lr_schedule, self.wd_schedule = lr_schedule, wd_schedule
        self.steps_per_epoch, self.epochs = int(steps_per_epoch), int(epochs)
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        self.scaler = make_grad_scaler(self.device, self.amp)
        self.clip_grad, self.skip_grad = clip_grad, skip_grad
        self.update_freq = max(1, int(update_freq))
        self.modules = dict(modules or {})
        self.model_ema = model_ema
        self.output_dir, self.save_ckpt = output_dir, save_ckpt
        self.save_ckpt_freq, self.keep_last = max(1, int(save_ckpt_freq)), keep_last
        self.print_freq = max(1, int(print_freq))
        self.config = dict(config or {})
        self.wandb = wandb
        self.batch_size = batch_size
        self.log_prefix = log_prefix
        self.best_metric, self.best_mode, self.best_value = best_metric, best_mode, None
        self.extra_log = dict(extra_log or {})
        self.epoch_start_hooks = list(epoch_start_hooks)
        self.save_every_steps = max(0, int(save_every_steps or 0))
        self.skip_nonfinite = max(0, int(skip_nonfinite or 0))
        self.on_bad_sample = str(on_bad_sample or "error")
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        self.stop_check_every = max(1, int(stop_check_every))
        self.batch_transform = batch_transform
        self.start_epoch = 0
        self.start_step = 0  # optimizer steps of start_epoch already done (mid-epoch resume)
        self.global_step = 0
        self.nonfinite_skipped = 0  # over the whole run, restored on resume
        self.stop: StopRequest | None = None
        self._train_dataset: Any = None
        self._epoch_rng: dict | None = None  # RNG state before the epoch's data iterator was created
        self._resume: dict | None = None  # per-rank state for a mid-epoch resume, used by the next epoch
        # Decided once, so a schedule passing through 0 (or a resumed group value) cannot switch a
        # group's decay off for good.
        self._decay_groups = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0) > 0]
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------------------------------
    # one step

    def set_hparams(self, step: int) -> dict[str, float]:
        """Write lr/wd of optimizer step ``step`` into the param groups; returns lr, min_lr, weight_decay."""
        if step >= len(self.lr_schedule):
            raise IndexError(f"optimizer step {step} is beyond the lr schedule ({len(self.lr_schedule)} steps)")
        lr = float(self.lr_schedule[step])
        groups = self.optimizer.param_groups
        for g in groups:
            g["lr"] = lr * float(g.get("lr_scale", 1.0))
        if self.wd_schedule is not None:
            wd = float(self.wd_schedule[step])
            for i in self._decay_groups:
                groups[i]["weight_decay"] = wd
        lrs = [g["lr"] for g in groups]
        wds = [groups[i]["weight_decay"] for i in self._decay_groups]
        return {"lr": max(lrs), "min_lr": min(lrs), "weight_decay": max(wds) if wds else 0.0}

    def _ddp_modules(self) -> list[DistributedDataParallel]:
        return [m for m in [self.model, *self.modules.values()] if isinstance(m, DistributedDataParallel)]

    def _no_sync(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for m in self._ddp_modules():
            stack.enter_context(m.no_sync())
        return stack

    def _nonfinite(self, loss: Tensor | None, norm: Tensor) -> bool:
        """Whether this step's loss (or gradient norm, when no GradScaler handles overflows) is NaN/inf on
        any rank. One host sync (and one tiny all-reduce with several processes)."""
        bad = torch.zeros((), dtype=torch.bool, device=norm.device)
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach().float()).to(norm.device)
        if self.scaler is None:
            bad = bad | ~torch.isfinite(norm)
        if get_world_size() > 1:
            return bool(all_reduce_sum(bad.to(torch.int32)) > 0)
        return bool(bad)

    def optimizer_step(self, loss: Tensor | None = None) -> Tensor:
        """Unscale, clip or measure the gradient norm, step (unless ``skip_grad`` says no, or the step is
        non-finite and ``skip_nonfinite`` is on: then ``last_step_nonfinite`` is set), zero grads.
        ``loss``: the step's loss, checked only with ``skip_nonfinite``. Returns the total gradient 2-norm
        as a device tensor."""
        self.last_step_nonfinite = False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
        if self.skip_nonfinite and self._nonfinite(loss, norm):
            self.last_step_nonfinite = True
            if self.scaler is not None:
                self.scaler.update()  # unscale_ was called: the scaler must close this step
            self.optimizer.zero_grad(set_to_none=True)
            return norm.detach()
        skip = self.clip_grad is None and self.skip_grad is not None and bool(norm >= self.skip_grad)
        if not skip:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    # ------------------------------------------------------------------------------------------
    # one epoch

    def _epoch_batches(self, loader: Iterable, epoch: int, skip: int) -> Iterator:
        """The data iterator of ``epoch`` starting ``skip`` batches in, with the RNG stream of the run that
        was interrupted there (mid-epoch resume) or as it is (normal epochs)."""
        resume = self._resume if skip else None
        self._resume = None
        if resume is not None and resume.get("rng_epoch_start") is not None:
            set_rng_state(resume["rng_epoch_start"])  # the state this epoch's iterator was created from
        self._epoch_rng = get_rng_state()
        sampler = getattr(loader, "batch_sampler", None)
        inner = getattr(getattr(loader, "dataset", None), "dataset", None)  # under the SampleGuard
        fast = isinstance(sampler, ResumableBatchSampler) and (
            getattr(loader, "num_workers", 0) == 0 or getattr(inner, "seeded_per_sample", False))
        if skip and fast:
            sampler.skip_next(skip)  # indices drawn, nothing loaded
        it = iter(loader)
        if skip and not fast:
            print(f"Replaying {skip} batches of epoch {epoch} to reach the resume position (the dataset is not "
                  f"seeded per sample, so its worker RNG streams must see them)")
            for _ in range(skip):
                next(it)
        if resume is not None:
            set_rng_state(resume["rng"])
        return it

    def train_one_epoch(self, loader: Iterable, epoch: int) -> dict[str, float]:
        """Run the (remaining) ``steps_per_epoch`` optimizer steps of ``epoch``; returns the epoch averages
        (all ranks). Raises :class:`utils.engine.preemption.Preempted` after saving when a stop was agreed."""
        self.model.train()
        for m in self.modules.values():
            m.train()
        for hook in self.epoch_start_hooks:
            hook(self, epoch)
        start = self.start_step if epoch == self.start_epoch else 0
        n_micro, first = self.steps_per_epoch * self.update_freq, start * self.update_freq
        ml = MetricLogger(delimiter="  ")
        if start and self._resume is not None:
            ml.restore(self._resume.get("meters") or {})
        pending: list[tuple[int, int, dict, dict]] = []
        self.optimizer.zero_grad(set_to_none=True)
        batches = itertools.islice(self._epoch_batches(loader, epoch, first), n_micro - first)
        batch_size = self.batch_size
        hparams: dict[str, float] = {}
        bad_samples = 0
        step_loss: Tensor | None = None
        seen = first
        for local, batch in enumerate(ml.log_every(batches, self.print_freq, f"Epoch: [{epoch}]",
                                                   batch_size=batch_size, total=n_micro - first)):
            i = first + local
            seen = i + 1
            step_in_epoch, last_micro = i // self.update_freq, (i + 1) % self.update_freq == 0
            step = epoch * self.steps_per_epoch + step_in_epoch
            meta: dict[str, Any] = {}
            if isinstance(batch, TrackedBatch):
                meta["indices"] = batch.indices
                bad_samples += len(batch.bad)
                batch = batch.data
            if i % self.update_freq == 0:
                hparams = self.set_hparams(step)
                step_loss = None
            if batch_size is None:
                batch_size = self.batch_size = _infer_batch_size(batch)
            loss, record = self._forward_backward(batch, last_micro)
            if self.skip_nonfinite:
                step_loss = loss if step_loss is None else step_loss + loss
            if last_micro:
                record["grad_norm"] = self.optimizer_step(step_loss)
                self.global_step = step + 1
                if self.last_step_nonfinite:
                    meta["skipped"] = True
                    self._skipped_nonfinite(step, step_in_epoch, epoch, record, meta)
                elif self.model_ema is not None:
                    self.model_ema.update(unwrap_model(self.model), step=self.global_step)
            record.update(hparams)
            pending.append((step, step_in_epoch, record, meta))
            if local % self.print_freq == 0 or i == n_micro - 1:
                self._flush(pending, ml, epoch)
                pending = []
            if last_micro and i < n_micro - 1:
                self._after_step(epoch, step_in_epoch + 1, ml, pending)
        if seen < n_micro:
            raise RuntimeError(f"the data loader ended after {seen} batches; epoch {epoch} needs "
                               f"{n_micro} ({self.steps_per_epoch} steps x update_freq {self.update_freq})")
        return self._epoch_stats(ml, epoch, bad_samples)

    def _forward_backward(self, batch: Any, last_micro: bool) -> tuple[Tensor, dict]:
        """One micro-batch: forward under autocast, (scaled) backward, DDP sync only on the last micro-batch.
        Returns the detached loss and the step's log record (device tensors)."""
        batch = move_to_device(batch, self.device)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        with contextlib.nullcontext() if last_micro else self._no_sync():
            with autocast(self.device, self.amp):
                loss, logs = self.step_fn(self.model, batch)
            scaled = loss / self.update_freq if self.update_freq > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        record = {"loss": loss.detach(), **{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in logs.items()}}
        record["_loss"] = loss.detach()
        return loss.detach(), record

    def _epoch_stats(self, ml: MetricLogger, epoch: int, bad_samples: int) -> dict[str, float]:
        """Epoch averages over all ranks, plus the bad-sample and skipped-step counts when those are on."""
        ml.synchronize_between_processes()
        stats = ml.global_avg()
        if self.on_bad_sample == "skip":
            stats["bad_samples"] = int(all_reduce_sum(torch.tensor(bad_samples)).item())
            if stats["bad_samples"]:
                print(f"Epoch {epoch}: {stats['bad_samples']} bad sample(s) skipped (replaced by the next sample)")
        if self.skip_nonfinite:
            stats["nonfinite_skipped"] = self.nonfinite_skipped
        return stats

    def _after_step(self, epoch: int, steps_done: int, ml: MetricLogger, pending: list) -> None:
        """Step-boundary duties inside an epoch: periodic mid-epoch checkpoint, agreed stop."""
        stop = self.stop is not None and self.stop.agreed()
        periodic = self.save_every_steps and self.global_step % self.save_every_steps == 0
        if not (stop or periodic):
            return
        self._flush(pending, ml, epoch)  # a non-finite loss must stop the run before anything is saved
        pending.clear()
        path = self._save_position(epoch, steps_done, ml, reason="stop" if stop else "periodic")
        if stop:
            self._exit_preempted(f"epoch {epoch}, step {steps_done}/{self.steps_per_epoch} "
                                 f"(global step {self.global_step})", path)

    def _save_position(self, epoch: int, steps_done: int, ml: MetricLogger, reason: str) -> Any:
        """checkpoint-last.pth with the position inside ``epoch`` (collective)."""
        if not self.output_dir or not self.save_ckpt:
            return None
        if self.stop is not None and reason == "stop":
            self.stop.saving = True
        state = self.checkpoint_state(epoch - 1, position=(epoch, steps_done), meters=ml)
        path = save_checkpoint(self.output_dir, "last", state)
        if path is not None and reason == "periodic":
            print(f"Saved {path} (epoch {epoch}, step {steps_done}/{self.steps_per_epoch})")
        return path

    def _exit_preempted(self, where: str, path: Any) -> None:
        barrier()  # nobody exits (and makes torchrun kill the others) before rank 0 has written the file
        why = self.stop.reason if self.stop is not None else "stop requested"
        if self.output_dir and self.save_ckpt:
            path = path or os.path.join(self.output_dir, "checkpoint-last.pth")
            msg = (f"Stopped at {where} ({why}); checkpoint {path} written. Start again with the same output_dir "
                   f"to resume from there (exit code 75).")
        else:
            msg = (f"Stopped at {where} ({why}); no checkpoint written (no output_dir or checkpoints disabled; "
                   f"exit code 75).")
        print(msg, flush=True)
        raise Preempted(msg)

    def _skipped_nonfinite(self, step: int, step_in_epoch: int, epoch: int, record: dict, meta: dict) -> None:
        self.nonfinite_skipped += 1
        losses = ", ".join(f"{k}={float(v):.6g}" for k, v in record.items()
                           if not k.startswith("_") and k not in ("lr", "min_lr", "weight_decay"))
        where = (f"epoch {epoch}, step {step_in_epoch}/{self.steps_per_epoch} (global step {step}); {losses}; "
                 f"samples: {'; '.join(self._describe(meta)) or 'unknown'}")
        if self.nonfinite_skipped > self.skip_nonfinite:
            raise NonFiniteLossError(f"non-finite loss or gradient at {where}. That is {self.nonfinite_skipped} "
                                     f"non-finite steps, more than --skip_nonfinite {self.skip_nonfinite}; stopping "
                                     f"without saving a checkpoint.")
        print(f"Skipped non-finite step ({self.nonfinite_skipped}/{self.skip_nonfinite} allowed, no update): {where}",
              flush=True)

    def _describe(self, meta: dict) -> list[str]:
        if "indices" not in meta or self._train_dataset is None:
            return []
        return describe_samples(self._train_dataset, meta["indices"])

    def _flush(self, pending: list[tuple[int, int, dict, dict]], ml: MetricLogger, epoch: int) -> None:
        """Turn the pending per-step tensors into numbers (one host sync), check the loss, feed the
        console meters and W&B. Collective with several processes (all ranks flush at the same steps and
        agree on a non-finite loss, so they stop together)."""
        tensors = [v for _, _, rec, _ in pending for v in rec.values() if isinstance(v, Tensor)]
        numbers = iter(torch.stack([t.reshape(()).float().to(self.device) for t in tensors]).tolist()) \
            if tensors else iter(())
        rows, bad = [], None
        for step, step_in_epoch, rec, meta in pending:
            values = {k: (next(numbers) if isinstance(v, Tensor) else float(v)) for k, v in rec.items()}
            raw_loss = values.pop("_loss")
            if meta.get("skipped"):
                continue  # reported when it happened; NaNs stay out of the averages
            if bad is None and not math.isfinite(raw_loss):
                bad = (step, step_in_epoch, raw_loss, values, meta)
            rows.append((step, values))
        anywhere = bad is not None
        if get_world_size() > 1:
            anywhere = bool(all_reduce_sum(torch.tensor([int(anywhere)], dtype=torch.int32)).item())
        if anywhere:
            raise NonFiniteLossError(self._nonfinite_message(epoch, bad, len(pending)))
        for step, values in rows:
            ml.update(**values)
            if self.wandb is not None:
                self.wandb.log(values, step=step)
        if self.scaler is not None:
            ml.update(loss_scale=self.scaler.get_scale())

    def _nonfinite_message(self, epoch: int, bad: tuple | None, window: int) -> str:
        hint = "\n(--skip_nonfinite N skips up to N such steps)" if not self.skip_nonfinite else ""
        if bad is None:
            return (f"non-finite loss on another process within the last {window} steps of epoch {epoch} (see its "
                    f"message); stopping without saving a checkpoint{hint}")
        step, step_in_epoch, raw_loss, values, meta = bad
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items() if k not in ("lr", "min_lr", "weight_decay"))
        files = self._describe(meta)
        return (f"non-finite loss {raw_loss} at epoch {epoch}, step {step_in_epoch}/{self.steps_per_epoch} "
                f"(global step {step}); stopping without saving a checkpoint. Logged values: {shown}"
                + ("\nsamples of this batch:\n  " + "\n  ".join(files) if files else "") + hint)

    # ------------------------------------------------------------------------------------------
    # epochs, checkpoints, resume

    def fit(self, train_loader: Iterable, sampler: Any = None, callbacks: Sequence[Callback] = ()) -> dict:
        """Train from ``start_epoch`` (and ``start_step``) to ``epochs``. Per epoch: ``sampler.set_epoch(epoch)``
        (default: the loader's sampler), :meth:`train_one_epoch`, each callback ``cb(trainer, epoch,
        train_stats)`` (its returned dict is merged into the epoch record; runs on every rank), checkpoint,
        one JSON line in ``output_dir/log.txt``, W&B. SIGTERM/SIGUSR1 stop the run at the next step boundary
        with a checkpoint (:class:`utils.engine.preemption.Preempted`, exit code 75). Returns the last epoch record."""
        sampler = sampler if sampler is not None else getattr(train_loader, "sampler", None)
        tracked = track_loader(train_loader, self.on_bad_sample)
        loader = tracked if tracked is not None else train_loader
        self._train_dataset = getattr(train_loader, "dataset", None)
        record: dict = {}
        with StopRequest(check_every=self.stop_check_every) as stop:
            self.stop = stop
            try:
                for epoch in range(self.start_epoch, self.epochs):
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(epoch)
                    stats = self.train_one_epoch(loader, epoch)
                    record = {f"{self.log_prefix}{k}": v for k, v in stats.items()}
                    for cb in callbacks:
                        extra = cb(self, epoch, stats)
                        if extra:
                            record.update(extra)
                    self.save_epoch(epoch, record)
                    record.update(self.extra_log)
                    record["epoch"] = epoch
                    append_log_txt(self.output_dir, record)
                    if self.wandb is not None:
                        self.wandb.log(record, step=self.global_step)
                    if epoch + 1 < self.epochs and stop.agreed():
                        self._exit_preempted(f"the end of epoch {epoch}", None)
            finally:
                self.stop = None
        return record

    def checkpoint_state(self, epoch: int, position: tuple[int, int] | None = None,
                         meters: MetricLogger | None = None) -> dict:
        """Everything needed to resume after ``epoch``: model, optimizer, scaler, extra modules, EMA,
        epoch, global step, best value, config and the RNG states of every rank. ``position=(e, s)``: a
        mid-epoch state after ``s`` optimizer steps of epoch ``e`` (``epoch`` is then ``e - 1``, the last
        complete one), with each rank's RNG state at the start of ``e`` and its running averages
        (``meters``). Collective (gathers per-rank states)."""
        rng = all_gather_object(get_rng_state())
        state = {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "args": self.config,
            "rng": rng,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        if self.best_value is not None:
            state["best_value"] = self.best_value
        if position is not None:
            e, s = position
            state["data_position"] = {"epoch": e, "step": s, "steps_per_epoch": self.steps_per_epoch,
                                      "update_freq": self.update_freq}
            mine = {"rng_epoch_start": self._epoch_rng,
                    "meters": meters.state() if meters is not None else {}}
            state["rank_state"] = all_gather_object(mine)
        for name, m in self.modules.items():
            state[name] = unwrap_model(m).state_dict()
        if self.model_ema is not None:
            state["model_ema"] = unwrap_model(getattr(self.model_ema, "module", self.model_ema)).state_dict()
        return state

    def save_epoch(self, epoch: int, record: Mapping[str, Any] | None = None) -> None:
        """Save after ``epoch``: ``checkpoint-<epoch>.pth`` every ``save_ckpt_freq`` epochs and at the last
        epoch (``checkpoint-last.pth`` always points at the newest state), ``checkpoint-best.pth`` when
        ``best_metric`` improved. Collective."""
        if not self.output_dir or not self.save_ckpt:
            return
        better = False
        if self.best_metric and record is not None and self.best_metric in record:
            value = float(record[self.best_metric])
            better = self.best_value is None or (value > self.best_value if self.best_mode == "max"
                                                 else value < self.best_value)
            if better:
                self.best_value = value
        state = self.checkpoint_state(epoch)
        numbered = (epoch + 1) % self.save_ckpt_freq == 0 or epoch + 1 == self.epochs
        save_checkpoint(self.output_dir, epoch if numbered else "last", state, keep_last=self.keep_last)
        if better:
            save_checkpoint(self.output_dir, "best", state)

    def load_state(self, ckpt: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore a checkpoint dict: model (strict); and when it holds ``optimizer`` and ``epoch``: the
        optimizer, scaler, extra modules, EMA, RNG states (same world size), best value, the next epoch and,
        for a mid-epoch checkpoint, the step inside it. A bare state dict (e.g. from ``.safetensors``) only
        sets the model weights."""
        if "model" in ckpt:
            weights = ckpt["model"]
        elif ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            weights, ckpt = ckpt, {}
        else:
            raise CheckpointError(f"{source} has no 'model' entry (keys: {sorted(map(str, ckpt))[:10]}); expected a "
                                  f"training checkpoint or a bare state dict")
        load_model_state(unwrap_model(self.model), weights, strict=True, source=source)
        if "optimizer" not in ckpt or not isinstance(ckpt.get("epoch"), int):
            print(f"Loaded model weights from {source} (no optimizer state: starting at epoch {self.start_epoch})")
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch, self.start_step = ckpt["epoch"] + 1, 0
        self.global_step = self.start_epoch * self.steps_per_epoch
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for name, m in self.modules.items():
            if ckpt.get(name):
                unwrap_model(m).load_state_dict(ckpt[name])
            elif any(True for _ in m.parameters()):
                warnings.warn(f"{source} has no '{name}' state; it keeps its initial values")
        if self.model_ema is not None:
            if "model_ema" in ckpt:
                unwrap_model(getattr(self.model_ema, "module", self.model_ema)).load_state_dict(ckpt["model_ema"])
            else:
                warnings.warn(f"{source} has no 'model_ema'; the EMA restarts from the current weights")
        if "best_value" in ckpt:
            self.best_value = ckpt["best_value"]
        self.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        rng = ckpt.get("rng")
        same_world = isinstance(rng, list) and len(rng) == get_world_size()
        if self._load_position(ckpt, source, rng if same_world else None):
            where = f"epoch {self.start_epoch}, step {self.start_step}/{self.steps_per_epoch}"
        else:
            where = f"epoch {self.start_epoch}"
            if same_world:
                set_rng_state(rng[get_rank()])
            elif rng is not None:
                print(f"RNG states in {source} are for {len(rng)} process(es), not {get_world_size()}: not restored")
        print(f"Resumed from {source}: continuing at {where} (global step {self.global_step})")

    def _load_position(self, ckpt: Mapping[str, Any], source: str, rng: list | None) -> bool:
        """Set up a mid-epoch resume from ``ckpt['data_position']``; False when there is none (or it cannot
        be honoured: other steps per epoch, other number of processes -> the epoch restarts)."""
        pos = ckpt.get("data_position")
        if not pos:
            return False
        ranks = ckpt.get("rank_state")
        if (pos.get("steps_per_epoch") != self.steps_per_epoch or pos.get("update_freq") != self.update_freq
                or rng is None or not isinstance(ranks, list) or len(ranks) != get_world_size()):
            warnings.warn(f"{source} was saved at step {pos.get('step')} of epoch {pos.get('epoch')} by a run with "
                          f"{pos.get('steps_per_epoch')} steps per epoch (update_freq {pos.get('update_freq')}) on "
                          f"{len(ranks) if isinstance(ranks, list) else '?'} process(es); this run differs, so epoch "
                          f"{self.start_epoch} restarts from its first step")
            return False
        self.start_step = int(pos["step"])
        self.global_step = self.start_epoch * self.steps_per_epoch + self.start_step
        self._resume = {"rng": rng[get_rank()], **ranks[get_rank()]}
        return True

    def resume(self, path: str | None) -> bool:
        """Load ``path`` (from :func:`utils.checkpoint.resolve_resume`) if given; returns whether it did."""
        if not path:
            return False
        self.load_state(load_checkpoint(path, map_location="cpu"), source=str(path))
        return True
