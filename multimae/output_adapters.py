"""Output adapters: map encoder tokens to a task prediction.

* ``SpatialOutputAdapter``: the pre-training decoder (cross-attention from task queries to the visible
  encoder tokens), predicts a dense map per masked-autoencoding target.
* ``LinearOutputAdapter``: pooled tokens -> LayerNorm -> Linear (classification).
* ``SegmenterMaskTransformerAdapter``, ``ConvNeXtAdapter``, ``DPTOutputAdapter``: dense fine-tuning heads.

All adapters receive the encoder width late through ``init(dim_tokens_enc)``. Dense heads read only
the tokens of their ``main_tasks`` (several main tasks are concatenated along channels).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .multimae_utils import CrossAttention, Mlp, transformer_blocks, trunc_normal_
from .output_adapter_utils import ConvNeXtBlock, Interpolate, make_fusion_block, make_scratch
from .pos_embed import make_pos_emb, pair, patch_size_at_stride, pos_emb_tokens, token_grid

__all__ = [
    "SpatialOutputAdapter",
    "LinearOutputAdapter",
    "SegmenterMaskTransformerAdapter",
    "ConvNeXtAdapter",
    "DPTOutputAdapter",
]

InputInfo = Dict[str, Any]


def _init_trunc_normal(m: nn.Module) -> None:
    """Adapter-local init (Linear trunc-normal 0.02, LayerNorm 1/0). ``MultiMAE`` re-initialises every
    Linear of the whole model with Xavier after building it, so this only matters for stand-alone use."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _main_task_tokens(encoder_tokens: torch.Tensor, input_info: InputInfo, main_tasks: Sequence[str]) -> torch.Tensor:
    """Slice the tokens of ``main_tasks`` out of ``(B, N, D)`` and concatenate them along channels."""
    tasks = input_info["tasks"]
    missing = [t for t in main_tasks if t not in tasks]
    if missing:
        raise KeyError(f"main task(s) {missing} of the output adapter are not among the input tasks "
                       f"{list(tasks)}")
    parts = [encoder_tokens[:, tasks[t]["start_idx"]:tasks[t]["end_idx"]] for t in main_tasks]
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class SpatialOutputAdapter(nn.Module):
    """Pre-training decoder for one dense target.

    The projected encoder tokens are completed with ``mask_token`` at the hidden positions, put back
    in input order, and given task + position embeddings. Queries are this task's own tokens (if
    ``use_task_queries`` and the task is an input) or mask tokens with position (+ task) embedding.
    Queries cross-attend to the visible tokens (+ global tokens), then an MLP and an optional stack
    of ``depth`` transformer blocks run, and a linear layer predicts each patch.

    ``forward(encoder_tokens (B, n_vis + n_global, D_enc), input_info, ids_keep (B, n_vis),
    ids_restore (B, N_total)) -> (B, num_channels, H / stride_level, W / stride_level)``.
    """

    def __init__(self, num_channels: int, stride_level: int, patch_size_full: Union[int, Tuple[int, int]],
                 dim_tokens_enc: Optional[int] = None, dim_tokens: int = 256, depth: int = 0,
                 learnable_pos_emb: bool = False, image_size: Union[int, Tuple[int, int]] = 224,
                 mlp_ratio: float = 4.0, num_heads: int = 8, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6), use_task_queries: bool = True,
                 task: Optional[str] = None, context_tasks: Optional[Sequence[str]] = None,
                 use_xattn: bool = True):
        super().__init__()
        self.num_channels = num_channels
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens_enc = dim_tokens_enc
        self.dim_tokens = dim_tokens
        self.depth = depth
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        self.use_task_queries = use_task_queries
        self.task = task
        self.use_xattn = use_xattn
        self.P_H, self.P_W = patch_size_at_stride(self.patch_size_full, stride_level)
        self._build_embeddings(context_tasks)
        if use_xattn:
            self.decoder = CrossAttention(dim_tokens, num_heads=num_heads, qkv_bias=qkv_bias,
                                          attn_drop=attn_drop_rate, proj_drop=drop_rate)
            self.context_norm = norm_layer(dim_tokens)
            self.query_norm = norm_layer(dim_tokens)
            self.out_norm = norm_layer(dim_tokens)
            self.mlp = Mlp(in_features=dim_tokens, hidden_features=int(dim_tokens * mlp_ratio))
        blocks = transformer_blocks(depth, dim_tokens, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                    drop_path_rate, norm_layer)
        self.decoder_transformer = nn.Sequential(*blocks) if depth > 0 else nn.Identity()
        self.dim_patch = num_channels * self.P_H * self.P_W
        self.out_proj = nn.Linear(dim_tokens, self.dim_patch)
        self.grad_checkpointing = False
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc=dim_tokens_enc)

    def _build_embeddings(self, context_tasks: Optional[Sequence[str]]) -> None:
        """Task embeddings (one per context task, trunc-normal), ``mask_token`` (zeros) and ``pos_emb``
        (fixed sin-cos, or trunc-normal if ``learnable_pos_emb``), all ``dim_tokens`` wide."""
        d = self.dim_tokens
        self.task_embeddings = None
        if context_tasks is not None:
            # sorted by task name, the key order of the released checkpoints
            self.task_embeddings = nn.ParameterDict(
                {t: nn.Parameter(torch.zeros(1, 1, d)) for t in sorted(context_tasks)})
            for emb in self.task_embeddings.values():
                trunc_normal_(emb, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        h, w = self._grid(self.image_size)
        self.pos_emb = make_pos_emb(d, h, w, sincos=not self.learnable_pos_emb, learnable=self.learnable_pos_emb)

    def _grid(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """Decoder token grid ``(N_H, N_W)`` for a full-resolution ``image_size``."""
        return token_grid(image_size, self.stride_level, (self.P_H, self.P_W))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the cross-attention and each decoder block in backward instead of storing activations."""
        self.grad_checkpointing = enable

    def _checkpointed(self, fn: Any, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the projection from the encoder width ``dim_tokens_enc`` to the decoder width."""
        self.dim_tokens_enc = dim_tokens_enc
        self.proj_context = nn.Linear(dim_tokens_enc, self.dim_tokens)

    def no_weight_decay(self) -> Set[str]:
        return {"pos_emb", "mask_token", "task_embeddings"}

    def _task_embedding(self, task: str) -> Optional[torch.Tensor]:
        if self.task_embeddings is not None and task in self.task_embeddings:
            return self.task_embeddings[task]
        return None

    def _with_task_embedding(self, x: torch.Tensor, task: Optional[str]) -> torch.Tensor:
        task_emb = self._task_embedding(task)
        return x + task_emb if task_emb is not None else x

    def _context_embeddings(self, input_info: InputInfo, size: Tuple[int, int]) -> torch.Tensor:
        """Task + position embedding of every input token, in input order: ``(1, N_total, dim_tokens)``."""
        pos = pos_emb_tokens(self.pos_emb, size)
        embs = []
        for task, info in input_info["tasks"].items():
            if info["num_tokens"] != pos.shape[1]:
                raise ValueError(
                    f"SpatialOutputAdapter(task={self.task!r}): input task {task!r} has {info['num_tokens']} tokens "
                    f"but the decoder grid {size} has {pos.shape[1]}; all inputs must share the token grid (a "
                    f"modality of stride level s is given at 1/s of the image size: semseg maps at 1/4)")
            embs.append(self._with_task_embedding(pos, task))
        return torch.cat(embs, dim=1)

    def get_queries_and_context(self, context_tokens: torch.Tensor, input_info: InputInfo, ids_keep: torch.Tensor,
                                ids_restore: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Build decoder queries ``(B, N_H*N_W, d)`` and context ``(B, n_vis + n_global, d)`` from the
        projected encoder tokens ``(B, n_vis + n_global, d)``.

        Conceptually every input position gets its visible token or ``mask_token`` (``ids_restore`` puts them
        back in input order) plus its task + position embedding; queries are this task's positions and the
        context the ``ids_keep`` positions of that sequence. Only those rows are gathered: the full
        ``(B, N_total, d)`` sequence is never built (it is 3x the queries and 6x the context at the default
        sizes, and its gather, embedding add and their backward were a visible share of the step).
        """
        B, _, d = context_tokens.shape
        grid = self._grid(input_info["image_size"])
        n_global = input_info.get("num_global_tokens", 0)
        n_vis = context_tokens.shape[1] - n_global
        visible = context_tokens[:, :n_vis]
        global_tokens = context_tokens[:, n_vis:]
        embeddings = self._context_embeddings(input_info, grid)  # (1, N_total, d)
        # row n_vis stands for every hidden position: indices >= n_vis of ids_restore point at it
        tokens_or_mask = torch.cat([visible, self.mask_token.expand(B, 1, d)], dim=1)

        def tokens_at(src: torch.Tensor) -> torch.Tensor:
            """Rows ``src (B, n)`` of ``tokens_or_mask`` (hidden positions clamped onto the mask row)."""
            src = src.clamp(max=n_vis).unsqueeze(-1).expand(-1, -1, d)
            return torch.gather(tokens_or_mask, 1, src)

        tasks = input_info["tasks"]
        if self.use_task_queries and self.task in tasks:
            start, end = tasks[self.task]["start_idx"], tasks[self.task]["end_idx"]
            queries = tokens_at(ids_restore[:, start:end]) + embeddings[:, start:end]
        else:
            queries = self._with_task_embedding(self.mask_token + pos_emb_tokens(self.pos_emb, grid), self.task)
            queries = queries.expand(B, -1, -1)

        # position ids_keep[b, j] holds visible token j whenever ids_keep and ids_restore come from one
        # shuffle; composing the two indices keeps any other pair exact as well
        context = tokens_at(torch.gather(ids_restore, 1, ids_keep)) + embeddings[0][ids_keep]
        if n_global > 0:
            context = torch.cat([context, global_tokens], dim=1)
        return queries, context

    def _cross_attend(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # no residual around the cross-attention: its output replaces the queries
        x = self.decoder(self.query_norm(queries), self.context_norm(context))
        return x + self.mlp(self.out_norm(x))

    def forward(self, encoder_tokens: torch.Tensor, input_info: InputInfo, ids_keep: torch.Tensor,
                ids_restore: torch.Tensor) -> torch.Tensor:
        if self.dim_tokens_enc is None:
            raise RuntimeError("SpatialOutputAdapter: call init(dim_tokens_enc) before forward")
        N_H, N_W = self._grid(input_info["image_size"])
        x = self.proj_context(encoder_tokens)
        queries, context = self.get_queries_and_context(x, input_info, ids_keep, ids_restore)
        x = self._checkpointed(self._cross_attend, queries, context) if self.use_xattn else queries
        if isinstance(self.decoder_transformer, nn.Sequential):
            for block in self.decoder_transformer:
                x = self._checkpointed(block, x)
        x = self.out_proj(x)  # (B, N_H*N_W, C*P_H*P_W)
        B = x.shape[0]
        x = x.reshape(B, N_H, N_W, self.num_channels, self.P_H, self.P_W)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(B, self.num_channels, N_H * self.P_H, N_W * self.P_W)


class LinearOutputAdapter(nn.Module):
    """Classification head: mean over all tokens (or the last token) -> LayerNorm -> Linear.

    ``forward(encoder_tokens (B, N, D)) -> (B, num_classes)``.
    """

    def __init__(self, num_classes: int, dim_tokens_enc: Optional[int] = None, use_mean_pooling: bool = True,
                 norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6), init_scale: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.dim_tokens_enc = dim_tokens_enc
        self.use_mean_pooling = use_mean_pooling
        self.norm_layer = norm_layer
        self.init_scale = init_scale
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc=dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create norm and head for encoder width ``dim_tokens_enc``."""
        self.dim_tokens_enc = dim_tokens_enc
        self.norm = self.norm_layer(dim_tokens_enc)
        self.head = nn.Linear(dim_tokens_enc, self.num_classes) if self.num_classes > 0 else nn.Identity()
        self.apply(_init_trunc_normal)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.init_scale)
                self.head.bias.mul_(self.init_scale)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "") -> None:
        self.num_classes = num_classes
        self.init(dim_tokens_enc=self.dim_tokens_enc)

    def forward(self, encoder_tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.dim_tokens_enc is None:
            raise RuntimeError("LinearOutputAdapter: call init(dim_tokens_enc) before forward")
        x = encoder_tokens.mean(dim=1) if self.use_mean_pooling else encoder_tokens[:, -1]
        return self.head(self.norm(x))


class _MainTaskHead(nn.Module):
    """Shared part of the Segmenter and ConvNeXt heads: the main tasks' tokens, concatenated along
    channels, are projected to ``embed_dim`` by ``proj_dec`` (created by ``init``)."""

    def __init__(self, num_classes: int, embed_dim: int, main_tasks: Union[str, Sequence[str]], patch_size: int):
        super().__init__()
        self.main_tasks = _as_task_list(main_tasks)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_classes = num_classes

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the projection from the (concatenated) main-task tokens to ``embed_dim``."""
        self.in_channels = dim_tokens_enc * len(self.main_tasks)
        self.proj_dec = nn.Linear(self.in_channels, self.embed_dim)
        _init_trunc_normal(self.proj_dec)

    def _project(self, encoder_tokens: torch.Tensor, input_info: InputInfo) -> torch.Tensor:
        """``(B, N, D_enc)`` encoder tokens -> projected main-task tokens ``(B, N_task, embed_dim)``."""
        return self.proj_dec(_main_task_tokens(encoder_tokens, input_info, self.main_tasks))


class SegmenterMaskTransformerAdapter(_MainTaskHead):
    """Segmenter mask-transformer head: class embeddings are decoded jointly with the patch tokens,
    masks are cosine similarities between patch and class features.

    ``forward(encoder_tokens (B, N, D), input_info) -> (B, num_classes, H, W)``.
    """

    def __init__(self, num_classes: int, depth: int = 2, num_heads: int = 12, embed_dim: int = 768,
                 mlp_ratio: float = 4, drop_path_rate: float = 0.1, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, qkv_bias: bool = True, main_tasks: Sequence[str] = ("rgb",),
                 patch_size: int = 16, norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 **kwargs: Any):
        super().__init__(num_classes, embed_dim, main_tasks, patch_size)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        trunc_normal_(self.cls_emb, std=0.02)
        self.patch_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.classes_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.blocks = nn.ModuleList(transformer_blocks(depth, embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate,
                                                       attn_drop_rate, drop_path_rate, norm_layer))
        self.decoder_norm = norm_layer(embed_dim)
        self.mask_norm = norm_layer(num_classes)
        self.apply(_init_trunc_normal)

    def forward(self, encoder_tokens: torch.Tensor, input_info: InputInfo, **kwargs: Any) -> torch.Tensor:
        H, W = input_info["image_size"]
        N_H, N_W = H // self.patch_size, W // self.patch_size
        x = self._project(encoder_tokens, input_info)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        patches = F.normalize(self.patch_proj(x[:, :-self.num_classes]), dim=2, p=2)
        classes = F.normalize(self.classes_proj(x[:, -self.num_classes:]), dim=2, p=2)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        masks = masks.transpose(1, 2).reshape(masks.shape[0], self.num_classes, N_H, N_W)
        return F.interpolate(masks, size=(H, W), mode="bilinear")


class ConvNeXtAdapter(_MainTaskHead):
    """ConvNeXt semantic-segmentation head.

    Each main-task token is projected to ``embed_dim`` channels and split into ``preds_per_patch``
    sub-tokens of ``embed_dim // preds_per_patch`` channels, laid out as a sqrt(p) x sqrt(p) grid
    inside its patch; ConvNeXt blocks and a 1x1 conv follow, then interpolation to the image size.

    ``forward(encoder_tokens (B, N, D), input_info) -> (B, num_classes, H, W)``.
    """

    def __init__(self, num_classes: int, embed_dim: int = 6144, preds_per_patch: int = 16,
                 main_tasks: Sequence[str] = ("rgb",), patch_size: int = 16, depth: int = 4,
                 interpolate_mode: str = "bilinear", **kwargs: Any):
        super().__init__(num_classes, embed_dim, main_tasks, patch_size)
        side = int(round(preds_per_patch ** 0.5))
        if side * side != preds_per_patch:
            raise ValueError(f"ConvNeXtAdapter: preds_per_patch must be a square number, got {preds_per_patch}")
        if embed_dim % preds_per_patch != 0:
            raise ValueError(f"ConvNeXtAdapter: embed_dim={embed_dim} is not divisible by "
                             f"preds_per_patch={preds_per_patch}")
        self.preds_per_patch = preds_per_patch
        self.class_dim = embed_dim // preds_per_patch
        self.interpolate_mode = interpolate_mode
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim=self.class_dim) for _ in range(depth)])
        self.final_layer = nn.Conv2d(self.class_dim, num_classes, kernel_size=1)
        self.apply(_init_trunc_normal)

    def forward(self, encoder_tokens: torch.Tensor, input_info: InputInfo, **kwargs: Any) -> torch.Tensor:
        H, W = input_info["image_size"]
        N_H, N_W = H // self.patch_size, W // self.patch_size
        side = int(round(self.preds_per_patch ** 0.5))
        x = self._project(encoder_tokens, input_info)  # (B, N, p*c)
        B = x.shape[0]
        x = x.reshape(B, N_H, N_W, side, side, self.class_dim)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.class_dim, N_H * side, N_W * side)
        x = self.final_layer(self.blocks(x))
        return F.interpolate(x, size=(H, W), mode=self.interpolate_mode)


def _dpt_head(head_type: str, feature_dim: int, num_classes: int, use_bn: bool) -> nn.Sequential:
    """DPT prediction head on the finest fused map ``(B, feature_dim, h, w) -> (B, num_classes, 2h, 2w)``."""
    if head_type == "regression":
        return nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, kernel_size=3, stride=1, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, num_classes, kernel_size=1, stride=1, padding=0),
        )
    return nn.Sequential(
        nn.Conv2d(feature_dim, feature_dim, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(feature_dim) if use_bn else nn.Identity(),
        nn.ReLU(True),
        nn.Dropout(0.1, False),
        nn.Conv2d(feature_dim, num_classes, kernel_size=1),
        Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
    )


def _dpt_reassemble(dim_in: int, dim_out: int, stage: int) -> nn.Sequential:
    """Reassemble stage ``stage`` (0-3): 1x1 conv to ``dim_out``, then x4 / x2 up-sampling, identity or
    x2 down-sampling of the ``(B, dim_in, N_H, N_W)`` token map."""
    layers = [nn.Conv2d(dim_in, dim_out, kernel_size=1, stride=1, padding=0)]
    if stage < 2:
        scale = 4 if stage == 0 else 2
        layers.append(nn.ConvTranspose2d(dim_out, dim_out, kernel_size=scale, stride=scale, padding=0, bias=True))
    elif stage == 3:
        layers.append(nn.Conv2d(dim_out, dim_out, kernel_size=3, stride=2, padding=1))
    return nn.Sequential(*layers)


class DPTOutputAdapter(nn.Module):
    """DPT dense head (regression or semantic segmentation) over four encoder layers.

    Needs the list of all encoder layer outputs (``MultiViT.forward(..., return_all_layers=True)``);
    ``hooks`` picks the layers and ``layer_dims`` the reassembled widths (configurable so that small
    encoders work).

    ``forward(encoder_tokens: list of (B, N, D), input_info) -> (B, num_classes, H, W)``.
    """

    def __init__(self, num_classes: int = 3, stride_level: int = 1, patch_size: Union[int, Tuple[int, int]] = 16,
                 main_tasks: Sequence[str] = ("rgb",), hooks: Sequence[int] = (2, 5, 8, 11),
                 layer_dims: Sequence[int] = (96, 192, 384, 768), feature_dim: int = 256, use_bn: bool = False,
                 dim_tokens_enc: Optional[int] = None, head_type: str = "regression", **kwargs: Any):
        super().__init__()
        if len(hooks) != 4 or len(layer_dims) != 4:
            raise ValueError(f"DPTOutputAdapter: hooks and layer_dims need 4 entries each, got {list(hooks)} "
                             f"and {list(layer_dims)}")
        if head_type not in ("regression", "semseg"):
            raise ValueError(f"DPTOutputAdapter: head_type must be 'regression' or 'semseg', got {head_type!r}")
        self.num_channels = num_classes
        self.stride_level = stride_level
        self.patch_size = pair(patch_size)
        self.main_tasks = _as_task_list(main_tasks)
        self.hooks = list(hooks)
        self.layer_dims = list(layer_dims)
        self.feature_dim = feature_dim
        self.head_type = head_type
        self.dim_tokens_enc = None
        self.P_H, self.P_W = patch_size_at_stride(self.patch_size, stride_level)

        self.scratch = make_scratch(self.layer_dims, feature_dim, groups=1, expand=False)
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", make_fusion_block(feature_dim, use_bn))
        self.head = _dpt_head(head_type, feature_dim, num_classes, use_bn)
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc=dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the reassemble layers (``act_{1..4}_postprocess``, aliased as ``act_postprocess``)."""
        self.dim_tokens_enc = dim_tokens_enc * len(self.main_tasks)
        stages = [_dpt_reassemble(self.dim_tokens_enc, dim, i) for i, dim in enumerate(self.layer_dims)]
        for i, stage in enumerate(stages):
            setattr(self, f"act_{i + 1}_postprocess", stage)
        self.act_postprocess = nn.ModuleList(stages)

    def forward(self, encoder_tokens: List[torch.Tensor], input_info: InputInfo, **kwargs: Any) -> torch.Tensor:
        if self.dim_tokens_enc is None:
            raise RuntimeError("DPTOutputAdapter: call init(dim_tokens_enc) before forward")
        if isinstance(encoder_tokens, torch.Tensor):
            raise TypeError("DPTOutputAdapter needs the outputs of all encoder layers; call the model with "
                            "return_all_layers=True")
        N_H, N_W = token_grid(input_info["image_size"], self.stride_level, (self.P_H, self.P_W))
        layers = []
        for i, hook in enumerate(self.hooks):
            x = _main_task_tokens(encoder_tokens[hook], input_info, self.main_tasks)  # (B, N, C)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], N_H, N_W)
            layers.append(self.scratch.layer_rn[i](self.act_postprocess[i](x)))
        path = self.scratch.refinenet4(layers[3])
        path = self.scratch.refinenet3(path, layers[2])
        path = self.scratch.refinenet2(path, layers[1])
        path = self.scratch.refinenet1(path, layers[0])
        return self.head(path)


def _as_task_list(main_tasks: Union[str, Sequence[str]]) -> List[str]:
    """Accept ``'rgb'`` or ``'rgb-depth'`` strings as well as sequences of task names."""
    if isinstance(main_tasks, str):
        return main_tasks.split("-")
    return list(main_tasks)
