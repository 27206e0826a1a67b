"""Fault handling of the training loop: non-finite losses/gradients (stop, or skip up to N steps) and
the bad-sample policy (stop naming the file, or replace and count).

A non-finite loss found in the logged values stops the run with :class:`NonFiniteLossError` before any
checkpoint is written over the last good one. With ``skip_nonfinite=N`` a step whose loss (or, without
fp16 loss scaling, gradient norm) is not finite makes no update instead, up to N times per run.
"""
from __future__ import annotations

from typing import Any, Collection

import torch
from torch import Tensor

from utils.data.loader import describe_samples
from utils.dist import all_gather_object, all_reduce_sum, get_world_size

__all__ = ["NonFiniteLossError", "FaultPolicy", "BAD_SAMPLE_MODES"]

BAD_SAMPLE_MODES = ("error", "skip")
_HPARAMS = ("lr", "min_lr", "weight_decay")  # logged next to the losses, not losses themselves


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the step, its logged values and the files
    of the batch."""


class FaultPolicy:
    """What the loop does about NaN/inf and unreadable samples.

    Args:
        skip_nonfinite: skip up to this many non-finite optimizer steps per run (0 = stop at the first).
        on_bad_sample: ``'error'`` or ``'skip'`` (see :func:`utils.data.loader.track_loader`).
        steps_per_epoch: optimizer steps per epoch, for the messages.
    """

    def __init__(self, skip_nonfinite: int = 0, on_bad_sample: str = "error", steps_per_epoch: int = 1):
        self.skip_nonfinite = max(0, int(skip_nonfinite or 0))
        self.on_bad_sample = str(on_bad_sample or "error")
        if self.on_bad_sample not in BAD_SAMPLE_MODES:
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        self.steps_per_epoch = steps_per_epoch
        self.nonfinite_skipped = 0  # over the whole run, restored on resume
        self.dataset: Any = None  # the training dataset, to name the files of a bad batch

    def step_is_nonfinite(self, loss: Tensor | None, norm: Tensor, scaled: bool) -> bool:
        """Whether this step's loss (or gradient norm, when no GradScaler handles overflows: ``scaled``
        False) is NaN/inf on any rank. ``loss``, ``norm``: scalars. One host sync (and one tiny
        all-reduce with several processes)."""
        bad = torch.zeros((), dtype=torch.bool, device=norm.device)
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach().float()).to(norm.device)
        if not scaled:
            bad = bad | ~torch.isfinite(norm)
        if get_world_size() > 1:
            return bool(all_reduce_sum(bad.to(torch.int32)) > 0)
        return bool(bad)

    def skipped(self, step: int, step_in_epoch: int, epoch: int, record: dict, meta: dict) -> None:
        """Count a skipped non-finite step and report it; raises :class:`NonFiniteLossError` once more than
        ``skip_nonfinite`` steps were skipped."""
        self.nonfinite_skipped += 1
        losses = ", ".join(f"{k}={float(v):.6g}" for k, v in record.items()
                           if not k.startswith("_") and k not in _HPARAMS)
        where = (f"epoch {epoch}, step {step_in_epoch}/{self.steps_per_epoch} (global step {step}); {losses}; "
                 f"samples: {'; '.join(self.describe(meta)) or 'unknown'}")
        if self.nonfinite_skipped > self.skip_nonfinite:
            raise NonFiniteLossError(f"non-finite loss or gradient at {where}. That is {self.nonfinite_skipped} "
                                     f"non-finite steps, more than --skip_nonfinite {self.skip_nonfinite}; stopping "
                                     f"without saving a checkpoint.")
        print(f"Skipped non-finite step ({self.nonfinite_skipped}/{self.skip_nonfinite} allowed, no update): {where}",
              flush=True)

    def describe(self, meta: dict) -> list[str]:
        """The files of the batch whose dataset indices are ``meta['indices']`` (empty when unknown)."""
        if "indices" not in meta or self.dataset is None:
            return []
        return describe_samples(self.dataset, meta["indices"])

    def check_logged(self, bad: tuple | None, window: int, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` when ``bad`` (``(step, step_in_epoch, loss, values, meta)`` of
        the first non-finite logged loss, or None) is set on any rank. Collective with several processes,
        so all ranks stop together."""
        anywhere = bad is not None
        if get_world_size() > 1:
            anywhere = bool(all_reduce_sum(torch.tensor([int(anywhere)], dtype=torch.int32)).item())
        if anywhere:
            raise NonFiniteLossError(self._message(epoch, bad, window))

    def _message(self, epoch: int, bad: tuple | None, window: int) -> str:
        hint = "\n(--skip_nonfinite N skips up to N such steps)" if not self.skip_nonfinite else ""
        if bad is None:
            return (f"non-finite loss on another process within the last {window} steps of epoch {epoch} (see its "
                    f"message); stopping without saving a checkpoint{hint}")
        step, step_in_epoch, raw_loss, values, meta = bad
        shown = ", ".join(f"{k}={v:.6g}" for k, v in values.items() if k not in _HPARAMS)
        files = self.describe(meta)
        return (f"non-finite loss {raw_loss} at epoch {epoch}, step {step_in_epoch}/{self.steps_per_epoch} "
                f"(global step {step}); stopping without saving a checkpoint. Logged values: {shown}"
                + ("\nsamples of this batch:\n  " + "\n  ".join(files) if files else "") + hint)

    def epoch_stats(self, stats: dict, bad_samples: Collection[str], epoch: int) -> dict:
        """Add the epoch's bad-sample count (with ``'skip'``: the distinct bad files over all ranks, whose
        messages are ``bad_samples``; a file met again through another index's replacement is the same
        file) and the run's skipped-step count (with ``skip_nonfinite``) to ``stats``; returns it.
        Collective with ``'skip'``."""
        if self.on_bad_sample == "skip":
            seen = set().union(*all_gather_object(sorted(bad_samples)))
            stats["bad_samples"] = len(seen)
            if stats["bad_samples"]:
                print(f"Epoch {epoch}: {stats['bad_samples']} bad sample(s) skipped (replaced by the next sample)")
        if self.skip_nonfinite:
            stats["nonfinite_skipped"] = self.nonfinite_skipped
        return stats

