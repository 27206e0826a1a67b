"""The modality registry: one entry per modality says how to load, transform, encode, decode and score it.

Every modality of the project is defined at the end of this module, and nothing else registers one.
Scripts, datasets and transforms read this registry; adding a modality is one entry::

    register_modality(Modality('normal', num_channels=3, kind='dense', decoder='rgb',
                               value_scale=1 / 255, value_range=(0.0, 1.0), loss='l1',
                               hflip_negate_channels=(0,)))

Domain order matters (it fixes token order and dict order): use ``ordered_domains``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from utils.data.constants import (COCO_SEMSEG_NUM_CLASSES, DEPTH_PNG_SCALE, PSEUDO_SEMSEG, SEG_IGNORE_INDEX,
                                  SEMSEG_STRIDE, TASKONOMY_TASKS)

__all__ = [
    'Modality', 'MODALITIES', 'register_modality', 'unregister_modality', 'get_modality', 'parse_domains',
    'ordered_domains', 'build_input_adapters', 'build_pretrain_output_adapters', 'build_pretrain_losses',
    'patched_input_adapter', 'semseg_input_adapter', 'spatial_output_adapter',
]

KINDS = ('rgb', 'dense', 'label', 'mask')
LOSSES = ('mse', 'l1', 'ce')
DECODERS = ('rgb', 'gray', 'label', 'mask')

AdapterFactory = Callable[..., nn.Module]


def patched_input_adapter(m: 'Modality', patch_size: int, image_size, **kw) -> nn.Module:
    """``PatchedInputAdapter`` for a dense modality with ``m.num_channels`` channels."""
    from multimae.input_adapters import PatchedInputAdapter
    return PatchedInputAdapter(num_channels=m.num_channels, stride_level=m.stride_level,
                               patch_size_full=patch_size, image_size=image_size, **kw)


def semseg_input_adapter(m: 'Modality', patch_size: int, image_size, **kw) -> nn.Module:
    """``SemSegInputAdapter`` (class embedding of size 64, no interpolation: the released checkpoints' layout)."""
    from multimae.input_adapters import SemSegInputAdapter
    kw = {'dim_class_emb': 64, 'interpolate_class_emb': False, **kw}
    return SemSegInputAdapter(num_classes=m.num_classes, stride_level=m.stride_level,
                              patch_size_full=patch_size, image_size=image_size, **kw)


def spatial_output_adapter(m: 'Modality', patch_size: int, image_size, **kw) -> nn.Module:
    """Pre-training ``SpatialOutputAdapter`` predicting ``m.num_channels`` channels (logits for labels)."""
    from multimae.output_adapters import SpatialOutputAdapter
    return SpatialOutputAdapter(num_channels=m.num_channels, stride_level=m.stride_level,
                                patch_size_full=patch_size, image_size=image_size, **kw)


@dataclass(frozen=True)
class Modality:
    """Description of one modality.

    Attributes:
        name: registry key and folder name (``root/<name>/<class>/<file>``).
        num_channels: channels of the tensor the model predicts (number of classes for labels).
        stride_level: the model sees this modality at ``1 / stride_level`` resolution.
        num_classes: number of classes for categorical modalities, else None.
        kind: how transforms treat it: 'rgb' (uint8 colour, bicubic, mean/std normalised),
            'dense' (float, bicubic, ``* value_scale``), 'label' (nearest, int64 at 1/stride_level),
            'mask' (nearest, bool, True where the file is non-zero).
        decoder: file decoder name in ``utils.data.datasets.DECODERS`` ('rgb', 'gray', 'label', 'mask')
            or a callable ``path -> Tensor (C, H, W)``.
        value_scale: raw value multiplier for 'dense' (depth: 1 / 2**16, ``DEPTH_PNG_SCALE``).
        value_range: clamp range after scaling (guards against bicubic overshoot), or None.
        loss: pre-training loss 'mse', 'l1', 'ce' or None (data-only modality).
        loss_kwargs: extra constructor arguments of the loss.
        input_adapter / output_adapter: factories ``(modality, patch_size, image_size, **kw) -> nn.Module``
            or None when the modality cannot be an input / a pre-training output.
        hflip_negate_channels: channels whose sign flips under a horizontal flip (e.g. normal x);
            for values in [0, 1] the flip maps v -> 1 - v.
        bit_depth: bits per value the files must have (depth: 16), or None for any. An 8-bit depth map
            would silently be 256 times too small after ``value_scale``; it is rejected at load time.
    """
    name: str
    num_channels: int
    stride_level: int = 1
    num_classes: Optional[int] = None
    kind: str = 'dense'
    decoder: Union[str, Callable] = 'gray'
    value_scale: float = 1.0
    value_range: Optional[Tuple[float, float]] = None
    loss: Optional[str] = None
    loss_kwargs: Dict[str, object] = field(default_factory=dict)
    input_adapter: Optional[AdapterFactory] = patched_input_adapter
    output_adapter: Optional[AdapterFactory] = spatial_output_adapter
    hflip_negate_channels: Tuple[int, ...] = ()
    bit_depth: Optional[int] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"modality '{self.name}': kind must be one of {KINDS}, got '{self.kind}'")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"modality '{self.name}': loss must be one of {LOSSES} or None, got '{self.loss}'")
        if isinstance(self.decoder, str) and self.decoder not in DECODERS:
            raise ValueError(f"modality '{self.name}': decoder must be one of {DECODERS} or a callable, "
                             f"got '{self.decoder}'")
        if self.kind == 'label' and not self.num_classes:
            raise ValueError(f"modality '{self.name}': a 'label' modality needs num_classes")
        if self.stride_level < 1:
            raise ValueError(f"modality '{self.name}': stride_level must be >= 1, got {self.stride_level}")

    def build_loss(self, patch_size: int, **kw) -> nn.Module:
        """Masked pre-training loss for this modality (``multimae.criterion``)."""
        from multimae import criterion
        if self.loss is None:
            raise ValueError(f"modality '{self.name}' has no pre-training loss (it is data only)")
        cls = {'mse': criterion.MaskedMSELoss, 'l1': criterion.MaskedL1Loss,
               'ce': criterion.MaskedCrossEntropyLoss}[self.loss]
        return cls(patch_size=patch_size, stride=self.stride_level, **{**self.loss_kwargs, **kw})


MODALITIES: Dict[str, Modality] = {}


def register_modality(m: Modality, overwrite: bool = False) -> Modality:
    """Add ``m`` to the registry (an existing name is an error unless ``overwrite``)."""
    if m.name in MODALITIES and not overwrite:
        raise ValueError(f"modality '{m.name}' is already registered; pass overwrite=True to replace it")
    MODALITIES[m.name] = m
    return m


def unregister_modality(name: str) -> None:
    """Remove a modality (mainly for tests that register temporary ones)."""
    get_modality(name)
    del MODALITIES[name]


def get_modality(name: str) -> Modality:
    """Registry lookup; an unknown name raises ValueError suggesting the closest registered one."""
    try:
        return MODALITIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(MODALITIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ValueError(f"unknown modality '{name}' (registered: {', '.join(MODALITIES)}){hint}") from None


def parse_domains(domains: Union[str, Iterable[str], None]) -> List[str]:
    """'rgb-depth-semseg' or ['rgb', 'depth'] -> validated list of names (order kept, no duplicates)."""
    if domains is None:
        return []
    names = [d for d in domains.split('-') if d] if isinstance(domains, str) else list(domains)
    for name in names:
        get_modality(name)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modality in {names}")
    return names


def ordered_domains(in_domains: Sequence[str], out_domains: Sequence[str]) -> List[str]:
    """All domains in a deterministic order: the input domains, then output-only domains."""
    return list(dict.fromkeys([*in_domains, *out_domains]))


def build_input_adapters(domains: Sequence[str], patch_size: int, image_size=224,
                         per_domain_kwargs: Optional[Dict[str, dict]] = None, **kw) -> Dict[str, nn.Module]:
    """One input adapter per domain, in the given order.

    ``kw`` goes to every adapter (e.g. ``dim_tokens``, ``learnable_pos_emb``); ``per_domain_kwargs``
    adds arguments for single domains (e.g. ``{'semseg': {'dim_class_emb': 32}}``).
    """
    per_domain_kwargs = per_domain_kwargs or {}
    adapters = {}
    for name in domains:
        m = get_modality(name)
        if m.input_adapter is None:
            raise ValueError(f"modality '{name}' cannot be an input domain (it has no input adapter)")
        adapters[name] = m.input_adapter(m, patch_size, image_size, **kw, **per_domain_kwargs.get(name, {}))
    return adapters


def build_pretrain_output_adapters(out_domains: Sequence[str], context_tasks: Sequence[str], patch_size: int,
                                   image_size=224, dim_tokens: int = 256, depth: int = 2, num_heads: int = 8,
                                   use_task_queries: bool = True, use_xattn: bool = True,
                                   extra_norm_pix_loss: bool = False, **kw) -> Dict[str, nn.Module]:
    """Pre-training decoders for ``out_domains`` (+ ``'norm_rgb'`` with ``task='rgb'`` when
    ``extra_norm_pix_loss``), each reading the encoder tokens of ``context_tasks``."""
    context_tasks = list(context_tasks)
    common = dict(dim_tokens=dim_tokens, depth=depth, num_heads=num_heads, use_task_queries=use_task_queries,
                  context_tasks=context_tasks, use_xattn=use_xattn, **kw)
    adapters = {}
    for name in out_domains:
        m = get_modality(name)
        if m.output_adapter is None or m.loss is None:
            raise ValueError(f"modality '{name}' cannot be a pre-training output (no output adapter or loss)")
        adapters[name] = m.output_adapter(m, patch_size, image_size, task=name, **common)
    if extra_norm_pix_loss:
        if 'rgb' not in context_tasks:
            raise ValueError(f"extra_norm_pix_loss predicts normalised rgb patches and needs 'rgb' among the "
                             f"input domains, got {context_tasks}; disable it with --no_extra_norm_pix_loss")
        rgb = get_modality('rgb')
        adapters['norm_rgb'] = rgb.output_adapter(rgb, patch_size, image_size, task='rgb', **common)
    return adapters


def build_pretrain_losses(out_domains: Sequence[str], patch_size: int,
                          extra_norm_pix_loss: bool = False) -> Dict[str, nn.Module]:
    """Masked losses keyed like ``build_pretrain_output_adapters`` (norm_rgb: MSE with ``norm_pix=True``)."""
    losses = {name: get_modality(name).build_loss(patch_size) for name in out_domains}
    if extra_norm_pix_loss:
        losses['norm_rgb'] = get_modality('rgb').build_loss(patch_size, norm_pix=True)
    return losses


# ---------------------------------------------------------------------------------------------------
# Every modality of the project, in one place. Adding one of an existing kind is one entry here (or one
# register_modality call in user code). The order fixes nothing: ordered_domains sorts domains itself.

# Pre-training (and fine-tuning) inputs and targets.
register_modality(Modality('rgb', num_channels=3, kind='rgb', decoder='rgb', loss='mse'))
register_modality(Modality('depth', num_channels=1, kind='dense', decoder='gray', value_scale=1.0 / DEPTH_PNG_SCALE,
                           value_range=(0.0, 1.0), loss='l1', bit_depth=16))
register_modality(Modality('semseg', num_channels=COCO_SEMSEG_NUM_CLASSES, stride_level=SEMSEG_STRIDE,
                           num_classes=COCO_SEMSEG_NUM_CLASSES, kind='label', decoder='label', loss='ce',
                           loss_kwargs={'label_smoothing': 0.0, 'ignore_index': SEG_IGNORE_INDEX},
                           input_adapter=semseg_input_adapter))
register_modality(Modality('mask_valid', num_channels=1, kind='mask', decoder='mask', loss=None,
                           input_adapter=None, output_adapter=None))
# COCO pseudo labels read as data only: the model sees them through its 'semseg' adapter.
register_modality(Modality(PSEUDO_SEMSEG, num_channels=COCO_SEMSEG_NUM_CLASSES, stride_level=SEMSEG_STRIDE,
                           num_classes=COCO_SEMSEG_NUM_CLASSES, kind='label', decoder='label',
                           input_adapter=None, output_adapter=None))
# Surface normals (3 channels in [0, 1]; a horizontal flip negates x): the synthetic scenes and Taskonomy.
register_modality(Modality('normal', num_channels=3, kind='dense', decoder='rgb', value_scale=1 / 255,
                           value_range=(0.0, 1.0), loss='l1', hflip_negate_channels=(0,)))
# The other Taskonomy targets with their real channel counts. 16-bit targets are scaled by 1/65535, so an
# 8-bit file would be silently wrong: bit_depth=16 makes it an error.
for _name, (_channels, _decoder) in TASKONOMY_TASKS.items():
    if _name not in MODALITIES:
        register_modality(Modality(_name, num_channels=_channels, kind='dense', decoder=_decoder,
                                   value_scale=1 / 255 if _decoder == 'rgb' else 1 / 65535, value_range=(0.0, 1.0),
                                   loss='l1', bit_depth=None if _decoder == 'rgb' else 16))
