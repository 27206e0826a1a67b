"""Mixed precision: the ``amp`` modes, ``torch.autocast`` for them and the fp16 GradScaler."""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_DTYPES", "resolve_amp", "autocast", "make_grad_scaler"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


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


def make_grad_scaler(device: torch.device | str, amp: str, sharded: bool = False) -> torch.amp.GradScaler | None:
    """A ``torch.amp.GradScaler`` for fp16, None otherwise (bf16 and fp32 need no loss scaling). ``sharded``
    (an ``--fsdp`` model): the scaler whose overflow check is reduced over the ranks holding the shards."""
    if amp != "fp16":
        return None
    if sharded:
        from utils.engine.fsdp import sharded_grad_scaler

        return sharded_grad_scaler(device)
    return torch.amp.GradScaler(torch.device(device).type)
