"""Transformer layers shared by the encoder and the adapters, and the attention-kernel choice.

``Mlp``, ``Attention`` and ``Block`` are timm's classes (same parameter names: ``qkv``, ``proj``,
``fc1``, ``fc2``, ``norm1``, ``norm2``), adapted where this library needs something else: the
attention core goes through a process-wide kernel choice (:func:`set_attention_impl`) and the MLP
drops out only after ``fc2``. ``CrossAttention`` (``q`` and fused ``kv`` projections) has no timm
counterpart with these parameter names and is defined here.
"""
from __future__ import annotations

import math
from typing import Any, List, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import DropPath, Mlp as TimmMlp, trunc_normal_
from timm.models.vision_transformer import Block as TimmBlock

from .pos_embed import build_2d_sincos_posemb, pair

__all__ = [
    "pair",
    "build_2d_sincos_posemb",
    "set_attention_impl",
    "get_attention_impl",
    "Mlp",
    "Attention",
    "CrossAttention",
    "Block",
    "transformer_blocks",
    "DropPath",
    "trunc_normal_",
    "xavier_uniform_fused_",
]

_ATTENTION_IMPLS = ("auto", "sdpa", "math")
_attention_impl = "auto"
# 'auto' on CPU under bf16/fp16: PyTorch's fused CPU attention kernel was 2-4.5x slower than the explicit
# formulation (forward + backward, torch 2.14, AVX-512 with bf16, 2 threads) for 99-589 keys and only
# faster from ~1500 keys on; in fp32 and on CUDA the fused kernel wins everywhere we measured.
_CPU_LOW_PRECISION_SDPA_MIN_KEYS = 1024


def set_attention_impl(impl: str) -> None:
    """Select the attention kernel process-wide.

    ``'auto'`` (default) uses ``F.scaled_dot_product_attention`` (fused kernels where available) except
    for CPU tensors in bf16/fp16 with fewer than 1024 keys, where the explicit formulation is faster;
    ``'sdpa'`` always uses the fused call; ``'math'`` always uses the explicit
    ``softmax(q k^T * scale) v``, for benchmarks and equivalence tests.
    """
    global _attention_impl
    if impl not in _ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {_ATTENTION_IMPLS}")
    _attention_impl = impl


def get_attention_impl() -> str:
    """Return the currently selected attention implementation (``'auto'``, ``'sdpa'`` or ``'math'``)."""
    return _attention_impl


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_drop: nn.Dropout,
            training: bool) -> torch.Tensor:
    """Scaled dot-product attention on ``(B, heads, N, head_dim)`` tensors -> ``(B, heads, N, head_dim)``."""
    impl = _attention_impl
    if impl == "auto":
        low_precision_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        impl = "math" if low_precision_cpu and k.shape[-2] < _CPU_LOW_PRECISION_SDPA_MIN_KEYS else "sdpa"
    if impl == "sdpa":
        p = attn_drop.p if training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale)
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    attn = attn_drop(attn)
    return attn @ v


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, head_dim) -> (B, N, heads * head_dim)``."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


def _check_heads(layer: str, dim: int, num_heads: int) -> None:
    if dim % num_heads != 0:
        raise ValueError(f"{layer}: dim={dim} is not divisible by num_heads={num_heads}")


class Mlp(TimmMlp):
    """timm's ``Mlp`` (``fc1 -> act -> fc2``) on ``(..., in_features)`` with a scalar ``drop`` applied only
    after ``fc2``: ``drop1`` (between the activation and ``fc2``) is a no-op. A ``(p1, p2)`` tuple sets
    both dropouts as in timm."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Type[nn.Module] = nn.GELU, drop: Union[float, Tuple[float, float]] = 0.0,
                 **kwargs: Any):
        drop = drop if isinstance(drop, tuple) else (0.0, drop)
        super().__init__(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop, **kwargs)


class Attention(TimmAttention):
    """timm's multi-head self-attention (fused ``qkv`` projection): ``(B, N, dim) -> (B, N, dim)``.

    The attention core follows :func:`set_attention_impl` instead of timm's ``fused_attn`` flag. timm
    options this forward does not apply (``scale_norm``, ``gated``, ``attn_head_dim``, ``dim_out``) are
    rejected; ``qk_norm`` works. Attention masks are not supported (the encoder drops tokens instead).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, **kwargs: Any):
        _check_heads("Attention", dim, num_heads)
        unsupported = [k for k in ("scale_norm", "gated", "attn_head_dim", "dim_out") if kwargs.get(k)]
        if unsupported:
            raise ValueError(f"Attention: timm option(s) {unsupported} are not supported")
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         **kwargs)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("Attention: attention masks are not supported")
        B, N, _ = x.shape
        # unbind (not qkv[0], qkv[1], qkv[2]): its backward stacks the three gradients in one pass instead
        # of zero-filling and copying into a 3x buffer three times
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = _attend(q, k, v, self.scale, self.attn_drop, self.training)
        return self.proj_drop(self.proj(_merge_heads(x)))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries ``x (B, N, dim)`` attend to ``context (B, M, dim)`` -> ``(B, N, dim)``.

    ``q`` projects the queries, the fused ``kv`` projection the context (keys first).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        _check_heads("CrossAttention", dim, num_heads)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        M = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = _attend(q, k, v, self.scale, self.attn_drop, self.training)
        return self.proj_drop(self.proj(_merge_heads(x)))


class Block(TimmBlock):
    """timm's pre-norm transformer block on ``(B, N, dim)``: ``x + DP(attn(norm1(x)))`` then
    ``x + DP(mlp(norm2(x)))``, built from this module's :class:`Attention` and :class:`Mlp`.

    ``drop`` is the dropout after the attention and MLP output projections (timm's ``proj_drop``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop,
                         attn_drop=attn_drop, drop_path=drop_path, act_layer=act_layer, norm_layer=norm_layer,
                         mlp_layer=Mlp, attn_layer=Attention)


def transformer_blocks(depth: int, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop: float,
                       attn_drop: float, drop_path_rate: float, norm_layer: Type[nn.Module]) -> List[Block]:
    """``depth`` blocks whose drop-path rate grows linearly from 0 (first) to ``drop_path_rate`` (last)."""
    dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
    return [Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop,
                  attn_drop=attn_drop, drop_path=rate, norm_layer=norm_layer) for rate in dpr]


def xavier_uniform_fused_(weight: torch.Tensor, num_fused: int) -> None:
    """Xavier-uniform init of a Linear weight that packs ``num_fused`` projections (qkv: 3, kv: 2).

    The bound uses the fan-out of one projection: ``sqrt(6 / (out / num_fused + in))``.
    """
    bound = math.sqrt(6.0 / float(weight.shape[0] // num_fused + weight.shape[1]))
    nn.init.uniform_(weight, -bound, bound)
