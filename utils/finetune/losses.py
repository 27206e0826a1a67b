"""Pixel-wise regression losses for dense fine-tuning (depth, Taskonomy targets).

All losses take a prediction and a target of the same shape `(B, C, H, W)` and an optional boolean
validity mask `(B, 1, H, W)` or `(B, C, H, W)` (True = pixel has ground truth). The mask is broadcast
over channels, so the normaliser counts valid *elements* (pixels x channels).

Everything is computed with tensor ops only (no `.item()`), so the losses can sit in the training hot
path without a host sync. A batch without a single valid pixel gives a loss of exactly 0 that still
has a graph (its gradient is 0), instead of the 0/0 = NaN of a naive mean.

(Not to be confused with `multimae.criterion`, whose masks mark hidden *patches* for pre-training.)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "masked_l1_loss", "masked_berhu_loss", "masked_mse_loss",
    "PixelL1Loss", "PixelBerHuLoss", "PixelMSELoss", "build_regression_loss",
]


def _expand_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() == like.dim() - 1:  # (B, H, W) -> (B, 1, H, W)
        mask = mask.unsqueeze(1)
    if mask.dim() != like.dim():
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match prediction of shape "
                         f"{tuple(like.shape)}; expected (B, 1, H, W) or (B, C, H, W)")
    return mask.to(torch.bool).expand_as(like)


def _masked_mean(per_elem: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_elem.mean()
    total = torch.where(mask, per_elem, per_elem.new_zeros(())).sum()
    # clamp the count instead of branching on it: an all-invalid batch gives 0 / 1 = 0, with grad
    return total / mask.sum().clamp_min(1).to(per_elem.dtype)


def _masked_diff(pred: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    mask = _expand_mask(mask, pred)
    diff = pred - target
    if mask is not None:
        # torch.where (not diff * mask) so NaN/inf targets at invalid pixels cannot leak into the loss
        diff = torch.where(mask, diff, diff.new_zeros(()))
    return diff, mask


def masked_l1_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error over valid elements: sum(|p - t| * m) / sum(m).

    pred, target: (B, C, H, W); mask: (B, 1|C, H, W) bool or None (all valid). Returns a 0-d float32 tensor.
    """
    diff, mask = _masked_diff(pred, target, mask)
    return _masked_mean(diff.abs(), mask)


def masked_mse_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over valid elements: sum((p - t)^2 * m) / sum(m). Shapes as `masked_l1_loss`."""
    diff, mask = _masked_diff(pred, target, mask)
    return _masked_mean(diff.square(), mask)


def masked_berhu_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None,
                      threshold: float = 0.2, min_c: float = 1e-5) -> Tensor:
    """Reverse Huber (BerHu) loss over valid elements.

    With d = p - t (0 at invalid elements) and c = max(threshold * max|d|, min_c) taken over the whole
    batch and detached: L(d) = |d| if |d| < c else (d^2 + c^2) / (2c); loss = sum(L * m) / sum(m).
    pred, target: (B, C, H, W); mask: (B, 1|C, H, W) bool or None. Returns a 0-d float32 tensor.
    """
    diff, mask = _masked_diff(pred, target, mask)
    abs_diff = diff.abs()
    c = (threshold * abs_diff.detach().max()).clamp_min(min_c)
    per_elem = torch.where(abs_diff < c, abs_diff, (diff.square() + c.square()) / (2 * c))
    return _masked_mean(per_elem, mask)


class _PixelLoss(nn.Module):
    fn = staticmethod(masked_l1_loss)  # overridden by subclasses

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return type(self).fn(pred, target, mask)


class PixelL1Loss(_PixelLoss):
    """Module form of `masked_l1_loss`: forward(pred, target, mask=None)."""
    fn = staticmethod(masked_l1_loss)


class PixelMSELoss(_PixelLoss):
    """Module form of `masked_mse_loss`: forward(pred, target, mask=None)."""
    fn = staticmethod(masked_mse_loss)


class PixelBerHuLoss(nn.Module):
    """Module form of `masked_berhu_loss`: forward(pred, target, mask=None)."""

    def __init__(self, threshold: float = 0.2, min_c: float = 1e-5):
        super().__init__()
        self.threshold, self.min_c = threshold, min_c

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return masked_berhu_loss(pred, target, mask, self.threshold, self.min_c)


_REGRESSION_LOSSES = {"l1": PixelL1Loss, "berhu": PixelBerHuLoss, "l2": PixelMSELoss, "mse": PixelMSELoss}


def build_regression_loss(name: str) -> nn.Module:
    """Loss module for the `--loss` argument of dense fine-tuning: 'l1', 'berhu', 'l2' (= 'mse')."""
    try:
        return _REGRESSION_LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown regression loss {name!r}; expected one of {sorted(_REGRESSION_LOSSES)}") from None

