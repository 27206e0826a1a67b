"""The one training loop, shared by pre-training and the fine-tuning scripts.

A script builds its model, data loader, optimizer and schedules, writes a ``step_fn`` that does the
task-specific work, and hands everything to a :class:`Trainer`::

    def step_fn(model, batch):                  # batch is already on the device, autocast is active
        x, y = batch
        loss = criterion(model(x), y)
        return loss, {'loss': loss.detach()}    # logs: scalar tensors (or floats)

    trainer = Trainer(model, optimizer, step_fn, lr_schedule=lr_s, wd_schedule=wd_s,
                      steps_per_epoch=n, epochs=args.epochs, device=device, amp='bf16',
                      clip_grad=args.clip_grad, output_dir=args.output_dir, config=args_to_dict(args))
    trainer.resume(resolve_resume(args))        # model, optimizer, scaler, extra modules, EMA, RNG, epoch
    trainer.fit(train_loader, callbacks=[eval_callback])

Per optimizer step: lr/wd are set from the precomputed schedules (``lr = lr_schedule[step] *
group['lr_scale']``; weight decay only for groups that start with ``weight_decay > 0``), the forward runs
under ``torch.autocast`` (``amp='bf16'|'fp16'|'none'``; a GradScaler only for fp16), ``update_freq``
micro-batches are accumulated (DDP gradient sync only on the last one), gradients are unscaled, clipped
(``clip_grad``) or the step is skipped when their norm reaches ``skip_grad``, the optimizer steps and the
EMA (timm ``ModelEmaV3``) is updated.

Nothing in the hot path waits for the device: logged values stay tensors and are converted in one batch
every ``print_freq`` steps. That is also where non-finite losses are detected (the run stops with
:class:`NonFiniteLossError` naming the step and its logged losses, before any checkpoint is written
over the last good one). ``skip_grad`` needs the gradient norm on the host and therefore synchronises
once per step; so does the fp16 GradScaler (inside ``scaler.step``).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from utils.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from utils.dist import all_gather_object, get_rank, get_world_size, is_main_process
from utils.logger import MetricLogger, append_log_txt

__all__ = [
    "AMP_DTYPES", "NonFiniteLossError", "Trainer", "StepFn", "Callback", "resolve_amp", "autocast",
    "make_grad_scaler", "move_to_device", "unwrap_model", "get_rng_state", "set_rng_state",
]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}

StepFn = Callable[[nn.Module, Any], "tuple[Tensor, Mapping[str, Tensor | float]]"]
Callback = Callable[["Trainer", int, dict], "dict | None"]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step and its logged values."""


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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
                 epoch_start_hooks: Iterable[Callable[["Trainer", int], None]] = ()):
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
        self.start_epoch = 0
        self.global_step = 0
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

    def optimizer_step(self) -> Tensor:
        """Unscale, clip or measure the gradient norm, step (unless ``skip_grad`` says no), zero grads.
        Returns the total gradient 2-norm as a device tensor."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if self.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros((), device=self.device)
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

    def train_one_epoch(self, loader: Iterable, epoch: int) -> dict[str, float]:
        """Run ``steps_per_epoch`` optimizer steps; returns the epoch averages (all ranks)."""
        self.model.train()
        for m in self.modules.values():
            m.train()
        for hook in self.epoch_start_hooks:
            hook(self, epoch)
        n_micro = self.steps_per_epoch * self.update_freq
        ml = MetricLogger(delimiter="  ")
        pending: list[tuple[int, int, dict]] = []
        self.optimizer.zero_grad(set_to_none=True)
        batches = itertools.islice(loader, n_micro)
        batch_size = self.batch_size
        hparams: dict[str, float] = {}
        seen = 0
        for i, batch in enumerate(ml.log_every(batches, self.print_freq, f"Epoch: [{epoch}]",
                                               batch_size=batch_size, total=n_micro)):
            seen = i + 1
            step_in_epoch, last_micro = i // self.update_freq, (i + 1) % self.update_freq == 0
            step = epoch * self.steps_per_epoch + step_in_epoch
            if i % self.update_freq == 0:
                hparams = self.set_hparams(step)
            if batch_size is None:
                batch_size = self.batch_size = _infer_batch_size(batch)
            batch = move_to_device(batch, self.device)
            with contextlib.nullcontext() if last_micro else self._no_sync():
                with autocast(self.device, self.amp):
                    loss, logs = self.step_fn(self.model, batch)
                scaled = loss / self.update_freq if self.update_freq > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            record = {"loss": loss.detach(), **{k: (v.detach() if isinstance(v, Tensor) else v)
                                                 for k, v in logs.items()}}
            record["_loss"] = loss.detach()
            if last_micro:
                record["grad_norm"] = self.optimizer_step()
                self.global_step = step + 1
                if self.model_ema is not None:
                    self.model_ema.update(unwrap_model(self.model), step=self.global_step)
            record.update(hparams)
            pending.append((step, step_in_epoch, record))
            if i % self.print_freq == 0 or i == n_micro - 1:
                self._flush(pending, ml, epoch)
                pending = []
        if seen < n_micro:
            raise RuntimeError(f"the data loader ended after {seen} batches; epoch {epoch} needs "
                               f"{n_micro} ({self.steps_per_epoch} steps x update_freq {self.update_freq})")
        ml.synchronize_between_processes()
        return ml.global_avg()

    def _flush(self, pending: list[tuple[int, int, dict]], ml: MetricLogger, epoch: int) -> None:
        """Turn the pending per-step tensors into numbers (one host sync), check the loss, feed the
        console meters and W&B."""
        tensors = [v for _, _, rec in pending for v in rec.values() if isinstance(v, Tensor)]
        numbers = iter(torch.stack([t.reshape(()).float().to(self.device) for t in tensors]).tolist()) \
            if tensors else iter(())
        for step, step_in_epoch, rec in pending:
            values = {k: (next(numbers) if isinstance(v, Tensor) else float(v)) for k, v in rec.items()}
            raw_loss = values.pop("_loss")
            if not math.isfinite(raw_loss):
                shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items() if k not in ("lr", "min_lr", "weight_decay"))
                raise NonFiniteLossError(
                    f"non-finite loss {raw_loss} at epoch {epoch}, step {step_in_epoch}/{self.steps_per_epoch} "
                    f"(global step {step}); stopping without saving a checkpoint. Logged values: {shown}")
            ml.update(**values)
            if self.wandb is not None:
                self.wandb.log(values, step=step)
        if self.scaler is not None:
            ml.update(loss_scale=self.scaler.get_scale())

    # ------------------------------------------------------------------------------------------
    # epochs, checkpoints, resume

    def fit(self, train_loader: Iterable, sampler: Any = None, callbacks: Sequence[Callback] = ()) -> dict:
        """Train from ``start_epoch`` to ``epochs``. Per epoch: ``sampler.set_epoch(epoch)`` (default: the
        loader's sampler), :meth:`train_one_epoch`, each callback ``cb(trainer, epoch, train_stats)`` (its
        returned dict is merged into the epoch record; runs on every rank), checkpoint, one JSON line in
        ``output_dir/log.txt``, W&B. Returns the last epoch record."""
        sampler = sampler if sampler is not None else getattr(train_loader, "sampler", None)
        record: dict = {}
        for epoch in range(self.start_epoch, self.epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            stats = self.train_one_epoch(train_loader, epoch)
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
        return record

    def checkpoint_state(self, epoch: int) -> dict:
        """Everything needed to resume after ``epoch``: model, optimizer, scaler, extra modules, EMA,
        epoch, global step, config and the RNG states of every rank. Collective (gathers RNG states)."""
        rng = all_gather_object(get_rng_state())
        state = {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "args": self.config,
            "rng": rng,
        }
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
        state = self.checkpoint_state(epoch)
        numbered = (epoch + 1) % self.save_ckpt_freq == 0 or epoch + 1 == self.epochs
        save_checkpoint(self.output_dir, epoch if numbered else "last", state, keep_last=self.keep_last)
        if self.best_metric and record is not None and self.best_metric in record:
            value = float(record[self.best_metric])
            better = self.best_value is None or (value > self.best_value if self.best_mode == "max"
                                                 else value < self.best_value)
            if better:
                self.best_value = value
                state["best_value"] = value
                save_checkpoint(self.output_dir, "best", state)

    def load_state(self, ckpt: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore a checkpoint dict: model (strict); and when it holds ``optimizer`` and ``epoch``: the
        optimizer, scaler, extra modules, EMA, RNG states (same world size) and the next epoch."""
        load_model_state(unwrap_model(self.model), ckpt["model"], strict=True, source=source)
        if "optimizer" not in ckpt or not isinstance(ckpt.get("epoch"), int):
            print(f"Loaded model weights from {source} (no optimizer state: starting at epoch {self.start_epoch})")
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch = ckpt["epoch"] + 1
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
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == get_world_size():
            set_rng_state(rng[get_rank()])
        elif rng is not None:
            print(f"RNG states in {source} are for {len(rng)} process(es), not {get_world_size()}: not restored")
        print(f"Resumed from {source}: epoch {ckpt['epoch']} done, continuing at epoch {self.start_epoch}")

    def resume(self, path: str | None) -> bool:
        """Load ``path`` (from ``utils.checkpoint.resolve_resume(args)``) if given; returns whether it did."""
        if not path:
            return False
        self.load_state(load_checkpoint(path, map_location="cpu"), source=str(path))
        return True

