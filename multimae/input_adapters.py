"""Input adapters: turn one modality into a sequence of tokens ``(B, N_H * N_W, D)``.

Each adapter owns its patch projection and (by default fixed sin-cos) position embedding. The token
width ``D`` is usually set late by ``MultiMAE`` through ``init(dim_tokens)``.
"""
from __future__ import annotations

from typing import Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from .multimae_utils import trunc_normal_
from .pos_embed import make_pos_emb, pair, patch_size_at_stride, pos_emb_tokens, token_grid

__all__ = ["PatchedInputAdapter", "SemSegInputAdapter"]


class _PatchTokenizer(nn.Module):
    """Shared part of the input adapters: patch geometry, position embedding and the size check.

    Subclasses create ``proj`` in ``init``; their ``forward`` calls :meth:`_check_input`, then :meth:`_tokens`.
    """

    pos_emb_mode = "bicubic"  # how the position embedding is resized to other token grids

    def __init__(self, stride_level: int, patch_size_full: Union[int, Tuple[int, int]], dim_tokens: Optional[int],
                 sincos_pos_emb: bool, learnable_pos_emb: bool, image_size: Union[int, Tuple[int, int]]):
        super().__init__()
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens = dim_tokens
        self.sincos_pos_emb = sincos_pos_emb
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        self.P_H, self.P_W = patch_size_at_stride(self.patch_size_full, stride_level)

    def _init_pos_emb(self, dim_tokens: int) -> None:
        """Set the token width and create ``pos_emb (1, dim_tokens, N_H, N_W)`` for ``image_size``."""
        self.dim_tokens = dim_tokens
        h, w = token_grid(self.image_size, self.stride_level, (self.P_H, self.P_W))
        self.pos_emb = make_pos_emb(dim_tokens, h, w, self.sincos_pos_emb, self.learnable_pos_emb)

    def no_weight_decay(self) -> Set[str]:
        return {"pos_emb"}

    def _check_input(self, H: int, W: int) -> None:
        name = type(self).__name__
        if self.dim_tokens is None:
            raise RuntimeError(f"{name}: call init(dim_tokens) before forward")
        if H % self.P_H != 0 or W % self.P_W != 0:
            raise ValueError(f"{name}: input size {(H, W)} is not divisible by the patch size {(self.P_H, self.P_W)}")

    def _tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``proj`` the ``(B, C, H, W)`` feature map to tokens ``(B, N, D)`` and add the position embedding."""
        H, W = features.shape[-2:]
        tokens = self.proj(features).flatten(2).transpose(1, 2)
        return tokens + pos_emb_tokens(self.pos_emb, (H // self.P_H, W // self.P_W), mode=self.pos_emb_mode)


class PatchedInputAdapter(_PatchTokenizer):
    """Patch embedding for dense image-like modalities (rgb, depth, ...).

    Args:
        num_channels: channels ``C`` of the input.
        stride_level: how much the input is down-sampled w.r.t. the full image (1 = full resolution).
        patch_size_full: patch size at full resolution; the patch on this input is ``patch // stride``.
        dim_tokens: token width ``D``; if None, ``init`` must be called later.
        sincos_pos_emb: fixed 2-D sin-cos embedding (else trunc-normal, learnable).
        learnable_pos_emb: make the sin-cos embedding trainable.
        image_size: full-resolution image size the position embedding is built for.

    ``forward(x: (B, C, H, W)) -> (B, (H / P_H) * (W / P_W), D)``; the position embedding is resized
    bicubically to other input sizes.
    """

    def __init__(self, num_channels: int, stride_level: int, patch_size_full: Union[int, Tuple[int, int]],
                 dim_tokens: Optional[int] = None, sincos_pos_emb: bool = True, learnable_pos_emb: bool = False,
                 image_size: Union[int, Tuple[int, int]] = 224):
        super().__init__(stride_level, patch_size_full, dim_tokens, sincos_pos_emb, learnable_pos_emb, image_size)
        self.num_channels = num_channels
        self.num_patches = (self.image_size[0] // self.patch_size_full[0]) * (self.image_size[1] // self.patch_size_full[1])
        if self.dim_tokens is not None:
            self.init(dim_tokens=dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create the position embedding and projection for token width ``dim_tokens``."""
        self._init_pos_emb(dim_tokens)
        self.proj = nn.Conv2d(self.num_channels, dim_tokens, kernel_size=(self.P_H, self.P_W),
                              stride=(self.P_H, self.P_W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(*x.shape[-2:])
        return self._tokens(x)


class SemSegInputAdapter(_PatchTokenizer):
    """Token embedding for semantic label maps (class indices, no one-hot).

    Each pixel's class is embedded (``class_emb``, width ``dim_class_emb``) and the embedding map is
    patch-projected like an image. With ``interpolate_class_emb`` the map is instead bilinearly
    down-sampled by the patch size and projected with a 1x1 conv (keys ``proj.1.*``).
    If ``emb_padding_idx`` is given, one extra class row is added for it.

    ``forward(x: LongTensor (B, H, W)) -> (B, (H / P_H) * (W / P_W), D)``; the position embedding is
    resized bilinearly to other input sizes.
    """

    pos_emb_mode = "bilinear"

    def __init__(self, num_classes: int, stride_level: int, patch_size_full: Union[int, Tuple[int, int]],
                 dim_tokens: Optional[int] = None, sincos_pos_emb: bool = True, learnable_pos_emb: bool = False,
                 image_size: Union[int, Tuple[int, int]] = 224, dim_class_emb: int = 64,
                 interpolate_class_emb: bool = False, emb_padding_idx: Optional[int] = None):
        super().__init__(stride_level, patch_size_full, dim_tokens, sincos_pos_emb, learnable_pos_emb, image_size)
        self.num_classes = num_classes + (1 if emb_padding_idx is not None else 0)
        self.dim_class_emb = dim_class_emb
        self.interpolate_class_emb = interpolate_class_emb
        self.emb_padding_idx = emb_padding_idx
        if self.dim_tokens is not None:
            self.init(dim_tokens=dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create position embedding, class embedding and projection for token width ``dim_tokens``."""
        self._init_pos_emb(dim_tokens)
        # The padding row is drawn like the others; padding_idx only blocks its gradient.
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
        # 'class_emb' (not 'class_emb.weight'), the name the released fine-tuning recipes were tuned with:
        # layer-wise decay therefore still decays the class embedding.
        return {"pos_emb", "class_emb"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, H, W)`` int64 class indices."""
        self._check_input(*x.shape[-2:])
        return self._tokens(self.class_emb(x).permute(0, 3, 1, 2))  # (B, dim_class_emb, H, W)
