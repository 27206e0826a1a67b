"""Masked pre-training losses.

Each loss takes a prediction ``input (B, C, H, W)``, a target and an optional token mask
``(B, N_H * N_W)`` (1 = hidden from the encoder). With a mask, the per-pixel loss is averaged over the
hidden pixels of each sample, then over the samples that have any; samples without hidden pixels
are skipped, and a batch with no hidden pixel at all gives 0. Without a mask the plain mean is used.

The all-visible case gives a float zero that stays connected to the graph, and no loss branches on
data in Python, so computing a loss never synchronises the host with the device. The cross-entropy
loss also accepts an ``ignore_index`` whose pixels are excluded from the per-sample denominators.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MaskedMSELoss", "MaskedL1Loss", "MaskedCrossEntropyLoss"]


def _masked_mean(loss: torch.Tensor, mask: Optional[torch.Tensor], scale_factor: int,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reduce a per-pixel loss ``(B, H, W)`` to a scalar.

    ``mask (B, nh * nw)`` (1 = hidden, ``nh = H // scale_factor``) is nearest-upsampled to pixels;
    ``valid (B, H, W)`` optionally removes pixels (e.g. ignored labels) from numerator and denominator.
    """
    if mask is None:
        if valid is None:
            return loss.mean()
        valid = valid.to(loss.dtype)
        return (loss * valid).sum() / valid.sum().clamp(min=1)
    B, H, W = loss.shape
    nh, nw = H // scale_factor, W // scale_factor
    if mask.shape[-1] != nh * nw:
        raise ValueError(f"mask has {mask.shape[-1]} tokens per sample but the prediction of size {(H, W)} with "
                         f"patch size {scale_factor} has {nh}x{nw}={nh * nw}")
    pix = F.interpolate(mask.reshape(B, 1, nh, nw).to(loss.dtype), size=(H, W), mode="nearest").squeeze(1)
    if valid is not None:
        pix = pix * valid.to(loss.dtype)
    num = (loss * pix).flatten(1).sum(dim=1)
    den = pix.flatten(1).sum(dim=1)
    has_hidden = (den > 0).to(loss.dtype)
    per_sample = num / den.clamp(min=1)  # den counts pixels, so clamping only touches den == 0
    return (per_sample * has_hidden).sum() / has_hidden.sum().clamp(min=1)


class _MaskedPixelLoss(nn.Module):
    """Shared patchify / per-patch normalisation for the pixel regression losses."""

    def __init__(self, patch_size: int = 16, stride: int = 1, norm_pix: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.scale_factor = patch_size // stride
        self.norm_pix = norm_pix

    def patchify(self, imgs: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        """``(B, C, nh*p, nw*p) -> (B, nh*nw, p*p*C)`` (order ``(p1 p2 c)``)."""
        p = self.scale_factor
        B, C = imgs.shape[:2]
        x = imgs.reshape(B, C, nh, p, nw, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, nh * nw, p * p * C)

    def unpatchify(self, x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``(B, nh*nw, p*p*C) -> (B, C, nh*p, nw*p)``."""
        p = self.scale_factor
        B = x.shape[0]
        C = x.shape[-1] // (p * p)
        x = x.reshape(B, nh, nw, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, nh * p, nw * p)

    def normalize_target(self, target: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
        """Standardise every patch with its own mean and unbiased variance (eps 1e-6 inside the sqrt)."""
        x = self.patchify(target, nh, nw)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return self.unpatchify((x - mean) / torch.sqrt(var + 1e-6), nh, nw)

    def pixel_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``input, target (B, C, H, W)``, ``mask (B, N_H*N_W)`` with 1 = hidden -> scalar loss."""
        H, W = input.shape[-2:]
        nh, nw = H // self.scale_factor, W // self.scale_factor
        if self.norm_pix:
            target = self.normalize_target(target, nh, nw)
        loss = self.pixel_loss(input, target)
        if mask is None:
            return loss.mean()
        return _masked_mean(loss.mean(dim=1), mask, self.scale_factor)


class MaskedMSELoss(_MaskedPixelLoss):
    """Masked mean squared error; ``norm_pix=True`` regresses per-patch standardised targets.

    Args:
        patch_size: patch size at full resolution.
        stride: down-sampling of this target w.r.t. the full image (the patch edge is ``patch_size // stride``).
        norm_pix: standardise each target patch (MAE's normalised-pixel loss).
    """

    def pixel_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction="none")


class MaskedL1Loss(_MaskedPixelLoss):
    """Masked mean absolute error (same arguments as :class:`MaskedMSELoss`)."""

    def pixel_loss(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(input, target, reduction="none")


class MaskedCrossEntropyLoss(nn.Module):
    """Masked per-pixel cross-entropy.

    ``forward(input (B, K, H, W) logits, target (B, H, W) int64, mask (B, N_H*N_W) or None)``.
    Pixels whose target equals ``ignore_index`` contribute neither to the loss nor to the per-sample
    pixel counts. With the default ``ignore_index=-100`` (never a real label) every pixel counts.
    """

    def __init__(self, patch_size: int = 16, stride: int = 1, label_smoothing: float = 0.0,
                 ignore_index: int = -100):
        super().__init__()
        self.patch_size = patch_size
        self.stride = stride
        self.scale_factor = patch_size // stride
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, input: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = F.cross_entropy(input, target, reduction="none", label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index)
        return _masked_mean(loss, mask, self.scale_factor, valid=target != self.ignore_index)
