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

This module is the loop only; what surrounds it are small policy objects it calls:
:class:`utils.engine.checkpointing.CheckpointPolicy` (what/when to save, resume),
:class:`utils.engine.faults.FaultPolicy` (non-finite steps, bad samples), :class:`utils.engine.steplog.StepLog`
(per-step values, epoch records), plus :mod:`utils.engine.amp`, :mod:`utils.engine.rng`,
:mod:`utils.engine.ema` and :mod:`utils.engine.batch`. Their public names used to live here and are
re-exported.

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
  sample (dataset attribute ``seeded_per_sample``, e.g. ``utils.data.seeding.PerSampleSeed``) or the loader has
  no workers, and replays them otherwise; with ``--deterministic`` the parameters then end bit-identical to
  an uninterrupted run (a replay is exact only with workers that are re-forked every epoch, not persistent
  ones). Every training loader of this project is seeded per sample, fine-tuning ones included.
* ``on_bad_sample='skip'``: unreadable samples are replaced by the next index and counted per epoch.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from utils.data.loader import ResumableBatchSampler, TrackedBatch, track_loader
from utils.engine.amp import AMP_DTYPES, autocast, make_grad_scaler, resolve_amp
from utils.engine.batch import infer_batch_size, move_to_device, no_sync, unwrap_model
from utils.engine.checkpointing import CheckpointPolicy
from utils.engine.ema import update_ema
from utils.engine.faults import FaultPolicy, NonFiniteLossError
from utils.engine.fsdp import is_fsdp, local_tensor
from utils.engine.preemption import StopRequest
from utils.engine.rng import _set_cuda_rng_state, get_rng_state, set_rng_state  # noqa: F401 (re-exported)
from utils.engine.steplog import StepLog
from utils.logger import MetricLogger

__all__ = [
    "AMP_DTYPES", "NonFiniteLossError", "Trainer", "StepFn", "Callback", "resolve_amp", "autocast",
    "make_grad_scaler", "move_to_device", "unwrap_model", "get_rng_state", "set_rng_state",
]

StepFn = Callable[[nn.Module, Any], "tuple[Tensor, Mapping[str, Tensor | float]]"]
Callback = Callable[["Trainer", int, dict], "dict | None"]


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
        log_prefix: prefix of the train statistics in ``log.txt`` (e.g. ``'[Epoch] '``).
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
        self.checkpointing = CheckpointPolicy(output_dir, save_ckpt, save_ckpt_freq, keep_last, best_metric,
                                              best_mode, save_every_steps, config)
        self.model, self.optimizer, self.step_fn = model, optimizer, step_fn
        self.lr_schedule, self.wd_schedule = lr_schedule, wd_schedule
        self.steps_per_epoch, self.epochs = int(steps_per_epoch), int(epochs)
        self.device = torch.device(device)
        self.amp = resolve_amp(amp, self.device)
        self.sharded = is_fsdp(model)  # --fsdp: sharded gradients, DCP checkpoints (utils.engine.dcp)
        self.scaler = make_grad_scaler(self.device, self.amp, sharded=self.sharded)
        self.clip_grad, self.skip_grad = clip_grad, skip_grad
        self.update_freq = max(1, int(update_freq))
        self.modules = dict(modules or {})
        self.model_ema = model_ema
        self.print_freq = max(1, int(print_freq))
        self.batch_size = batch_size
        self.epoch_start_hooks = list(epoch_start_hooks)
        self.faults = FaultPolicy(skip_nonfinite, on_bad_sample, self.steps_per_epoch)
        self.log = StepLog(self.device, self.faults, wandb, output_dir, log_prefix, extra_log)
        self.stop_check_every = max(1, int(stop_check_every))
        self.batch_transform = batch_transform
        self.start_epoch = 0
        self.start_step = 0  # optimizer steps of start_epoch already done (mid-epoch resume)
        self.global_step = 0
        self.stop: StopRequest | None = None
        self._epoch_rng: dict | None = None  # RNG state before the epoch's data iterator was created
        self._resume: dict | None = None  # per-rank state for a mid-epoch resume, used by the next epoch
        # Decided once, so a schedule passing through 0 (or a resumed group value) cannot switch a
        # group's decay off for good.
        self._decay_groups = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0) > 0]
        self._params = [p for g in optimizer.param_groups for p in g["params"]]

    # the policies' settings, where callers read them on the trainer
    output_dir = property(lambda self: self.checkpointing.output_dir, doc="checkpoint and log.txt folder")
    save_ckpt = property(lambda self: self.checkpointing.save_ckpt, doc="whether checkpoints are written")
    config = property(lambda self: self.checkpointing.config, doc="dict stored under 'args'")
    skip_nonfinite = property(lambda self: self.faults.skip_nonfinite, doc="non-finite steps allowed per run")
    on_bad_sample = property(lambda self: self.faults.on_bad_sample, doc="'error' | 'skip'")
    wandb = property(lambda self: self.log.wandb, doc="the W&B logger or None")

    @property
    def best_value(self) -> float | None:
        """Best ``best_metric`` value so far (restored on resume)."""
        return self.checkpointing.best_value

    @best_value.setter
    def best_value(self, value: float | None) -> None:
        self.checkpointing.best_value = value

    @property
    def nonfinite_skipped(self) -> int:
        """Non-finite optimizer steps skipped over the whole run (restored on resume)."""
        return self.faults.nonfinite_skipped

    @nonfinite_skipped.setter
    def nonfinite_skipped(self, value: int) -> None:
        self.faults.nonfinite_skipped = value

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
        norm = local_tensor(norm)  # a DTensor for sharded gradients
        if self.skip_nonfinite and self.faults.step_is_nonfinite(loss, norm, scaled=self.scaler is not None):
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

    def _forward_backward(self, batch: Any, last_micro: bool) -> tuple[Tensor, dict]:
        """One micro-batch: forward under autocast, (scaled) backward, DDP sync only on the last micro-batch.
        Returns the detached loss and the step's log record (device tensors)."""
        batch = move_to_device(batch, self.device)
        if self.batch_transform is not None:
            batch = self.batch_transform(batch)
        with contextlib.nullcontext() if last_micro else no_sync([self.model, *self.modules.values()]):
            with autocast(self.device, self.amp):
                loss, logs = self.step_fn(self.model, batch)
            scaled = loss / self.update_freq if self.update_freq > 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        record = {"loss": loss.detach(), **{k: (v.detach() if isinstance(v, Tensor) else v) for k, v in logs.items()}}
        record["_loss"] = loss.detach()
        return loss.detach(), record

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
        it = self._data_iter = iter(loader)
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
        self.log.pending = []
        self.optimizer.zero_grad(set_to_none=True)
        batches = itertools.islice(self._epoch_batches(loader, epoch, first), n_micro - first)
        hparams: dict[str, float] = {}
        bad_samples: set[str] = set()  # one message per bad file: a file met twice (a replacement chain) counts once
        step_loss, seen = None, first
        for local, batch in enumerate(ml.log_every(batches, self.print_freq, f"Epoch: [{epoch}]",
                                                   batch_size=self.batch_size, total=n_micro, start=first)):
            i = first + local
            seen = i + 1
            step_in_epoch, last_micro = i // self.update_freq, (i + 1) % self.update_freq == 0
            step = epoch * self.steps_per_epoch + step_in_epoch
            meta: dict[str, Any] = {}
            if isinstance(batch, TrackedBatch):
                meta["indices"] = batch.indices
                bad_samples.update(batch.bad)
                batch = batch.data
            if i % self.update_freq == 0:
                hparams = self.set_hparams(step)
                step_loss = None
            if self.batch_size is None:
                self.batch_size = infer_batch_size(batch)
            loss, record = self._forward_backward(batch, last_micro)
            if self.skip_nonfinite:
                step_loss = loss if step_loss is None else step_loss + loss
            if last_micro:
                record["grad_norm"] = self.optimizer_step(step_loss)
                self.global_step = step + 1
                if self.last_step_nonfinite:
                    meta["skipped"] = True
                    self.faults.skipped(step, step_in_epoch, epoch, record, meta)
                elif self.model_ema is not None:
                    update_ema(self.model_ema, self.model, step=self.global_step)
            record.update(hparams)
            self.log.add(step, step_in_epoch, record, meta)
            if local % self.print_freq == 0 or i == n_micro - 1:
                self.log.flush(ml, epoch, self.scaler)
            if last_micro and i < n_micro - 1:
                self._after_step(epoch, step_in_epoch + 1, ml)
        if seen < n_micro:
            raise RuntimeError(f"the data loader ended after {seen} batches; epoch {epoch} needs "
                               f"{n_micro} ({self.steps_per_epoch} steps x update_freq {self.update_freq})")
        ml.synchronize_between_processes()
        return self.faults.epoch_stats(ml.global_avg(), bad_samples, epoch)

    def _after_step(self, epoch: int, steps_done: int, ml: MetricLogger) -> None:
        """Step-boundary duties inside an epoch: periodic mid-epoch checkpoint, agreed stop."""
        stop = self.stop is not None and self.stop.agreed()
        periodic = self.checkpointing.periodic_due(self.global_step)
        if not (stop or periodic):
            return
        self.log.flush(ml, epoch, self.scaler)  # a non-finite loss must stop the run before anything is saved
        path = self.checkpointing.save_position(self, epoch, steps_done, ml, reason="stop" if stop else "periodic")
        if stop:
            self.checkpointing.exit_preempted(f"epoch {epoch}, step {steps_done}/{self.steps_per_epoch} "
                                              f"(global step {self.global_step})", path, self.stop)

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
        self.faults.dataset = getattr(train_loader, "dataset", None)
        record: dict = {}
        with StopRequest(check_every=self.stop_check_every) as stop:
            self.stop = stop
            try:
                for epoch in range(self.start_epoch, self.epochs):
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(epoch)
                    stats = self.train_one_epoch(loader, epoch)
                    record = self.log.epoch_record(stats)
                    for cb in callbacks:
                        extra = cb(self, epoch, stats)
                        if extra:
                            record.update(extra)
                    self.save_epoch(epoch, self.log.complete(record, epoch))  # the checkpoint keeps the line
                    self.log.write_epoch(record, epoch, self.global_step)
                    if epoch + 1 < self.epochs and stop.agreed():
                        self.checkpointing.exit_preempted(f"the end of epoch {epoch}", None, stop)
            except BaseException:
                self._shutdown_workers()
                raise
            finally:
                self.stop = None
        return record

    def _shutdown_workers(self) -> None:
        """Stop the data-loader workers of the current epoch now. Workers ignore SIGTERM (see
        :mod:`utils.data.loader`), so the SIGTERM-then-join of interpreter shutdown would wait for them
        forever while the traceback keeps the iterator alive; the loader's own shutdown ends them."""
        it, self._data_iter = getattr(self, "_data_iter", None), None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()

    def checkpoint_state(self, epoch: int, position: tuple[int, int] | None = None,
                         meters: MetricLogger | None = None) -> dict:
        """Everything needed to resume after ``epoch`` (see :meth:`CheckpointPolicy.state`). Collective."""
        return self.checkpointing.state(self, epoch, position, meters)

    def save_epoch(self, epoch: int, record: Mapping[str, Any] | None = None) -> None:
        """Save after ``epoch``: ``checkpoint-<epoch>.pth`` every ``save_ckpt_freq`` epochs and at the last
        epoch (``checkpoint-last.pth`` always points at the newest state), ``checkpoint-best.pth`` when
        ``best_metric`` improved. Collective."""
        self.checkpointing.save_epoch(self, epoch, record)

    def load_state(self, ckpt: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore a checkpoint dict (see :meth:`CheckpointPolicy.load_state`); a bare state dict only sets
        the model weights."""
        self.checkpointing.load_state(self, ckpt, source)

    def resume(self, path: str | None) -> bool:
        """Load ``path`` (from :func:`utils.checkpoint.resolve_resume`) if given: a checkpoint file, or the
        sharded directory of an ``--fsdp`` run (on any number of ranks); returns whether it did. A checkpoint
        of this ``output_dir`` whose epoch record is missing from log.txt (a kill between the two writes) puts
        it back."""
        if not path:
            return False
        ckpt = self.checkpointing.read(self, path)
        self.load_state(ckpt, source=str(path))
        if self.output_dir and os.path.realpath(os.path.dirname(os.path.realpath(path))) == \
                os.path.realpath(self.output_dir):  # this run's own log.txt
            self.log.restore_epoch(ckpt.get("log_record"))
        return True
