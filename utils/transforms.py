"""Pre-training augmentation: one random resized crop and one flip shared by all modalities (spec 6.3)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .data_constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                             IMAGENET_INCEPTION_STD)
from .modalities import Modality, get_modality

__all__ = ['PretrainTransform', 'JointRandomResizedCrop']


class JointRandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` whose masks use centre-aligned nearest sampling (like PIL's NEAREST).

    torchvision resizes ``tv_tensors.Mask`` with floor-aligned NEAREST, which shifts labels by up to
    half the scale factor relative to the bicubic-resized images; NEAREST_EXACT keeps them aligned.
    """

    def transform(self, inpt, params):
        if isinstance(inpt, tv_tensors.Mask):
            out = F.crop(inpt, params['top'], params['left'], params['height'], params['width'])
            return F.resize(out, self.size, interpolation=InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def _wrap(m: Modality, x: torch.Tensor):
    if m.kind == 'rgb':
        return tv_tensors.Image(x)
    if m.kind == 'dense':
        return tv_tensors.Image(x.float())
    return tv_tensors.Mask(x)


class PretrainTransform:
    """Joint random-resized-crop + horizontal flip, then per-modality conversion to model inputs.

    Input: dict modality -> decoded tensor (C, H, W) with equal H, W (from ``MultiModalImageFolder``).
    Output (S = input_size): rgb float (3, S, S) mean/std normalised; depth float (1, S, S) = raw / 2**16;
    labels (e.g. semseg) int64 (S / stride_level, S / stride_level); masks bool (1, S, S); other dense
    modalities float (C, S, S) scaled by their ``value_scale``. Random draws use the torch RNG only, so
    results are reproducible under ``torch.manual_seed`` (and per DataLoader worker).
    """

    def __init__(self, input_size: Union[int, Tuple[int, int]] = 224, hflip: float = 0.5,
                 imagenet_default_mean_and_std: bool = True, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic'):
        self.size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.hflip = hflip
        self.mean = IMAGENET_DEFAULT_MEAN if imagenet_default_mean_and_std else IMAGENET_INCEPTION_MEAN
        self.std = IMAGENET_DEFAULT_STD if imagenet_default_mean_and_std else IMAGENET_INCEPTION_STD
        modes = [m.value for m in InterpolationMode]
        if interpolation not in modes:
            raise ValueError(f"interpolation must be one of {modes}, got '{interpolation}'")
        self.crop = JointRandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio),
                                           interpolation=InterpolationMode(interpolation), antialias=True)

    def __call__(self, sample: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        mods = {name: get_modality(name) for name in sample}
        out = self.crop({name: _wrap(mods[name], x) for name, x in sample.items()})
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        return {name: self._finish(mods[name], F.horizontal_flip(x) if flip else x, flip)
                for name, x in out.items()}

    def _finish(self, m: Modality, x: torch.Tensor, flipped: bool) -> torch.Tensor:
        x = x.as_subclass(torch.Tensor)
        if m.kind == 'rgb':
            return F.normalize(F.to_dtype(x, torch.float32, scale=True), self.mean, self.std)
        if m.kind == 'mask':
            return x != 0
        if m.kind == 'label':
            h, w = self.size[0] // m.stride_level, self.size[1] // m.stride_level
            if m.stride_level > 1:
                x = F.resize(x, [h, w], interpolation=InterpolationMode.NEAREST_EXACT)
            return x[0].long()
        x = x * m.value_scale
        if flipped and m.hflip_negate_channels:
            lo, hi = m.value_range or (-1.0, 1.0)
            idx = list(m.hflip_negate_channels)
            x[idx] = (lo + hi) - x[idx]
        if m.value_range is not None:
            x = x.clamp(*m.value_range)
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, hflip={self.hflip}, scale={self.crop.scale}, "
                f"ratio={self.crop.ratio}, mean={self.mean}, std={self.std})")
