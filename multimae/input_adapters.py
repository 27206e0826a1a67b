"""Input adapters: turn one modality into a sequence of tokens ``(B, N_H * N_W, D)``.

Each adapter owns its patch projection and (by default fixed sin-cos) position embedding. The token
width ``D`` is usually set late by ``MultiMAE`` through ``init(dim_tokens)``.
"""
from __future__ import annotations

from typing import Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .multimae_utils import build_2d_sincos_posemb, pair, trunc_normal_

__all__ = ["PatchedInputAdapter", "SemSegInputAdapter"]


def _resized_pos_emb(pos_emb: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a ``(1, D, h, w)`` position embedding to ``size`` and flatten it to ``(1, h'*w', D)``.

    Interpolating to the stored size is an exact identity for bilinear/bicubic with
    ``align_corners=False``, so that case skips the kernel.
    """
    if tuple(pos_emb.shape[-2:]) != tuple(size):
        pos_emb = F.interpolate(pos_emb, size=size, mode=mode, align_corners=False)
    return pos_emb.flatten(2).transpose(1, 2)


def _make_pos_emb(dim_tokens: int, h: int, w: int, sincos: bool, learnable: bool) -> nn.Parameter:
    """Position-embedding parameter ``(1, D, h, w)``: frozen sin-cos by default, else trunc-normal(0.02)."""
    if sincos:
        return nn.Parameter(build_2d_sincos_posemb(h=h, w=w, embed_dim=dim_tokens), requires_grad=learnable)
    pos_emb = nn.Parameter(torch.zeros(1, dim_tokens, h, w))
    trunc_normal_(pos_emb, std=0.02)
    return pos_emb


class PatchedInputAdapter(nn.Module):
    """Patch embedding for dense image-like modalities (rgb, depth, ...).

    Args:
        num_channels: channels ``C`` of the input.
        stride_level: how much the input is down-sampled w.r.t. the full image (1 = full resolution).
        patch_size_full: patch size at full resolution; the patch on this input is ``patch // stride``.
        dim_tokens: token width ``D``; if None, ``init`` must be called later.
        sincos_pos_emb: fixed 2-D sin-cos embedding (else trunc-normal, learnable).
        learnable_pos_emb: make the sin-cos embedding trainable.
        image_size: full-resolution image size the position embedding is built for.

    ``forward(x: (B, C, H, W)) -> (B, (H / P_H) * (W / P_W), D)``.
    """

    def __init__(self, num_channels: int, stride_level: int, patch_size_full: Union[int, Tuple[int, int]],
                 dim_tokens: Optional[int] = None, sincos_pos_emb: bool = True, learnable_pos_emb: bool = False,
                 image_size: Union[int, Tuple[int, int]] = 224):
        super().__init__()
        self.num_channels = num_channels
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens = dim_tokens
        self.sincos_pos_emb = sincos_pos_emb
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        self.num_patches = (self.image_size[0] // self.patch_size_full[0]) * (self.image_size[1] // self.patch_size_full[1])
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)
        if self.dim_tokens is not None:
            self.init(dim_tokens=dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create the projection and position embedding for token width ``dim_tokens``."""
        self.dim_tokens = dim_tokens
        h = self.image_size[0] // (self.stride_level * self.P_H)
        w = self.image_size[1] // (self.stride_level * self.P_W)
        self.pos_emb = _make_pos_emb(dim_tokens, h, w, self.sincos_pos_emb, self.learnable_pos_emb)
        self.proj = nn.Conv2d(self.num_channels, dim_tokens, kernel_size=(self.P_H, self.P_W),
                              stride=(self.P_H, self.P_W))

    def no_weight_decay(self) -> Set[str]:
        return {"pos_emb"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim_tokens is None:
            raise RuntimeError("PatchedInputAdapter: call init(dim_tokens) before forward")
        B, C, H, W = x.shape
        if H % self.P_H != 0 or W % self.P_W != 0:
            raise ValueError(f"PatchedInputAdapter: input size {(H, W)} is not divisible by the patch size "
                             f"{(self.P_H, self.P_W)}")
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens + _resized_pos_emb(self.pos_emb, (H // self.P_H, W // self.P_W), mode="bicubic")


class SemSegInputAdapter(nn.Module):
    """Token embedding for semantic label maps (class indices, no one-hot).

    Each pixel's class is embedded (``class_emb``, width ``dim_class_emb``) and the embedding map is
    patch-projected like an image. With ``interpolate_class_emb`` the map is instead bilinearly
    down-sampled by the patch size and projected with a 1x1 conv (keys ``proj.1.*``).
    If ``emb_padding_idx`` is given, one extra class row is added for it.

    ``forward(x: LongTensor (B, H, W)) -> (B, (H / P_H) * (W / P_W), D)``.
    """

    def __init__(self, num_classes: int, stride_level: int, patch_size_full: Union[int, Tuple[int, int]],
                 dim_tokens: Optional[int] = None, sincos_pos_emb: bool = True, learnable_pos_emb: bool = False,
                 image_size: Union[int, Tuple[int, int]] = 224, dim_class_emb: int = 64,
                 interpolate_class_emb: bool = False, emb_padding_idx: Optional[int] = None):
        super().__init__()
        self.num_classes = num_classes + (1 if emb_padding_idx is not None else 0)
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens = dim_tokens
        self.sincos_pos_emb = sincos_pos_emb
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        self.dim_class_emb = dim_class_emb
        self.interpolate_class_emb = interpolate_class_emb
        self.emb_padding_idx = emb_padding_idx
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)
        if self.dim_tokens is not None:
            self.init(dim_tokens=dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create class embedding, projection and position embedding for token width ``dim_tokens``."""
        self.dim_tokens = dim_tokens
        h = self.image_size[0] // (self.stride_level * self.P_H)
        w = self.image_size[1] // (self.stride_level * self.P_W)
        self.pos_emb = _make_pos_emb(dim_tokens, h, w, self.sincos_pos_emb, self.learnable_pos_emb)
        # The padding row is re-drawn too (published behaviour); padding_idx only blocks its gradient.
        self.class_emb = nn.Embedding(self.num_classes, self.dim_class_emb, padding_idx=self.emb_padding_idx)
        trunc_normal_(self.class_emb.weight, std=0.02)
        if self.interpolate_class_emb:
            self.proj = nn.Sequential(
                nn.Upsample(scale_factor=(1 / self.P_H, 1 / self.P_W), mode="bilinear"),
                nn.Conv2d(self.dim_class_emb, dim_tokens, kernel_size=1, stride=1),
            )
        else:
            self.proj = nn.Conv2d(self.dim_class_emb, dim_tokens, kernel_size=(self.P_H, self.P_W),
                                  stride=(self.P_H, self.P_W))

    def no_weight_decay(self) -> Set[str]:
        # 'class_emb' (not 'class_emb.weight') as published: fine-tuning layer decay therefore still
        # decays the class embedding, which the released recipes were tuned with.
        return {"pos_emb", "class_emb"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim_tokens is None:
            raise RuntimeError("SemSegInputAdapter: call init(dim_tokens) before forward")
        B, H, W = x.shape
        if H % self.P_H != 0 or W % self.P_W != 0:
            raise ValueError(f"SemSegInputAdapter: label map size {(H, W)} is not divisible by the patch size "
                             f"{(self.P_H, self.P_W)}")
        emb = self.class_emb(x).permute(0, 3, 1, 2)  # (B, dim_class_emb, H, W)
        tokens = self.proj(emb).flatten(2).transpose(1, 2)
        return tokens + _resized_pos_emb(self.pos_emb, (H // self.P_H, W // self.P_W), mode="bilinear")
