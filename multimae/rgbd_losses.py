"""Losses and metrics of the two-stage RGB-D pre-training (:mod:`multimae.rgbd_contrastive`): the patch
InfoNCE and its retrieval accuracy, masked pixel / patch MSE, and the max-pooled feature distillation."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NEGATIVES", "patch_info_nce", "patch_retrieval_accuracy", "masked_pixel_mse", "masked_patch_mse",
           "max_pool_features", "max_pool_distill_loss", "stream_valid"]

NEGATIVES = ("image", "batch", "position")


def _similarities(z_a: Tensor, z_b: Tensor) -> Tensor:
    """``(B, N, N)`` float32 dot products of ``z_a, z_b (B, N, P)``, also under fp16/bf16 autocast: autocast
    would run the bmm in half precision, and half cannot hold the masked-logit fill value."""
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        return torch.bmm(z_a.float(), z_b.float().transpose(1, 2))


def _candidate_groups(z_a: Tensor, z_b: Tensor, valid: Tensor, negatives: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Regroup ``(B, N, P)`` patch embeddings so that each group of ``n`` holds an anchor's candidates at
    the same index: the patches of one image (``'image'``, ``(B, N, P)``), of the batch (``'batch'``,
    ``(1, B N, P)``) or the patches at one position across the images (``'position'``, ``(N, B, P)``)."""
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {list(NEGATIVES)}, got {negatives!r}")
    if negatives == "batch":
        return z_a.reshape(1, -1, z_a.shape[-1]), z_b.reshape(1, -1, z_b.shape[-1]), valid.reshape(1, -1)
    if negatives == "position":
        return z_a.transpose(0, 1), z_b.transpose(0, 1), valid.transpose(0, 1)
    return z_a, z_b, valid


def patch_info_nce(z_a: Tensor, z_b: Tensor, logit_scale: Tensor, valid: Optional[Tensor] = None,
                   negatives: str = "image") -> Tensor:
    """Symmetric InfoNCE between patch embeddings ``z_a, z_b (B, N, P)`` (L2-normalised): the positive of
    patch ``i`` of image ``b`` in ``z_a`` is patch ``i`` of image ``b`` in ``z_b``; the negatives are the
    other patches of the same image (``'image'``), of the whole batch (``'batch'``), or the patches at the
    same position in the other images (``'position'``: the position embedding cannot tell them apart).
    ``valid (B, N)`` bool removes patches as anchors and as negatives. Mean over valid anchors of
    ``(CE(a -> b) + CE(b -> a)) / 2``; equals ``log(n)`` (n valid candidates) when all embeddings are equal.
    """
    z_a, z_b = z_a.float(), z_b.float()
    if valid is None:
        valid = torch.ones(z_a.shape[:2], dtype=torch.bool, device=z_a.device)
    z_a, z_b, valid = _candidate_groups(z_a, z_b, valid, negatives)
    G, n, _ = z_a.shape
    logits = logit_scale.float() * _similarities(z_a, z_b)  # (G, n, n): a-patches x b-patches
    # dtype-safe: exp() of the dtype's minimum minus the row maximum is exactly 0 in any float dtype
    logits = logits.masked_fill(~(valid[:, :, None] & valid[:, None, :]), torch.finfo(logits.dtype).min)
    target = torch.arange(n, device=z_a.device).repeat(G)
    loss_ab = F.cross_entropy(logits.reshape(G * n, n), target, reduction="none")
    loss_ba = F.cross_entropy(logits.transpose(1, 2).reshape(G * n, n), target, reduction="none")
    w = valid.reshape(-1).float()
    return ((loss_ab + loss_ba) * w).sum() / (2 * w.sum().clamp(min=1))


@torch.no_grad()
def patch_retrieval_accuracy(z_a: Tensor, z_b: Tensor, valid: Optional[Tensor] = None,
                             candidates: str = "image") -> Tensor:
    """Fraction of valid patches of ``z_a (B, N, P)`` whose most similar valid candidate in ``z_b`` is the
    positive: candidates are the patches of the same image (``'image'``), of the batch (``'batch'``) or
    at the same position in every image (``'position'``; chance ``1 / B``)."""
    if valid is None:
        valid = torch.ones(z_a.shape[:2], dtype=torch.bool, device=z_a.device)
    z_a, z_b, valid = _candidate_groups(z_a.float(), z_b.float(), valid, candidates)
    sim = _similarities(z_a, z_b)
    sim = sim.masked_fill(~valid[:, None, :], torch.finfo(sim.dtype).min)
    hit = (sim.argmax(dim=-1) == torch.arange(sim.shape[1], device=sim.device)).float()
    return (hit * valid).sum() / valid.sum().clamp(min=1)


def masked_pixel_mse(pred: Tensor, target: Tensor, patch_mask: Tensor, patch_size: int,
                     valid: Optional[Tensor] = None) -> Tensor:
    """Mean squared error over the pixels of the patches with ``patch_mask (B, N) == 1`` that are ``valid
    (B, 1, H, W)``; per sample, then over the samples that have any such pixel (0 if none has).
    ``pred, target (B, C, H, W)``."""
    err = (pred.float() - target.float()).pow(2).mean(dim=1)  # (B, H, W)
    B, H, W = err.shape
    nh, nw = H // patch_size, W // patch_size
    if patch_mask.shape[1] != nh * nw:
        raise ValueError(f"patch_mask has {patch_mask.shape[1]} patches but a {H}x{W} map with patch size "
                         f"{patch_size} has {nh * nw}")
    w = patch_mask.reshape(B, nh, nw).to(err.dtype).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    if valid is not None:
        w = w * valid.reshape(B, H, W).to(err.dtype)
    num, den = (err * w).flatten(1).sum(1), w.flatten(1).sum(1)
    has = (den > 0).to(err.dtype)
    return (num / den.clamp(min=1) * has).sum() / has.sum().clamp(min=1)


def masked_patch_mse(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean squared error of patch predictions ``pred, target (B, k, Q)`` over the pixels with ``weight (B,
    k, Q)`` (1 where scored; all if None); per sample, then over the samples that have any such pixel."""
    err = (pred.float() - target.float()).pow(2)
    w = torch.ones_like(err) if weight is None else weight.to(err.dtype)
    num, den = (err * w).flatten(1).sum(1), w.flatten(1).sum(1)
    has = (den > 0).to(err.dtype)
    return (num / den.clamp(min=1) * has).sum() / has.sum().clamp(min=1)


def max_pool_features(tokens: Tensor, valid: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Max over tokens ``(B, n, D)`` of the ``valid (B, n)`` ones -> ``((B, D), has_any (B,))`` (rows without a
    valid token are 0)."""
    if valid is None:
        return tokens.amax(dim=1), torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    pooled = tokens.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(dim=1)
    has = valid.any(dim=1)
    return torch.where(has.unsqueeze(-1), pooled, torch.zeros_like(pooled)), has


def max_pool_distill_loss(student: Tensor, teacher: Tensor, student_valid: Optional[Tensor] = None,
                          teacher_valid: Optional[Tensor] = None, beta: float = 1.0, normalize: str = "none"
                          ) -> Tensor:
    """Smooth-L1 between the max-pooled patch features of the student ``(B, n, D)`` and of the teacher
    ``(B, m, D)`` (``valid`` masks drop tokens from the max), averaged over features and samples.
    ``normalize``: layer-norm (no affine) every teacher token (``'target'``: unit-scale targets, so ``beta``
    means the same at any feature scale, and the student's raw features are pulled to that scale), the
    tokens of both (``'both'``: scale-free), or neither (``'none'``)."""
    if normalize not in ("none", "target", "both"):
        raise ValueError(f"normalize must be 'none', 'target' or 'both', got {normalize!r}")
    student, teacher = student.float(), teacher.detach().float()
    if normalize != "none":
        teacher = F.layer_norm(teacher, teacher.shape[-1:])
    if normalize == "both":
        student = F.layer_norm(student, student.shape[-1:])
    s, s_has = max_pool_features(student, student_valid)
    t, t_has = max_pool_features(teacher, teacher_valid)
    per_sample = F.smooth_l1_loss(s, t, reduction="none", beta=beta).mean(dim=1)
    w = (s_has & t_has).to(per_sample.dtype)
    return (per_sample * w).sum() / w.sum().clamp(min=1)


def stream_valid(patch_valid: Optional[Tensor], keep: Optional[Tensor] = None) -> Optional[Tensor]:
    """Validity ``(B, k)`` of the kept patches (all patches when ``keep`` is None)."""
    if patch_valid is None or keep is None:
        return patch_valid
    return torch.gather(patch_valid, 1, keep)
