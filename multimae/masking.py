"""Token masking for MultiMAE: Dirichlet-distributed per-sample token budgets across tasks, masks
given by the caller, and masks built from patch coordinates.

Masks use 1 = hidden from the encoder, 0 = visible. ``ids_keep (B, n_vis)`` indexes the visible tokens
in the concatenation of all tasks' tokens; ``ids_restore (B, N_total)`` is the inverse permutation
that puts (visible + mask) tokens back in input order.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["sample_alphas", "make_mask", "random_token_masks", "token_ids_from_masks", "ModelDeviceDefault"]

Tensor = torch.Tensor


def sample_alphas(B: int, n_tasks: int, alphas: Union[float, Sequence[float]] = 1.0, eps: float = 1e-5,
                  device: Optional[torch.device] = None) -> Tensor:
    """Dirichlet concentrations ``(B, n_tasks)`` for uniform task-subset sampling.

    Every sample picks one of the ``2**n_tasks - 1`` non-empty task subsets uniformly; chosen tasks
    get their ``alphas`` entry, the others ``0`` (plus ``eps`` so the Dirichlet is defined). Subset
    indices follow ``itertools.product([0, 1], repeat=n_tasks)`` order (first task = most
    significant bit).
    """
    alphas_t = _per_task_tensor(alphas, n_tasks, device)
    choice = torch.randint(0, 2 ** n_tasks - 1, (B,), device=device) + 1  # skip the all-zero subset
    shifts = torch.arange(n_tasks - 1, -1, -1, device=device)
    chosen = torch.bitwise_and(torch.bitwise_right_shift(choice[:, None], shifts), 1).to(torch.float32)
    return chosen * alphas_t + eps


class ModelDeviceDefault:
    """Descriptor for ``make_mask``: on an instance the default device is the model's, on the class it is CPU."""

    def __init__(self, fn):
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self.fn

        def bound(*args, **kwargs):
            if kwargs.get("device") is None:
                p = next(obj.parameters(), None)
                kwargs["device"] = p.device if p is not None else torch.device("cpu")
            return self.fn(*args, **kwargs)

        bound.__doc__ = self.fn.__doc__
        return bound


def make_mask(N_H: int = 14, N_W: int = 14, xy_idxs: Optional[Dict[str, List[Sequence[int]]]] = None,
              full_tasks: Sequence[str] = (), indicate_visible: bool = True, flatten: bool = True,
              device: Optional[Union[str, torch.device]] = None) -> Dict[str, Tensor]:
    """Per-task masks from lists of visible patch coordinates ``{task: [[x, y], ...]}``.

    Listed patches are 0 (visible), others 1; tasks in ``full_tasks`` are fully visible. With
    ``indicate_visible=False`` the masks are inverted. Returns int64 ``(1, N_H*N_W)`` masks if
    ``flatten`` else ``(N_H, N_W)``. ``device`` defaults to the model's device (CPU on the class).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    xy_idxs = xy_idxs or {}
    masks = {}
    for task, coords in xy_idxs.items():
        m = torch.ones(N_H, N_W, dtype=torch.int64, device=device)
        if len(coords) > 0:
            xy = torch.as_tensor(coords, dtype=torch.int64, device=device).reshape(-1, 2)
            m[xy[:, 1], xy[:, 0]] = 0
        masks[task] = m
    for task in full_tasks:
        if task not in masks:
            raise KeyError(f"make_mask: full task {task!r} has no entry in xy_idxs {list(xy_idxs)}")
        masks[task].zero_()
    if not indicate_visible:
        masks = {k: 1 - v for k, v in masks.items()}
    if flatten:
        masks = {k: v.flatten().unsqueeze(0) for k, v in masks.items()}
    return masks


def random_token_masks(input_tokens: Dict[str, Tensor], num_encoded_tokens: int,
                       alphas: Union[float, Sequence[float]] = 1.0, sample_tasks_uniformly: bool = False
                       ) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
    """Random masks: a Dirichlet draw splits each sample's budget of ``num_encoded_tokens`` visible tokens
    across the tasks, then each task keeps a uniformly random subset of its share.

    ``alphas``: Dirichlet concentration, one float or one per task; ``sample_tasks_uniformly`` first
    picks a non-empty task subset uniformly per sample (see :func:`sample_alphas`). Returns ``task_masks {task: (B, N_task) int64}`` (1 = hidden), ``ids_keep (B, num_encoded_tokens)``
    and ``ids_restore (B, N_total)``. Every sample keeps exactly ``num_encoded_tokens`` tokens.
    Runs entirely on the tokens' device without host synchronisation.
    """
    first = next(iter(input_tokens.values()))
    B, device = first.shape[0], first.device
    n_tasks = len(input_tokens)
    if isinstance(alphas, (int, float)):
        alphas = [float(alphas)] * n_tasks
    if len(alphas) != n_tasks:
        raise ValueError(f"alphas has {len(alphas)} entries but there are {n_tasks} input tasks "
                         f"{list(input_tokens)}")
    if sample_tasks_uniformly:
        concentration = sample_alphas(B, n_tasks, alphas=alphas, device=device)
    else:
        concentration = _per_task_tensor(alphas, n_tasks, device).expand(B, n_tasks)
    proportions = _sample_dirichlet(concentration)
    samples_per_task = (proportions * num_encoded_tokens).round().long()  # (B, T)

    masks = []
    sizes = [t.shape[1] for t in input_tokens.values()]
    for i, n in enumerate(sizes):
        # position j is kept iff argsort(noise)[j] < k: a uniformly random subset of min(k, n) tokens
        perm = torch.argsort(torch.rand(B, n, device=device), dim=1)
        masks.append((perm >= samples_per_task[:, i:i + 1]).long())
    mask_all = torch.cat(masks, dim=1)
    # kept tokens first (random order inside each group), then cut at the exact budget
    ids_shuffle = torch.argsort(mask_all + torch.rand_like(mask_all, dtype=torch.float32), dim=1)
    ids_restore = _inverse_permutation(ids_shuffle)
    ids_keep = ids_shuffle[:, :num_encoded_tokens]
    mask_all = (ids_restore >= num_encoded_tokens).long()
    task_masks = dict(zip(input_tokens.keys(), torch.split(mask_all, sizes, dim=1)))
    return task_masks, ids_keep, ids_restore


def token_ids_from_masks(task_masks: Dict[str, Tensor], input_tokens: Dict[str, Tensor]
                         ) -> Tuple[Tensor, Tensor]:
    """``ids_keep (B, n_vis)`` and ``ids_restore (B, N)`` from given masks.

    Every sample must have the same number of visible tokens; reading that number is a host
    synchronisation, which only this (user-supplied masks) path pays.
    """
    missing = [t for t in input_tokens if t not in task_masks]
    if missing:
        raise KeyError(f"task_masks has no entry for input task(s) {missing}; got {list(task_masks)}")
    parts = []
    for task, tokens in input_tokens.items():
        m = task_masks[task]
        B, n = tokens.shape[:2]
        if m.dim() != 2 or m.shape[1] != n or m.shape[0] not in (1, B):
            raise ValueError(f"task_masks[{task!r}] has shape {tuple(m.shape)}, expected ({B}, {n}) "
                             f"(1 = hidden, 0 = visible)")
        parts.append((m != 0).long().to(tokens.device).expand(B, n))
    mask_all = torch.cat(parts, dim=1)
    ids_shuffle = torch.argsort(mask_all, dim=1, stable=True)
    ids_restore = _inverse_permutation(ids_shuffle)
    visible = (mask_all == 0).sum(dim=1)
    lo, hi = torch.stack([visible.min(), visible.max()]).tolist()
    if lo != hi:
        raise ValueError(f"task_masks: every sample must have the same number of visible tokens, got between "
                         f"{lo} and {hi} per sample")
    return ids_shuffle[:, :lo], ids_restore


def _per_task_tensor(values: Union[float, Sequence[float]], n_tasks: int, device: Optional[torch.device]
                     ) -> Tensor:
    """``(n_tasks,)`` float32 tensor on ``device`` built with fill kernels: a host-to-device copy of a Python
    list (``torch.tensor(values, device='cuda')``) would synchronise the host on every training step."""
    if isinstance(values, (int, float)):
        return torch.full((n_tasks,), float(values), dtype=torch.float32, device=device)
    values = [float(v) for v in values]
    if len(values) != n_tasks:
        raise ValueError(f"expected {n_tasks} per-task values, got {len(values)}: {values}")
    if len(set(values)) == 1:
        return torch.full((n_tasks,), values[0], dtype=torch.float32, device=device)
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])


def _sample_dirichlet(concentration: Tensor) -> Tensor:
    """One Dirichlet draw per row of ``concentration (B, T)``, as normalised Gamma(alpha, 1) draws.

    Consumes the same random numbers as ``torch.distributions.Dirichlet`` (values agree to float
    rounding) but, unlike ``aten::_sample_dirichlet``, also runs on the meta device and under
    ``torch.compile`` tracing.
    """
    gammas = torch.distributions.Gamma(concentration, torch.ones_like(concentration), validate_args=False).sample()
    return gammas / gammas.sum(dim=-1, keepdim=True)


def _inverse_permutation(perm: Tensor) -> Tensor:
    """Row-wise inverse of a batch of permutations ``(B, N)`` (same result as ``argsort(perm)``)."""
    arange = torch.arange(perm.shape[1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(1, perm, arange)

