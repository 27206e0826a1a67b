"""MultiMAE: multi-modal multi-task masked autoencoders (Bachmann et al., ECCV 2022).

A pure model library: models, adapters, losses and the model registry. It does no file I/O and
imports nothing from ``utils`` or ``tools``. Module and parameter names and constructor arguments
match the released MultiMAE checkpoints, which load with ``strict=True``.

>>> from multimae import create_model, PatchedInputAdapter
>>> model = create_model('multivit_tiny', input_adapters={'rgb': PatchedInputAdapter(3, 1, 16, image_size=64)},
...                      output_adapters=None)
"""
from .criterion import MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss
from .input_adapters import PatchedInputAdapter, SemSegInputAdapter
from .multimae import (
    MultiMAE,
    MultiViT,
    multivit_base,
    multivit_huge,
    multivit_large,
    multivit_small,
    multivit_tiny,
    pretrain_multimae_base,
    pretrain_multimae_huge,
    pretrain_multimae_large,
    pretrain_multimae_small,
    pretrain_multimae_tiny,
)
from .multimae_utils import build_2d_sincos_posemb, get_attention_impl, set_attention_impl
from .output_adapters import (
    ConvNeXtAdapter,
    DPTOutputAdapter,
    LinearOutputAdapter,
    SegmenterMaskTransformerAdapter,
    SpatialOutputAdapter,
)
from .registry import create_model, is_model, list_models, model_entrypoint, register_model

__all__ = [
    "MultiMAE", "MultiViT",
    "PatchedInputAdapter", "SemSegInputAdapter",
    "SpatialOutputAdapter", "LinearOutputAdapter", "SegmenterMaskTransformerAdapter", "ConvNeXtAdapter",
    "DPTOutputAdapter",
    "MaskedMSELoss", "MaskedL1Loss", "MaskedCrossEntropyLoss",
    "build_2d_sincos_posemb", "set_attention_impl", "get_attention_impl",
    "create_model", "register_model", "list_models", "is_model", "model_entrypoint",
    "pretrain_multimae_tiny", "pretrain_multimae_small", "pretrain_multimae_base", "pretrain_multimae_large",
    "pretrain_multimae_huge", "multivit_tiny", "multivit_small", "multivit_base", "multivit_large", "multivit_huge",
]
