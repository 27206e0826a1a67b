"""Truncated per-image depth standardisation, batched and on device (one implementation for all scripts)."""
from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch

from utils.data.constants import DEPTH_STD_EPS, DEPTH_TRIM

__all__ = ['robust_standardize']


def robust_standardize(depth: torch.Tensor, mask_valid: Optional[torch.Tensor] = None,
                       trim: float = DEPTH_TRIM, eps: float = DEPTH_STD_EPS) -> torch.Tensor:
    """Standardise each image by the mean/std of its depth values with both tails trimmed.

    Per image, the values are sorted and the slice ``[int(trim * n), int((1 - trim) * n))`` gives the
    mean and unbiased variance; the output is ``(depth - mean) / sqrt(var + eps)``.
    With ``mask_valid``, ``n`` counts valid pixels only, statistics ignore invalid pixels and invalid
    pixels are set to 0 in the output. No host synchronisation, so it can run in the
    training step.

    Args:
        depth: (B, 1, H, W) or (B, H, W) float depth.
        mask_valid: optional bool tensor broadcastable to ``depth`` (True = valid).
    Returns:
        float tensor with the shape of ``depth`` (float32 unless ``depth`` is float64).
    """
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    shape = depth.shape
    x = depth.reshape(shape[0], -1)
    x = x if x.dtype == torch.float64 else x.float()
    n = x.shape[1]
    if mask_valid is None:
        lo, hi = int(trim * n), int((1 - trim) * n)
        if hi - lo < 2:
            raise ValueError(f"robust_standardize needs at least 2 values after trimming; image has {n} pixels")
        kept = torch.sort(x, dim=1).values[:, lo:hi]
        mean = kept.mean(dim=1, keepdim=True)
        var = kept.var(dim=1, unbiased=True, keepdim=True)
        return ((x - mean) / torch.sqrt(var + eps)).reshape(shape)

    valid = torch.broadcast_to(mask_valid.bool(), shape).reshape(shape[0], -1)
    # invalid pixels sort to the end, so the valid values occupy positions [0, count)
    values = torch.sort(torch.where(valid, x, torch.full_like(x, float('inf'))), dim=1).values
    count = valid.sum(dim=1, keepdim=True)
    # int(trim * count) in exact integer arithmetic (no float64, which some backends lack)
    frac = Fraction(trim).limit_denominator(1 << 20)
    lo = count * frac.numerator // frac.denominator
    hi = count * (frac.denominator - frac.numerator) // frac.denominator
    pos = torch.arange(n, device=x.device).unsqueeze(0)
    keep = (pos >= lo) & (pos < hi)
    num = (hi - lo).clamp_min(1).to(x.dtype)
    kept_values = torch.where(keep, values, torch.zeros_like(values))
    mean = kept_values.sum(dim=1, keepdim=True) / num
    sq = torch.where(keep, (values - mean) ** 2, torch.zeros_like(values)).sum(dim=1, keepdim=True)
    var = sq / (num - 1).clamp_min(1)
    out = (x - mean) / torch.sqrt(var + eps)
    return torch.where(valid, out, torch.zeros_like(out)).reshape(shape)
