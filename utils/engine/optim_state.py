"""Loading an optimizer state saved by another build of the optimizer (e.g. the published scripts).

``torch.optim.Optimizer.load_state_dict`` needs the same number of parameter groups, each with the same number
of parameters. Checkpoints of the published code can differ in group layout while holding the same
parameters: its pre-training optimizer always has a second group for the task balancer, empty without
balancing, where ours leaves empty groups out. :func:`match_optimizer_state` maps the saved groups onto the
optimizer's groups where that is unambiguous and otherwise raises a :class:`utils.checkpoint.CheckpointError`
saying how the layouts differ.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import torch

from utils.checkpoint import CheckpointError

__all__ = ["match_optimizer_state", "load_optimizer_state"]


def _sizes(groups: list[Mapping[str, Any]]) -> list[int]:
    return [len(g["params"]) for g in groups]


def _order(saved: list[Mapping[str, Any]], ours: list[Mapping[str, Any]]) -> list[int | None] | None:
    """For each of our groups, the index of the saved group it takes (None: one of our empty groups), or None
    when no unambiguous mapping exists. Saved empty groups are dropped; the others are matched in order when
    their sizes agree in order, else by size when every size is distinct."""
    full = [i for i, g in enumerate(saved) if g["params"]]
    mine = [j for j, g in enumerate(ours) if g["params"]]
    s_sizes, o_sizes = [len(saved[i]["params"]) for i in full], [len(ours[j]["params"]) for j in mine]
    if s_sizes == o_sizes:
        pairs = dict(zip(mine, full))
    elif Counter(s_sizes) == Counter(o_sizes) and len(set(o_sizes)) == len(o_sizes):
        by_size = {len(saved[i]["params"]): i for i in full}
        pairs = {j: by_size[len(ours[j]["params"])] for j in mine}
    else:
        return None
    return [pairs.get(j) for j in range(len(ours))]


def match_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any],
                          source: str = "checkpoint") -> dict:
    """``state`` (an optimizer ``state_dict``) with its parameter groups arranged like ``optimizer``'s.

    Each resulting group is our group's settings updated by the saved ones (so keys only we use, such as
    ``name``, survive). Raises :class:`CheckpointError` when the group layouts cannot be matched or a saved
    per-parameter buffer has another shape than the parameter it would be loaded into."""
    if not isinstance(state, Mapping) or "param_groups" not in state or "state" not in state:
        raise CheckpointError(f"{source}: 'optimizer' is not an optimizer state dict (expected keys 'state' and "
                              f"'param_groups')")
    saved, ours = list(state["param_groups"]), optimizer.param_groups
    order = _order(saved, ours)
    if order is None:
        raise CheckpointError(
            f"{source}: the optimizer's parameter groups differ from this run's and cannot be matched: the "
            f"checkpoint has {len(saved)} group(s) with {_sizes(saved)} parameters, this run {len(ours)} group(s) "
            f"with {_sizes(ours)} (empty groups are dropped, the others matched in order or by distinct sizes). "
            f"Use the same parameter-group options as the run that saved it, or load only the weights "
            f"(--finetune).")
    groups = []
    for j, i in enumerate(order):
        mine = {k: v for k, v in ours[j].items() if k != "params"}
        if i is None:
            groups.append({**mine, "params": []})
            continue
        for sid, p in zip(saved[i]["params"], ours[j]["params"]):
            for key, buf in state["state"].get(sid, {}).items():
                if torch.is_tensor(buf) and buf.dim() > 0 and buf.shape != p.shape:
                    raise CheckpointError(
                        f"{source}: optimizer state '{key}' of parameter {sid} (group {i}) has shape "
                        f"{tuple(buf.shape)}, the parameter it maps to has {tuple(p.shape)}: the parameter "
                        f"order differs from this run's")
        groups.append({**mine, **saved[i]})
    return {"state": dict(state["state"]), "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any], source: str = "checkpoint"
                         ) -> None:
    """``optimizer.load_state_dict`` after :func:`match_optimizer_state`; says when groups were re-mapped."""
    matched = match_optimizer_state(optimizer, state, source)
    if _sizes(list(state["param_groups"])) != _sizes(optimizer.param_groups):
        print(f"{source}: optimizer groups {_sizes(list(state['param_groups']))} mapped onto this run's "
              f"{_sizes(optimizer.param_groups)} (parameters per group)")
    optimizer.load_state_dict(matched)
