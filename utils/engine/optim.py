"""Optimisation pieces shared by every entry script: per-iteration schedules, parameter groups and the
optimizer factory.

Schedules are precomputed per iteration (one value per optimizer step) and read by the engine, which sets
``group['lr'] = lr_schedule[it] * group['lr_scale']`` and, for decayed groups, ``group['weight_decay'] =
wd_schedule[it]``. Every parameter group built here therefore carries ``lr_scale`` and ``weight_decay``.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "cosine_scheduler",
    "weight_decay_scheduler",
    "create_optimizer",
    "pretrain_param_groups",
    "finetune_param_groups",
    "describe_param_groups",
]


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0,
                     warmup_steps: int = -1) -> np.ndarray:
    """Per-iteration schedule: linear warm-up then a half cosine from ``base_value`` to ``final_value``.

    Returns a float64 array of length ``epochs * niter_per_ep``. The warm-up covers ``warmup_steps``
    iterations if ``warmup_steps > 0`` (whatever ``warmup_epochs`` is), else ``warmup_epochs *
    niter_per_ep``, and goes linearly (both ends included) from ``start_warmup_value`` to ``base_value``.
    The remaining ``M`` iterations follow ``final + (base - final) * (1 + cos(pi * i / M)) / 2`` for
    ``i = 0 .. M-1``, so the final value itself is never reached.

    A warm-up from zero is ``start_warmup_value=0``; ``warmup_steps > 0`` with ``warmup_epochs == 0`` gives
    a warm-up counted in steps. A warm-up longer than the schedule (e.g. a 1-epoch test of a
    40-epoch-warm-up recipe) is cut off with a warning, so short debugging runs of long recipes work.
    """
    total = int(epochs) * int(niter_per_ep)
    warmup_iters = int(warmup_steps) if warmup_steps > 0 else int(warmup_epochs) * int(niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.zeros(0)
    if warmup_iters > total:
        # Short debugging runs of a long recipe: keep the warm-up slope and cut the schedule off, i.e. the
        # run ends inside the warm-up.
        warnings.warn(f"warm-up of {warmup_iters} iterations is longer than the whole schedule ({epochs} epochs "
                      f"x {niter_per_ep} iterations = {total}); the run ends inside the warm-up")
        warmup, warmup_iters = warmup[:total], total
    num_cos = total - warmup_iters
    steps = np.arange(num_cos, dtype=np.float64)
    cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(math.pi * steps / max(num_cos, 1)))
    schedule = np.concatenate([warmup, cosine]).astype(np.float64)
    assert len(schedule) == total
    return schedule


def weight_decay_scheduler(weight_decay: float, weight_decay_end: float | None, epochs: int,
                           niter_per_ep: int) -> np.ndarray:
    """Per-iteration weight-decay schedule: cosine from ``weight_decay`` to ``weight_decay_end`` (no
    warm-up); constant when ``weight_decay_end`` is None."""
    end = weight_decay if weight_decay_end is None else weight_decay_end
    return cosine_scheduler(weight_decay, end, epochs, niter_per_ep)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` equals a pattern, matches it as an fnmatch wildcard, or lies below it
    (``'input_adapters.rgb.pos_emb'`` matches pattern ``'input_adapters.rgb'``)."""
    for pattern in patterns:
        if name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def pretrain_param_groups(model: nn.Module, balancer: nn.Module | None, weight_decay: float,
                          balancer_lr_scale: float = 1.0, decay_filter: bool = False) -> list[dict]:
    """Parameter groups of the pre-training optimizer.

    Default (``decay_filter=False``): two groups, every trainable model parameter with ``lr_scale 1``
    and the task balancer's parameters with ``lr_scale = balancer_lr_scale``; weight decay applies to
    *every* parameter, biases, norms, tokens and embeddings included. This is how the released
    checkpoints were trained, so it is what reproduces them.

    ``decay_filter=True`` (opt-in): no weight decay for 1-D tensors, ``.bias`` and the names returned by
    ``model.no_weight_decay()``, nor for the balancer's log-variances.
    """
    model_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bal_params = [p for p in balancer.parameters() if p.requires_grad] if balancer is not None else []
    groups: list[dict] = []
    if not decay_filter:
        groups.append({"name": "model", "params": [p for _, p in model_params],
                       "lr_scale": 1.0, "weight_decay": weight_decay})
        bal_wd = weight_decay
    else:
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        decay, no_decay = [], []
        for name, p in model_params:
            if p.ndim <= 1 or name.endswith(".bias") or _matches(name, skip):
                no_decay.append(p)
            else:
                decay.append(p)
        groups.append({"name": "model_decay", "params": decay, "lr_scale": 1.0, "weight_decay": weight_decay})
        groups.append({"name": "model_no_decay", "params": no_decay, "lr_scale": 1.0, "weight_decay": 0.0})
        bal_wd = 0.0
    if bal_params:
        groups.append({"name": "balancer", "params": bal_params,
                       "lr_scale": float(balancer_lr_scale), "weight_decay": bal_wd})
    return [g for g in groups if g["params"]]


def _layer_map(model: nn.Module) -> dict[str, int]:
    """Layer id of every parameter name, from the model's timm ``group_matcher`` (0 = embeddings/input
    adapters, i+1 = encoder block i, last = heads)."""
    from timm.models import group_parameters

    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None,
                          no_lr_scale_list: Sequence[str] = (), scale_input_lr: bool = True) -> list[dict]:
    """Fine-tuning parameter groups with layer-wise lr decay, through timm's ``param_groups_layer_decay``.

    Layer ids come from ``model.group_matcher()``: input adapters and global tokens 0, encoder block ``i``
    ``i+1``, output adapters ``L+1``; group ``lr_scale = layer_decay ** (L + 1 - id)``. No weight decay for
    1-D tensors and the names in ``model.no_weight_decay()`` (wildcards allowed). ``layer_decay`` None or
    >= 1 gives every group scale 1. Parameters named in ``no_lr_scale_list`` (exact name, prefix or
    wildcard), and with ``scale_input_lr=False`` every layer-0 parameter (input adapters, global tokens),
    keep ``lr_scale`` 1.0. Frozen parameters (``requires_grad=False``) are skipped.
    """
    from timm.optim import param_groups_layer_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ld = 1.0 if layer_decay is None or layer_decay >= 1.0 else float(layer_decay)
    groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                      layer_decay=ld)
    unscaled = set()
    if no_lr_scale_list or not scale_input_lr:
        layer_of = _layer_map(model) if not scale_input_lr else {}
        for name, p in model.named_parameters():
            if _matches(name, no_lr_scale_list) or (not scale_input_lr and layer_of.get(name) == 0):
                unscaled.add(id(p))
    if not unscaled:
        return groups
    out: list[dict] = []
    for g in groups:
        keep = [p for p in g["params"] if id(p) not in unscaled]
        moved = [p for p in g["params"] if id(p) in unscaled]
        if keep:
            out.append({**g, "params": keep})
        if moved:
            out.append({**g, "params": moved, "lr_scale": 1.0})
    return out


def describe_param_groups(model: nn.Module, param_groups: list[dict]) -> list[dict]:
    """For printing/debugging: per group its lr_scale, weight_decay and parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{"lr_scale": g.get("lr_scale", 1.0), "weight_decay": g.get("weight_decay"),
             "params": [names.get(id(p), "<extra>") for p in g["params"]]} for g in param_groups]


def _fusable(params: list[torch.Tensor]) -> bool:
    """True if torch's fused Adam/AdamW kernel takes these parameters: floating point, all on one CPU or
    CUDA device."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


_PUBLISHED_NAMES = {"nesterov": "sgd", "momentum": "momentum", "sgd": "sgd", "adam": "adam",
                    "adamw": "adamw", "lamb": "lamb", "lars": "lars"}


def optimizer_name_error(opt: str) -> str | None:
    """An error line when ``--opt`` names no optimizer :func:`create_optimizer` can build, else None."""
    from timm.optim import list_optimizers

    base = str(opt).lower().split("_")[-1]
    known = set(list_optimizers()) | set(_PUBLISHED_NAMES)
    if _PUBLISHED_NAMES.get(base, base) in known:
        return None
    from difflib import get_close_matches

    hint = get_close_matches(base, sorted(known), n=1)
    return (f"--opt '{opt}' is not an optimizer" + (f"; did you mean '{hint[0]}'?" if hint else "")
            + f" (e.g. {', '.join(sorted(_PUBLISHED_NAMES))}, or any timm optimizer name)")


def create_optimizer(optim: Any, param_groups: list[dict], lr: float | None = None,
                     fused: bool | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named by ``optim.opt`` over ``param_groups`` with timm's ``create_optimizer_v2``.

    ``optim``: a :class:`utils.config.job.OptimConfig` (or anything with its attributes): ``opt``
    (``adamw`` | ``adam`` | ``sgd``/``nesterov`` (Nesterov SGD) | ``momentum`` (plain momentum SGD) |
    ``lamb`` | ``lars`` | any other timm optimizer name; a ``fused_`` prefix is accepted), ``weight_decay``
    (default for groups without their own value), ``opt_eps``, ``opt_betas``, ``momentum``; ``lr`` (the
    peak learning rate) defaults to ``optim.lr``.

    ``fused``: Adam/AdamW as torch's single-kernel implementation. The default (None) fuses whenever every
    parameter is on one CPU or CUDA device: on the CPU it is about 3x faster than the per-parameter loop and
    agrees with it to fp32 rounding (``tests/test_optim.py``). ``False`` gives the per-parameter loop.
    """
    from timm.optim import create_optimizer_v2

    opt = str(optim.opt).lower()
    base = opt.split("_")[-1]
    base = _PUBLISHED_NAMES.get(base, base)
    kwargs: dict[str, Any] = {}
    if getattr(optim, "opt_eps", None) is not None:
        kwargs["eps"] = float(optim.opt_eps)
    betas = getattr(optim, "opt_betas", None)
    if betas is not None:
        kwargs["betas"] = tuple(float(b) for b in betas)
    params = [p for g in param_groups for p in g["params"]]
    if base in ("adam", "adamw") and (fused if fused is not None else _fusable(params)):
        kwargs["fused"] = True
    try:
        return create_optimizer_v2(param_groups, opt=base, lr=getattr(optim, "lr", None) if lr is None else lr,
                                   weight_decay=float(getattr(optim, "weight_decay", 0.0) or 0.0),
                                   momentum=float(getattr(optim, "momentum", 0.9)), **kwargs)
    except ValueError as e:
        raise ValueError(f"--opt {optim.opt!r}: {e}") from e
