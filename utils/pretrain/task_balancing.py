"""Weighting of the per-task pre-training losses.

Both strategies are ``nn.Module``s taking and returning a ``{task: scalar loss}`` dict, so they can be
wrapped in DDP, optimised in their own parameter group and saved under ``loss_balancer`` in checkpoints
(state_dict keys as published: ``log_vars`` for the uncertainty weighting, nothing otherwise).
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["NoWeightingStrategy", "UncertaintyWeightingStrategy", "build_task_balancer"]


class NoWeightingStrategy(nn.Module):
    """Identity: every task loss keeps weight 1 (no parameters)."""

    def forward(self, task_losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(task_losses)


class UncertaintyWeightingStrategy(nn.Module):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018): ``w_t = exp(-s_t) * L_t + s_t`` with a
    learned log-variance ``s_t`` per task (initialised to 0). A task whose raw loss is exactly 0 (e.g. a
    batch where nothing of it was hidden) contributes 0, log-variance term included, so that batch does
    not move ``s_t``.

    ``tasks`` must name every loss that will be passed in (with ``extra_norm_pix_loss`` that includes
    ``norm_rgb``). Losses are matched to their log-variance by name, so the dict order does not matter.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"UncertaintyWeightingStrategy: duplicate task names in {self.tasks}")
        self._index = {t: i for i, t in enumerate(self.tasks)}
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, task_losses: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for task, loss in task_losses.items():
            if task not in self._index:
                close = difflib.get_close_matches(task, self.tasks, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise KeyError(f"UncertaintyWeightingStrategy has no log-variance for loss {task!r} "
                               f"(tasks: {self.tasks}){hint}")
            s = self.log_vars[self._index[task]]
            weighted = torch.exp(-s) * loss + s
            out[task] = torch.where(loss == 0, torch.zeros_like(weighted), weighted)
        return out

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"


def build_task_balancer(name: str, tasks: Sequence[str]) -> nn.Module:
    """``'none'`` -> :class:`NoWeightingStrategy`, ``'uncertainty'`` ->
    :class:`UncertaintyWeightingStrategy` over ``tasks`` (the names of all losses)."""
    if name == "uncertainty":
        return UncertaintyWeightingStrategy(tasks)
    if name == "none":
        return NoWeightingStrategy()
    raise ValueError(f"unknown task_balancer {name!r}; expected 'none' or 'uncertainty'")
