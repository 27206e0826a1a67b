"""Transformer building blocks shared by the encoder and the adapters.

Parameter names (``qkv``, ``proj``, ``q``, ``kv``, ``fc1``, ``fc2``, ``norm1``, ``norm2``) follow the
published MultiMAE code so that its checkpoints load unchanged. ``DropPath`` and ``trunc_normal_``
come from timm.
"""
from __future__ import annotations

import math
from typing import Tuple, Type, TypeVar, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

__all__ = [
    "pair",
    "build_2d_sincos_posemb",
    "set_attention_impl",
    "get_attention_impl",
    "Mlp",
    "Attention",
    "CrossAttention",
    "Block",
    "DropPath",
    "trunc_normal_",
]

T = TypeVar("T")

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
    ``'sdpa'`` always uses the fused call; ``'math'`` is the explicit ``softmax(q k^T * scale) v``
    formulation of the published code, kept for benchmarks and equivalence tests.
    """
    global _attention_impl
    if impl not in _ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {_ATTENTION_IMPLS}")
    _attention_impl = impl


def get_attention_impl() -> str:
    """Return the currently selected attention implementation (``'auto'``, ``'sdpa'`` or ``'math'``)."""
    return _attention_impl


def pair(t: Union[T, Tuple[T, T]]) -> Tuple[T, T]:
    """Return ``t`` if it is already a tuple, else ``(t, t)``."""
    return t if isinstance(t, tuple) else (t, t)


def build_2d_sincos_posemb(h: int, w: int, embed_dim: int = 1024, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding with the published channel layout.

    Returns a ``(1, embed_dim, h, w)`` float32 tensor. With ``q = embed_dim // 4`` and
    ``omega_k = temperature ** -(k / q)``, the vector at (row ``a``, column ``b``) is
    ``[sin(i omega), cos(i omega), sin(j omega), cos(j omega)]`` where ``n = a * w + b``,
    ``i = n // h`` and ``j = n % h``. For square grids ``i`` is the row and ``j`` the column;
    for non-square grids this reproduces the published (scrambled) layout on purpose, because the
    released weights were trained with it.
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


class Mlp(nn.Module):
    """``fc1 -> act -> fc2 -> dropout`` on ``(..., in_features)``.

    Unlike timm's ``Mlp`` there is no dropout between the activation and ``fc2`` (published layout).
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection: ``(B, N, dim) -> (B, N, dim)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # unbind (not qkv[0], qkv[1], qkv[2]): its backward stacks the three gradients in one pass instead
        # of zero-filling and copying into a 3x buffer three times
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = _attend(q, k, v, self.scale, self.attn_drop, self.training)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries ``x (B, N, dim)`` attend to ``context (B, M, dim)`` -> ``(B, N, dim)``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CrossAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        k, v = self.kv(context).reshape(B, M, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = _attend(q, k, v, self.scale, self.attn_drop, self.training)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DP(attn(norm1(x)))`` then ``x + DP(mlp(norm2(x)))`` on ``(B, N, dim)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def xavier_uniform_fused_(weight: torch.Tensor, num_fused: int) -> None:
    """Xavier-uniform init of a Linear weight that packs ``num_fused`` projections (qkv: 3, kv: 2).

    The bound uses the fan-out of one projection: ``sqrt(6 / (out / num_fused + in))``.
    """
    bound = math.sqrt(6.0 / float(weight.shape[0] // num_fused + weight.shape[1]))
    nn.init.uniform_(weight, -bound, bound)
