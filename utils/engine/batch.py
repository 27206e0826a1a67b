"""Batches and wrapped modules: moving nested batches to the device, their size, DDP/compile unwrapping."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["move_to_device", "infer_batch_size", "unwrap_model", "no_sync"]


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


def infer_batch_size(batch: Any) -> int | None:
    """Leading dimension ``B`` of the first tensor with one in a (nested) batch; None when there is none."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = infer_batch_size(item)
            if n is not None:
                return n
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers (its state_dict keys carry no
    ``module.`` / ``_orig_mod.`` prefix)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def no_sync(modules: Iterable[nn.Module]) -> contextlib.ExitStack:
    """One context holding ``no_sync()`` of every DDP module in ``modules`` (no gradient all-reduce while
    accumulating); the others are left alone."""
    stack = contextlib.ExitStack()
    for m in modules:
        if isinstance(m, DistributedDataParallel):
            stack.enter_context(m.no_sync())
    return stack
