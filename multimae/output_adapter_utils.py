"""Convolutional pieces of the dense fine-tuning heads: the ConvNeXt block and the DPT
reassemble/fusion modules. Module and parameter names (``resConfUnit1``, ``layer1_rn``, ...) are the
key names of the released fine-tuning checkpoints.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .multimae_utils import DropPath

__all__ = [
    "ConvNeXtBlock",
    "Interpolate",
    "ResidualConvUnit_custom",
    "FeatureFusionBlock_custom",
    "make_scratch",
    "make_fusion_block",
]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block on ``(B, dim, H, W)``: depthwise 7x7 conv -> LayerNorm -> Linear(4 dim) -> GELU ->
    Linear(dim) -> optional layer scale ``gamma`` -> residual (with DropPath).
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # channels-last for LayerNorm/Linear
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class Interpolate(nn.Module):
    """``F.interpolate`` as a module (for use inside ``nn.Sequential``)."""

    def __init__(self, scale_factor: float, mode: str, align_corners: Optional[bool] = False):
        super().__init__()
        self.scale_factor = scale_factor
        self.mode = mode
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class ResidualConvUnit_custom(nn.Module):
    """``x + conv2(act(conv1(act(x))))`` on ``(B, features, H, W)``, optional BatchNorm after each conv.

    ``activation`` must not work in place: it is applied to the residual input.
    """

    def __init__(self, features: int, activation: nn.Module, bn: bool):
        super().__init__()
        self.bn = bn
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=not bn)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=not bn)
        if bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(x))
        if self.bn:
            out = self.bn1(out)
        out = self.conv2(self.activation(out))
        if self.bn:
            out = self.bn2(out)
        return out + x


class FeatureFusionBlock_custom(nn.Module):
    """DPT fusion: ``out_conv(up2(rcu2(x0 + rcu1(x1))))`` (the ``x1`` branch only if given).

    ``forward(x0 (B, F, H, W), [x1 (B, F, H, W)]) -> (B, F or F/2, 2H, 2W)``.
    """

    def __init__(self, features: int, activation: nn.Module, deconv: bool = False, bn: bool = False,
                 expand: bool = False, align_corners: bool = True):
        super().__init__()
        self.deconv = deconv
        self.align_corners = align_corners
        self.expand = expand
        out_features = features // 2 if expand else features
        self.out_conv = nn.Conv2d(features, out_features, kernel_size=1, stride=1, padding=0, bias=True)
        self.resConfUnit1 = ResidualConvUnit_custom(features, activation, bn)
        self.resConfUnit2 = ResidualConvUnit_custom(features, activation, bn)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        if len(xs) == 2:
            out = out + self.resConfUnit1(xs[1])
        out = self.resConfUnit2(out)
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        return self.out_conv(out)


def make_scratch(in_shape: Sequence[int], out_shape: int, groups: int = 1, expand: bool = False) -> nn.Module:
    """3x3 convs (no bias) mapping the four reassembled feature maps to the fusion width.

    They are registered twice, as ``layer{1..4}_rn`` and as the list ``layer_rn`` (the released state
    dict contains both key spellings for the same tensors).
    """
    widths = [out_shape] * 4
    if expand:
        widths = [out_shape, out_shape * 2, out_shape * 4, out_shape * 8]
    scratch = nn.Module()
    convs = [nn.Conv2d(in_shape[i], widths[i], kernel_size=3, stride=1, padding=1, bias=False, groups=groups)
             for i in range(4)]
    for i, conv in enumerate(convs):
        setattr(scratch, f"layer{i + 1}_rn", conv)
    scratch.layer_rn = nn.ModuleList(convs)
    return scratch


def make_fusion_block(features: int, use_bn: bool) -> FeatureFusionBlock_custom:
    """DPT fusion block with a (non-inplace) ReLU and ``align_corners=True`` up-sampling."""
    return FeatureFusionBlock_custom(features, nn.ReLU(inplace=False), deconv=False, bn=use_bn, expand=False,
                                     align_corners=True)
