"""Checkpointing of the training loop: what is saved, when, and how a run resumes from it.

One checkpoint holds the whole state of a :class:`utils.engine.trainer.Trainer`: model (unwrapped state
dict), optimizer, GradScaler, extra modules, EMA, epoch, global step, best value, skipped-step count, the
config and every rank's RNG state; a mid-epoch one adds the position in the epoch (``data_position``) and
per-rank RNG state at the epoch start and running averages (``rank_state``), so a resumed run continues
from that very optimizer step.

When: ``checkpoint-<epoch>.pth`` every ``save_ckpt_freq`` epochs and at the last epoch, ``checkpoint-last.pth``
otherwise (and every ``save_every_steps`` optimizer steps, or when a stop is agreed, with the position),
``checkpoint-best.pth`` when ``best_metric`` of the epoch record improves.

How: one file written by rank 0 (:func:`utils.checkpoint.save_checkpoint`), or, for a model sharded with
``--fsdp``, a ``torch.distributed.checkpoint`` directory of the same name written by every rank
(:mod:`utils.engine.dcp`); :meth:`CheckpointPolicy.read` loads either.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

from torch import Tensor

from utils.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from utils.engine import dcp
from utils.dist import all_gather_object, barrier, get_rank, get_world_size
from utils.engine.batch import unwrap_model
from utils.engine.ema import ema_state_dict, load_ema_state_dict
from utils.engine.optim_state import load_optimizer_state
from utils.engine.preemption import Preempted, StopRequest
from utils.engine.rng import get_rng_state, set_rng_state
from utils.logger import MetricLogger

# The policy reads and restores the loop's state; it is handed the Trainer (utils.engine.trainer), which
# imports this module, so the type is named in annotations only.
Trainer = Any

__all__ = ["CheckpointPolicy"]


class CheckpointPolicy:
    """What and when to save; restores a trainer from a checkpoint. Methods taking ``trainer`` read (and on
    resume set) its state: model, optimizer, scaler, modules, model_ema, faults, the epoch/step counters.

    Args:
        output_dir: checkpoint folder ('' = no checkpoints).
        save_ckpt: False turns saving off.
        save_ckpt_freq: keep a numbered checkpoint every N epochs.
        keep_last: keep only the newest N numbered checkpoints (None = all).
        best_metric / best_mode: save ``checkpoint-best.pth`` when this key of the epoch record improves
            (``'max' | 'min'``).
        save_every_steps: mid-epoch ``checkpoint-last.pth`` every N optimizer steps (0 = off).
        config: plain dict stored under ``'args'``.
    """

    def __init__(self, output_dir: str = "", save_ckpt: bool = True, save_ckpt_freq: int = 20,
                 keep_last: int | None = None, best_metric: str | None = None, best_mode: str = "max",
                 save_every_steps: int = 0, config: Mapping[str, Any] | None = None):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.output_dir, self.save_ckpt = output_dir, save_ckpt
        self.save_ckpt_freq, self.keep_last = max(1, int(save_ckpt_freq)), keep_last
        self.best_metric, self.best_mode, self.best_value = best_metric, best_mode, None
        self.save_every_steps = max(0, int(save_every_steps or 0))
        self.config = dict(config or {})
        self.log_record: dict | None = None  # the newest epoch's log.txt line, kept in every checkpoint

    @property
    def enabled(self) -> bool:
        """Whether anything is saved at all."""
        return bool(self.output_dir and self.save_ckpt)

    def periodic_due(self, global_step: int) -> bool:
        """Whether a mid-epoch checkpoint is due after ``global_step`` optimizer steps."""
        return bool(self.save_every_steps and global_step % self.save_every_steps == 0)

    # ------------------------------------------------------------------------------------------ saving

    def state(self, trainer: "Trainer", epoch: int, position: tuple[int, int] | None = None,
              meters: MetricLogger | None = None) -> dict:
        """Everything needed to resume after ``epoch``. ``position=(e, s)``: a mid-epoch state after ``s``
        optimizer steps of epoch ``e`` (``epoch`` is then ``e - 1``, the last complete one), with each
        rank's RNG state at the start of ``e`` and its running averages (``meters``). Collective."""
        t = trainer
        rng = all_gather_object(get_rng_state())
        state = {
            "model": unwrap_model(t.model).state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "epoch": epoch,
            "global_step": t.global_step,
            "scaler": t.scaler.state_dict() if t.scaler is not None else {},
            "args": self.config,
            "rng": rng,
            "nonfinite_skipped": t.faults.nonfinite_skipped,
        }
        if self.best_value is not None:
            state["best_value"] = self.best_value
        if self.log_record is not None:
            state["log_record"] = self.log_record
        if position is not None:
            e, s = position
            state["data_position"] = {"epoch": e, "step": s, "steps_per_epoch": t.steps_per_epoch,
                                      "update_freq": t.update_freq}
            mine = {"rng_epoch_start": t._epoch_rng,
                    "meters": meters.state() if meters is not None else {}}
            state["rank_state"] = all_gather_object(mine)
        for name, m in t.modules.items():
            state[name] = unwrap_model(m).state_dict()
        if t.model_ema is not None:
            state["model_ema"] = ema_state_dict(t.model_ema)
        return state

    def save_epoch(self, trainer: "Trainer", epoch: int, record: Mapping[str, Any] | None = None) -> None:
        """Save after ``epoch`` (numbered / last / best, see the module docstring); the checkpoint keeps
        ``record`` (the epoch's log.txt line), so a kill before log.txt is appended loses no record.
        Collective."""
        if not self.enabled:
            return
        if record is not None:
            self.log_record = dict(record)
        better = False
        if self.best_metric and record is not None and self.best_metric in record:
            value = float(record[self.best_metric])
            better = self.best_value is None or (value > self.best_value if self.best_mode == "max"
                                                 else value < self.best_value)
            if better:
                self.best_value = value
        state = self.state(trainer, epoch)
        numbered = (epoch + 1) % self.save_ckpt_freq == 0 or epoch + 1 == trainer.epochs
        if better:
            # Best first: a kill between the two writes then resumes from the previous epoch (whose best value
            # is lower, so this epoch writes best again); the other order resumed from this epoch, believing
            # its best saved, and checkpoint-best.pth kept an older epoch for good.
            self.write(trainer, "best", state)
        self.write(trainer, epoch if numbered else "last", state, keep_last=self.keep_last)

    def write(self, trainer: "Trainer", tag: int | str, state: dict, keep_last: int | None = None) -> Any:
        """``checkpoint-<tag>.pth``: the single file on rank 0, or the sharded directory written by every
        rank (``trainer.sharded``). Returns its path on rank 0, None elsewhere. Collective when sharded."""
        if getattr(trainer, "sharded", False):
            return dcp.save_sharded(self.output_dir, tag, state, trainer.model, trainer.optimizer,
                                    trainer.modules, keep_last=keep_last)
        return save_checkpoint(self.output_dir, tag, state, keep_last=keep_last)

    def save_position(self, trainer: "Trainer", epoch: int, steps_done: int, ml: MetricLogger,
                      reason: str) -> Any:
        """checkpoint-last.pth with the position inside ``epoch`` (``reason``: ``'stop' | 'periodic'``);
        returns its path (None when nothing was written). Collective."""
        if not self.enabled:
            return None
        if trainer.stop is not None and reason == "stop":
            trainer.stop.saving = True
        state = self.state(trainer, epoch - 1, position=(epoch, steps_done), meters=ml)
        path = self.write(trainer, "last", state)
        if path is not None and reason == "periodic":
            print(f"Saved {path} (epoch {epoch}, step {steps_done}/{trainer.steps_per_epoch})")
        return path

    def exit_preempted(self, where: str, path: Any, stop: StopRequest | None) -> None:
        """Raise :class:`utils.engine.preemption.Preempted` (exit code 75) once rank 0 has written ``path``."""
        barrier()  # nobody exits (and makes torchrun kill the others) before rank 0 has written the file
        why = stop.reason if stop is not None else "stop requested"
        if self.enabled:
            path = path or os.path.join(self.output_dir, "checkpoint-last.pth")
            msg = (f"Stopped at {where} ({why}); checkpoint {path} written. Start again with the same output_dir "
                   f"to resume from there (exit code 75).")
        else:
            msg = (f"Stopped at {where} ({why}); no checkpoint written (no output_dir or checkpoints disabled; "
                   f"exit code 75).")
        print(msg, flush=True)
        raise Preempted(msg)

    # ------------------------------------------------------------------------------------------ resuming

    @staticmethod
    def read(trainer: "Trainer", path: str | os.PathLike) -> dict:
        """The checkpoint dict at ``path`` for :meth:`load_state`: a file (read on the CPU), or a sharded
        directory, loaded straight into the trainer's model, optimizer and modules (collective when they
        are sharded; any number of ranks)."""
        if dcp.is_sharded_checkpoint(path):
            return dcp.load_sharded(path, trainer.model, trainer.optimizer, trainer.modules)
        return load_checkpoint(path, map_location="cpu")

    def load_state(self, trainer: "Trainer", ckpt: Mapping[str, Any], source: str = "checkpoint") -> None:
        """Restore a checkpoint dict into ``trainer``: model (strict); and when it holds ``optimizer`` and
        ``epoch``: the optimizer, scaler, extra modules, EMA, RNG states (same world size), best value, the
        next epoch and, for a mid-epoch checkpoint, the step inside it. A bare state dict (e.g. from
        ``.safetensors``) only sets the model weights."""
        t = trainer
        if "model" in ckpt:
            weights = ckpt["model"]
        elif ckpt and all(isinstance(v, Tensor) for v in ckpt.values()):
            weights, ckpt = ckpt, {}
        else:
            raise CheckpointError(f"{source} has no 'model' entry (keys: {sorted(map(str, ckpt))[:10]}); expected a "
                                  f"training checkpoint or a bare state dict")
        load_model_state(unwrap_model(t.model), weights, strict=True, source=source)
        if "optimizer" not in ckpt or not isinstance(ckpt.get("epoch"), int):
            print(f"Loaded model weights from {source} (no optimizer state: starting at epoch {t.start_epoch})")
            return
        load_optimizer_state(t.optimizer, ckpt["optimizer"], source)  # maps a saved group layout onto this one
        t.start_epoch, t.start_step = ckpt["epoch"] + 1, 0
        self._warn_other_length(t, ckpt, source)
        t.global_step = t.start_epoch * t.steps_per_epoch
        if t.scaler is not None and ckpt.get("scaler"):
            t.scaler.load_state_dict(ckpt["scaler"])
        self._load_modules(t, ckpt, source)
        if "best_value" in ckpt:
            self.best_value = ckpt["best_value"]
        self.log_record = ckpt.get("log_record")
        t.faults.nonfinite_skipped = int(ckpt.get("nonfinite_skipped", 0))
        rng = ckpt.get("rng")
        same_world = isinstance(rng, list) and len(rng) == get_world_size()
        if self._load_position(t, ckpt, source, rng if same_world else None):
            where = f"epoch {t.start_epoch}, step {t.start_step}/{t.steps_per_epoch}"
        else:
            where = f"epoch {t.start_epoch}"
            if same_world:
                set_rng_state(rng[get_rank()])
            elif rng is not None:
                print(f"RNG states in {source} are for {len(rng)} process(es), not {get_world_size()}: not restored")
        print(f"Resumed from {source}: continuing at {where} (global step {t.global_step})")

    @staticmethod
    def _warn_other_length(t: "Trainer", ckpt: Mapping[str, Any], source: str) -> None:
        """A resume with another ``--epochs`` is allowed (it extends or shortens the run) but changes the
        schedules, which are computed over the new length: say so instead of doing it silently."""
        saved = (ckpt.get("args") or {}).get("epochs")
        if isinstance(saved, int) and saved != t.epochs:
            warnings.warn(f"{source} comes from a run of {saved} epochs, this run has --epochs {t.epochs}: the "
                          f"learning-rate and weight-decay schedules are those of {t.epochs} epochs, so from epoch "
                          f"{t.start_epoch} on they differ from the first run's; pass --epochs {saved} to continue "
                          f"its schedule unchanged")

    @staticmethod
    def _load_modules(t: "Trainer", ckpt: Mapping[str, Any], source: str) -> None:
        """The extra modules and the EMA (a warning for each one the checkpoint lacks)."""
        for name, m in t.modules.items():
            if ckpt.get(name):
                unwrap_model(m).load_state_dict(ckpt[name])
            elif any(True for _ in m.parameters()):
                warnings.warn(f"{source} has no '{name}' state; it keeps its initial values")
        if t.model_ema is not None:
            if "model_ema" in ckpt:
                load_ema_state_dict(t.model_ema, ckpt["model_ema"])
            else:
                warnings.warn(f"{source} has no 'model_ema'; the EMA restarts from the current weights")

    @staticmethod
    def _load_position(t: "Trainer", ckpt: Mapping[str, Any], source: str, rng: list | None) -> bool:
        """Set up a mid-epoch resume from ``ckpt['data_position']``; False when there is none (or it cannot
        be honoured: other steps per epoch, other number of processes -> the epoch restarts)."""
        pos = ckpt.get("data_position")
        if not pos:
            return False
        ranks = ckpt.get("rank_state")
        if (pos.get("steps_per_epoch") != t.steps_per_epoch or pos.get("update_freq") != t.update_freq
                or rng is None or not isinstance(ranks, list) or len(ranks) != get_world_size()):
            warnings.warn(f"{source} was saved at step {pos.get('step')} of epoch {pos.get('epoch')} by a run with "
                          f"{pos.get('steps_per_epoch')} steps per epoch (update_freq {pos.get('update_freq')}) on "
                          f"{len(ranks) if isinstance(ranks, list) else '?'} process(es); this run differs, so epoch "
                          f"{t.start_epoch} restarts from its first step")
            return False
        t.start_step = int(pos["step"])
        t.global_step = t.start_epoch * t.steps_per_epoch + t.start_step
        t._resume = {"rng": rng[get_rank()], **ranks[get_rank()]}
        return True
