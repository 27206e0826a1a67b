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


def _wrap_lazy(m: Modality, x: torch.Tensor):
    """``tv_tensors`` view of ``x`` (no copy), only for the size check and the crop parameters."""
    return tv_tensors.Mask(x) if m.kind in ('label', 'mask') else tv_tensors.Image(x)


def _resize_image(x: torch.Tensor, size: Tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    """Antialiased resize of a (C, H, W) image; uint8 goes through torch's vectorised channels-last uint8
    kernel (about 4x faster than on a channels-first tensor, identical values), returned contiguous."""
    if x.dtype == torch.uint8 and x.shape[0] in (3, 4):
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return F.resize(x, list(size), interpolation=interpolation, antialias=True)[0].contiguous()
    return F.resize(x, list(size), interpolation=interpolation, antialias=True)


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
        # one crop box for all (make_params also checks that every modality has the same size)
        box = self.crop.make_params([_wrap_lazy(mods[name], x) for name, x in sample.items()])
        flip = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        return {name: self._process(mods[name], x, box, flip) for name, x in sample.items()}

    def _process(self, m: Modality, x: torch.Tensor, box: Dict[str, int], flip: bool) -> torch.Tensor:
        """Crop (a view, so only the kept pixels are converted or resampled), resize, flip, finish.

        Same operations and values as running the v2 transforms on ``tv_tensors`` (the published order:
        crop -> resize -> flip), without their per-call dispatch and with fast kernels: uint8 images are
        resampled in uint8 through a channels-last view (torch's vectorised kernel, bit-identical output),
        dense modalities are converted to float after cropping instead of before.
        """
        top, left, h, w = box['top'], box['left'], box['height'], box['width']
        x = x[..., top:top + h, left:left + w]
        if m.kind in ('label', 'mask'):
            x = F.resize(x, list(self.size), interpolation=InterpolationMode.NEAREST_EXACT)
        else:
            if m.kind == 'dense':
                x = x.float()
            x = _resize_image(x, self.size, self.crop.interpolation)
        return self._finish(m, F.horizontal_flip(x) if flip else x, flip)

    def _finish(self, m: Modality, x: torch.Tensor, flipped: bool) -> torch.Tensor:
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
