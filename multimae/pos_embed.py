"""Patch-grid arithmetic and 2-D position embeddings shared by the input and output adapters.

Position embeddings are stored as ``(1, D, h, w)`` maps so that they can be resized to other token
grids with ``F.interpolate``.
"""
from __future__ import annotations

from typing import Tuple, TypeVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = ["pair", "patch_size_at_stride", "token_grid", "build_2d_sincos_posemb", "make_pos_emb", "pos_emb_tokens"]

T = TypeVar("T")


def pair(t: Union[T, Tuple[T, T]]) -> Tuple[T, T]:
    """Return ``t`` if it is already a tuple, else ``(t, t)``."""
    return t if isinstance(t, tuple) else (t, t)


def patch_size_at_stride(patch_size_full: Tuple[int, int], stride_level: int) -> Tuple[int, int]:
    """Patch edge ``(P_H, P_W)`` on an input down-sampled ``stride_level`` times (at least 1 pixel)."""
    return max(1, patch_size_full[0] // stride_level), max(1, patch_size_full[1] // stride_level)


def token_grid(image_size: Tuple[int, int], stride_level: int, patch: Tuple[int, int]) -> Tuple[int, int]:
    """Token grid ``(N_H, N_W)`` of a full-resolution ``image_size`` for an input at ``stride_level``
    cut into ``patch = (P_H, P_W)`` patches."""
    return image_size[0] // (stride_level * patch[0]), image_size[1] // (stride_level * patch[1])


def build_2d_sincos_posemb(h: int, w: int, embed_dim: int = 1024, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, ``(1, embed_dim, h, w)`` float32.

    With ``q = embed_dim // 4`` and ``omega_k = temperature ** -(k / q)``, the vector at (row ``a``,
    column ``b``) is ``[sin(i omega), cos(i omega), sin(j omega), cos(j omega)]`` where
    ``n = a * w + b``, ``i = n // h`` and ``j = n % h``. For square grids ``i`` is the row and ``j``
    the column; for non-square grids the two coordinates are mixed, which is the layout the released
    MultiMAE weights were trained with and is therefore kept.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}")
    q = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(q, dtype=torch.float32) / q))
    n = torch.arange(h * w)
    i = torch.div(n, h, rounding_mode="floor").to(torch.float32)
    j = torch.remainder(n, h).to(torch.float32)
    out_i = i[:, None] * omega[None, :]
    out_j = j[:, None] * omega[None, :]
    emb = torch.cat([out_i.sin(), out_i.cos(), out_j.sin(), out_j.cos()], dim=1)  # (h*w, D)
    return emb.t().reshape(1, embed_dim, h, w).contiguous()


def make_pos_emb(dim_tokens: int, h: int, w: int, sincos: bool, learnable: bool) -> nn.Parameter:
    """Position-embedding parameter ``(1, D, h, w)``: sin-cos (trainable only if ``learnable``), or
    trunc-normal(std 0.02) and trainable if not ``sincos``."""
    if sincos:
        return nn.Parameter(build_2d_sincos_posemb(h=h, w=w, embed_dim=dim_tokens), requires_grad=learnable)
    pos_emb = nn.Parameter(torch.zeros(1, dim_tokens, h, w))
    trunc_normal_(pos_emb, std=0.02)
    return pos_emb


def pos_emb_tokens(pos_emb: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a ``(1, D, h, w)`` embedding to ``size`` and flatten it to ``(1, size_h * size_w, D)``.

    Interpolating to the stored size is an exact identity for bilinear/bicubic with
    ``align_corners=False``, so that case skips the kernel.
    """
    if tuple(pos_emb.shape[-2:]) != tuple(size):
        pos_emb = F.interpolate(pos_emb, size=size, mode=mode, align_corners=False)
    return pos_emb.flatten(2).transpose(1, 2)
