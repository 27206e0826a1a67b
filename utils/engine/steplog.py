"""Logging of the training loop: per-step values (console meters, W&B) and the per-epoch record
(``output_dir/log.txt``, W&B).

Nothing in the hot path waits for the device: a step's logged values stay tensors in :attr:`StepLog.pending`
and are converted in one batch at the print interval. That is also where non-finite losses are detected
(through :meth:`utils.engine.faults.FaultPolicy.check_logged`), so every checkpoint save flushes first.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from utils.engine.faults import FaultPolicy
from utils.logger import MetricLogger, _jsonable, append_log_txt

__all__ = ["StepLog"]


class StepLog:
    """Collects per-step records and writes epoch records.

    Args:
        device: where the logged tensors live (they are stacked there before the one host copy).
        faults: checks the logged losses before anything is logged.
        wandb: a ``utils.logger.WandbLogger`` or None.
        output_dir: folder of ``log.txt`` ('' = none).
        log_prefix: prefix of the train statistics in the epoch record.
        extra_log: constant entries added to every epoch record.
    """

    def __init__(self, device: torch.device, faults: FaultPolicy, wandb: Any = None, output_dir: str = "",
                 log_prefix: str = "[Epoch] ", extra_log: Mapping[str, Any] | None = None):
        self.device, self.faults, self.wandb = device, faults, wandb
        self.output_dir, self.log_prefix = output_dir, log_prefix
        self.extra_log = dict(extra_log or {})
        # (global step, step in epoch, record of scalar tensors/floats, meta) not yet turned into numbers
        self.pending: list[tuple[int, int, dict, dict]] = []

    def add(self, step: int, step_in_epoch: int, record: dict, meta: dict) -> None:
        """Queue one micro-batch's record (``'_loss'``: the raw loss, checked but not logged)."""
        self.pending.append((step, step_in_epoch, record, meta))

    def flush(self, ml: MetricLogger, epoch: int, scaler: torch.amp.GradScaler | None = None) -> None:
        """Turn the pending per-step tensors into numbers (one host sync), check the loss, feed the
        console meters and W&B; empties :attr:`pending`. Collective with several processes (all ranks
        flush at the same steps and agree on a non-finite loss, so they stop together)."""
        pending, self.pending = self.pending, []
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
        self.faults.check_logged(bad, len(pending), epoch)
        for step, values in rows:
            ml.update(**values)
            if self.wandb is not None:
                self.wandb.log(values, step=step)
        if scaler is not None:
            ml.update(loss_scale=scaler.get_scale())

    def epoch_record(self, stats: Mapping[str, Any]) -> dict:
        """The epoch's train statistics under :attr:`log_prefix`."""
        return {f"{self.log_prefix}{k}": v for k, v in stats.items()}

    def complete(self, record: dict, epoch: int) -> dict:
        """Add the constant entries and ``'epoch'`` to ``record`` (in place): the line log.txt gets. Returns a
        plain copy (numbers, strings, lists) that a checkpoint can hold."""
        record.update(self.extra_log)
        record["epoch"] = epoch
        return _jsonable(record)

    def write_epoch(self, record: dict, epoch: int, global_step: int) -> None:
        """:meth:`complete` ``record``, append it as one JSON line to ``output_dir/log.txt`` and send it to
        W&B at ``global_step``."""
        self.complete(record, epoch)
        append_log_txt(self.output_dir, record)
        if self.wandb is not None:
            self.wandb.log(record, step=global_step)

    def restore_epoch(self, record: Mapping[str, Any] | None) -> bool:
        """Append ``record`` (the epoch record kept in the checkpoint a run resumes from) to log.txt when
        log.txt has no record of that epoch: the run was killed between writing the checkpoint and the log.
        Returns whether it did."""
        if not record or not self.output_dir or "epoch" not in record:
            return False
        path = Path(self.output_dir) / "log.txt"
        lines = path.read_text().splitlines() if path.is_file() else []
        for line in lines:
            try:
                if json.loads(line).get("epoch") == record["epoch"]:
                    return False
            except (ValueError, AttributeError):
                continue  # a line of another format: not this epoch's record
        if append_log_txt(self.output_dir, dict(record)) is not None:
            print(f"Restored the record of epoch {record['epoch']} in {path} from the checkpoint (the previous "
                  f"run stopped before appending it)")
        return True
