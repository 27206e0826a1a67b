"""The EMA of the model weights (timm ``ModelEmaV3`` or any module with ``update(model, step=)``):
updated after every optimizer step, saved as ``'model_ema'`` in checkpoints."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from utils.engine.batch import unwrap_model

__all__ = ["update_ema", "ema_state_dict", "load_ema_state_dict"]


def _averaged(ema: nn.Module) -> nn.Module:
    """The module holding the averaged weights (``ema.module`` for timm's wrappers)."""
    return unwrap_model(getattr(ema, "module", ema))


def update_ema(ema: nn.Module, model: nn.Module, step: int) -> None:
    """One EMA update towards the (unwrapped) ``model`` after optimizer step ``step`` (1-based count)."""
    ema.update(unwrap_model(model), step=step)


def ema_state_dict(ema: nn.Module) -> dict[str, Any]:
    """State dict of the averaged weights (the model's keys)."""
    return _averaged(ema).state_dict()


def load_ema_state_dict(ema: nn.Module, state: Mapping[str, Any]) -> None:
    """Restore what :func:`ema_state_dict` returned (strict)."""
    _averaged(ema).load_state_dict(state)
