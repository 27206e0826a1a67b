"""Fine-tuning models: a MultiViT with registry input adapters, the dense heads, and ``--finetune`` weights.

Dense heads for tiny encoders: :func:`dpt_hooks` / :func:`dpt_layer_dims` / :func:`dpt_feature_dim` derive
the DPT taps and widths from the encoder depth and width (ViT-B gives ``[2, 5, 8, 11]`` /
``[96, 192, 384, 768]`` / 256, the head of the paper), read from the registered model on the meta device
(:func:`encoder_info`), so no size table is duplicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from utils.engine.trainer import unwrap_model

__all__ = ["EncoderInfo", "encoder_info", "dpt_hooks", "dpt_layer_dims", "dpt_feature_dim", "HEADS",
           "build_dense_head", "build_multivit", "load_pretrained", "use_channels_last"]


@dataclass(frozen=True)
class EncoderInfo:
    """Width and number of blocks of an encoder."""
    dim: int
    depth: int


def encoder_info(model_name: str, **model_kwargs: Any) -> EncoderInfo:
    """Width/depth of the registered model ``model_name`` (with overrides such as ``depth=6``), read from an
    instance built on the meta device (no memory, no time)."""
    from multimae import PatchedInputAdapter, create_model

    with torch.device('meta'):
        probe = create_model(model_name, input_adapters={'rgb': PatchedInputAdapter(3, 1, 16, image_size=16)},
                             output_adapters=None, **model_kwargs)
    return EncoderInfo(dim=probe.dim_tokens, depth=probe.get_num_layers())


def dpt_hooks(depth: int) -> list[int]:
    """Encoder blocks the DPT head taps: the ends of the four quarters (12 blocks -> [2, 5, 8, 11],
    24 -> [5, 11, 17, 23])."""
    if depth < 4:
        raise ValueError(f"the DPT head taps 4 encoder blocks; the encoder has only {depth}")
    return [round(depth * (i + 1) / 4) - 1 for i in range(4)]


def dpt_layer_dims(dim: int) -> list[int]:
    """Reassemble widths of the DPT head: [dim/8, dim/4, dim/2, dim] (768 -> [96, 192, 384, 768])."""
    return [max(1, dim // 8), max(1, dim // 4), max(1, dim // 2), dim]


def dpt_feature_dim(dim: int) -> int:
    """Fusion width of the DPT head: dim/3 capped at 256 (768 -> 256, 192 -> 64), so a tiny
    encoder does not carry a ViT-B-sized decoder."""
    return min(256, max(32, dim // 3))


HEADS = ('convnext', 'dpt', 'segmenter')


def build_dense_head(kind: str, num_classes: int, main_tasks: Sequence[str], patch_size: int, enc: EncoderInfo,
                     *, decoder_dim: int = 6144, decoder_depth: int = 4, preds_per_patch: int = 16,
                     interpolate_mode: str = 'bilinear', drop_path_decoder: float = 0.0,
                     head_type: str = 'regression') -> nn.Module:
    """A dense output adapter predicting ``num_classes`` channels at full resolution from the tokens of
    ``main_tasks``: 'convnext' (ConvNeXtAdapter), 'dpt' (DPTOutputAdapter with hooks/widths derived from
    ``enc``; ``head_type`` 'regression' or 'semseg') or 'segmenter' (SegmenterMaskTransformerAdapter)."""
    from multimae import ConvNeXtAdapter, DPTOutputAdapter, SegmenterMaskTransformerAdapter

    main_tasks = list(main_tasks)
    if kind == 'convnext':
        return ConvNeXtAdapter(num_classes, embed_dim=decoder_dim, preds_per_patch=preds_per_patch,
                               main_tasks=main_tasks, patch_size=patch_size, depth=decoder_depth,
                               interpolate_mode=interpolate_mode)
    if kind == 'dpt':
        return DPTOutputAdapter(num_classes, stride_level=1, patch_size=patch_size, main_tasks=main_tasks,
                                hooks=dpt_hooks(enc.depth), layer_dims=dpt_layer_dims(enc.dim),
                                feature_dim=dpt_feature_dim(enc.dim), head_type=head_type)
    if kind == 'segmenter':
        return SegmenterMaskTransformerAdapter(num_classes, depth=decoder_depth, embed_dim=decoder_dim,
                                               drop_path_rate=drop_path_decoder, main_tasks=main_tasks,
                                               patch_size=patch_size)
    raise ValueError(f"unknown output adapter {kind!r}; expected one of {', '.join(HEADS)}")


def build_multivit(model_name: str, in_domains: Sequence[str], output_adapters: Mapping[str, nn.Module] | None,
                   patch_size: int, input_size: int, *, learnable_pos_emb: bool = False,
                   input_adapter_kwargs: Mapping[str, dict] | None = None, **model_kwargs: Any) -> nn.Module:
    """A MultiViT with input adapters for ``in_domains`` from the modality registry (built for
    ``input_size``) and the given output adapters. ``input_adapter_kwargs`` adds per-domain adapter
    arguments (e.g. ``{'semseg': {'emb_padding_idx': 133}}``); ``model_kwargs`` go to the constructor
    (``num_global_tokens``, ``drop_path_rate``, ``drop_rate``, ...; None values keep the defaults)."""
    from multimae import create_model
    from utils.data.modalities import build_input_adapters

    inputs = build_input_adapters(list(in_domains), patch_size, input_size,
                                  per_domain_kwargs=dict(input_adapter_kwargs or {}),
                                  learnable_pos_emb=learnable_pos_emb)
    return create_model(model_name, input_adapters=inputs,
                        output_adapters=dict(output_adapters) if output_adapters else None, **model_kwargs)


def load_pretrained(model: nn.Module, path: str, allow_missing: Sequence[str] = (), output_dir: str = "") -> Any:
    """Load ``--finetune`` weights (MultiMAE / MultiViT / timm ViT; .pth, .safetensors or URL) through
    :func:`utils.weights.load_finetune_weights`: pre-training decoders dropped, class embeddings padded,
    position embeddings interpolated, the loaded/missing/unexpected keys summarised (every key in
    ``output_dir/load_report.txt``), a missing encoder weight an error. Returns the report (None when
    ``path`` is empty)."""
    if not path:
        return None
    from utils.weights import load_finetune_weights

    return load_finetune_weights(unwrap_model(model), path, log=print, allow_missing=allow_missing,
                                 output_dir=output_dir)


def use_channels_last(mode: str, device: torch.device) -> bool:
    """``--channels_last auto|on|off``: channels-last convolution weights pay on CUDA (tensor-core
    convolutions); on CPU it gained 1-2 % (tools/benchmark.py, ViT-S semseg and depth steps), so 'auto' means
    CUDA only."""
    if mode not in ('auto', 'on', 'off'):
        raise ValueError(f"--channels_last must be 'auto', 'on' or 'off', got {mode!r}")
    return mode == 'on' or (mode == 'auto' and torch.device(device).type == 'cuda')

