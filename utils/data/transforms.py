"""Pre-training augmentation: one random resized crop and one flip shared by all modalities."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Dict, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from utils.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                             IMAGENET_INCEPTION_STD)
from utils.data.modalities import Modality, get_modality

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


@lru_cache(maxsize=4096)
def _nearest_exact_index(in_len: int, out_len: int) -> torch.Tensor:
    """Source index of every output position of a ``NEAREST_EXACT`` resize from ``in_len`` to ``out_len``
    (int64, ``(out_len,)``), computed by that very resize on a ramp, so the float rounding is torch's."""
    ramp = torch.arange(in_len, dtype=torch.float32).view(1, 1, in_len)
    return F.resize(ramp, [1, out_len], interpolation=InterpolationMode.NEAREST_EXACT).view(out_len).long()


@lru_cache(maxsize=4096)
def _label_offsets(crop_len: int, size: int, flip: bool, out_len: int) -> torch.Tensor:
    """Source offsets (from the crop's start) of a label map cropped to ``crop_len``, resized to ``size``
    (nearest exact), optionally flipped, then resized to ``out_len``: nearest resizing only picks source
    pixels, so the whole chain is one gather."""
    idx = _nearest_exact_index(crop_len, size)
    if flip:
        idx = idx.flip(0)
    if out_len != size:
        idx = idx[_nearest_exact_index(size, out_len)]
    return idx


def _label_index(start: int, crop_len: int, size: int, flip: bool, out_len: int) -> torch.Tensor:
    """Source rows (or columns) of that chain for a crop starting at ``start`` (int64, ``(out_len,)``)."""
    return _label_offsets(crop_len, size, flip, out_len) + start


def _resize4d(x: torch.Tensor, size: Tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    """Antialiased resize of a ``(1, C, h, w)`` image: ``F.resize``'s values, calling ``interpolate`` directly
    for the dtypes it resamples natively (float; uint8 bicubic on CPU), which skips ~0.04 ms of dispatch
    per call; anything else goes through ``F.resize``."""
    modes = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    native = interpolation in modes and (x.dtype in (torch.float32, torch.float64) or (
        x.dtype == torch.uint8 and interpolation == InterpolationMode.BICUBIC and x.device.type == 'cpu'))
    if not native:
        return F.resize(x, list(size), interpolation=interpolation, antialias=True)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.is_contiguous(memory_format=torch.channels_last) and x.stride(0) != x.numel():
        # as F.resize does: a (1, C, h, w) channels-last view would otherwise come out channels-first
        x = x.as_strided(x.shape, (x.numel(), *x.stride()[1:]))
    return torch.nn.functional.interpolate(x, size=list(size), mode=interpolation.value, align_corners=False,
                                           antialias=True)


def _resize_image(x: torch.Tensor, size: Tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    """Antialiased resize of a (C, H, W) image; uint8 goes through torch's vectorised channels-last uint8
    kernel (about 4x faster than on a channels-first tensor, identical values), returned contiguous."""
    if x.dtype == torch.uint8 and x.shape[0] in (3, 4):
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        return _resize4d(x, size, interpolation)[0].contiguous()
    return _resize4d(x.unsqueeze(0), size, interpolation)[0]


def _normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` in any memory layout -> contiguous float32 ``(x / 255 - mean) / std``, with
    the exact arithmetic of ``to_dtype(scale=True)`` + ``normalize`` (one conversion pass, then in place)."""
    out = x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
    return out.sub_(mean).div_(std)


class PretrainTransform:
    """Joint random-resized-crop + horizontal flip, then per-modality conversion to model inputs.

    Input: dict modality -> decoded tensor (C, H, W) with equal H, W (from ``MultiModalImageFolder``).
    Output (S = input_size): rgb float (3, S, S) mean/std normalised; depth float (1, S, S) = raw / 2**16;
    labels (e.g. semseg) int64 (S / stride_level, S / stride_level); masks bool (1, S, S); other dense
    modalities float (C, S, S) scaled by their ``value_scale``. Random draws use the torch RNG only, so
    results are reproducible under ``torch.manual_seed`` (and per DataLoader worker).

    ``__call__(sample) = apply(sample, sample_params(H, W))``: the parameters need only the image size,
    so a loader can draw them before decoding.

    ``compact=True`` leaves the last conversions to the consumer: rgb comes out uint8 (3, S, S) (resized
    and flipped, not normalised) and label maps keep the dtype of their file (uint8 for 8-bit PNGs). That
    is 4x less rgb to copy between loader workers and to the GPU and 8x less label map; :meth:`finish`
    (on the device, on whole batches) turns them into exactly the values the default mode returns.
    """

    # dense modalities may come as uint16 (converted to float after cropping, see MultiModalImageFolder)
    accepts_uint16_dense = True

    def __init__(self, input_size: Union[int, Tuple[int, int]] = 224, hflip: float = 0.5,
                 imagenet_default_mean_and_std: bool = True, scale: Sequence[float] = (0.2, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic',
                 compact: bool = False):
        self.compact = bool(compact)
        self.size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.hflip = hflip
        self.mean = IMAGENET_DEFAULT_MEAN if imagenet_default_mean_and_std else IMAGENET_INCEPTION_MEAN
        self.std = IMAGENET_DEFAULT_STD if imagenet_default_mean_and_std else IMAGENET_INCEPTION_STD
        modes = [m.value for m in InterpolationMode]
        if interpolation not in modes:
            raise ValueError(f"interpolation must be one of {modes}, got '{interpolation}'")
        self.crop = JointRandomResizedCrop(self.size, scale=tuple(scale), ratio=tuple(ratio),
                                           interpolation=InterpolationMode(interpolation), antialias=True)

    def sample_params(self, height: int, width: int) -> Dict[str, Any]:
        """Draw the crop box (``top, left, height, width``) and the flip (``flip``) for an image of
        ``height x width`` pixels: the same torch RNG draws as ``v2.RandomResizedCrop`` + a flip."""
        box = self.crop.make_params([torch.empty(0, height, width, dtype=torch.uint8)])
        box['flip'] = self.hflip > 0 and bool(torch.rand(()) < self.hflip)
        return box

    def __call__(self, sample: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        sizes = {name: tuple(x.shape[-2:]) for name, x in sample.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"modalities of one sample must have the same size (H, W), got {sizes}")
        return self.apply(sample, self.sample_params(*next(iter(sizes.values()))))

    def apply(self, sample: Dict[str, torch.Tensor], params: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Crop, resize, flip and convert every modality of ``sample`` with ``params`` (from
        :meth:`sample_params`)."""
        return {name: self._process(get_modality(name), x, params) for name, x in sample.items()}

    def _process(self, m: Modality, x: torch.Tensor, p: Dict[str, Any]) -> torch.Tensor:
        """Crop (a view, so only the kept pixels are converted or resampled), resize, flip, finish.

        Same operations and values as running the v2 transforms on ``tv_tensors`` (in the
        order crop -> resize -> flip), without their per-call dispatch and with fast kernels: uint8 images are
        resampled in uint8 through a channels-last view (torch's vectorised kernel, bit-identical output),
        dense modalities are converted to float after cropping instead of before, and label maps and masks
        (nearest resizing, which only picks pixels) are one gather of the output pixels.
        """
        top, left, h, w, flip = p['top'], p['left'], p['height'], p['width'], p['flip']
        if m.kind in ('label', 'mask'):
            out_h, out_w = self.size
            if m.kind == 'label':
                out_h, out_w = out_h // m.stride_level, out_w // m.stride_level
            rows = _label_index(top, h, self.size[0], False, out_h)
            cols = _label_index(left, w, self.size[1], flip, out_w)
            x = x[:, rows[:, None], cols[None, :]]
            if m.kind == 'mask':
                return x != 0
            return x[0] if self.compact else x[0].long()
        x = x[..., top:top + h, left:left + w]
        if m.kind == 'rgb' and x.dtype == torch.uint8 and x.shape[0] == 3:
            return self._rgb_uint8(x, flip)
        if m.kind == 'dense':
            x = x.float()
        x = _resize_image(x, self.size, self.crop.interpolation)
        return self._finish(m, F.horizontal_flip(x) if flip else x, flip)

    def _rgb_uint8(self, x: torch.Tensor, flip: bool) -> torch.Tensor:
        """Resize a uint8 (3, h, w) crop in channels-last (the decoders return interleaved pixels, so this
        is a cheap view or row copy), flip, and convert to float and to channels-first in one pass; then
        the exact arithmetic of ``to_dtype(scale=True)`` + ``normalize``, in place. Bit-identical to
        ``_finish(_resize_image(...))`` without its uint8 channels-first copy."""
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        x = _resize4d(x, self.size, self.crop.interpolation)[0]
        if flip:
            x = x.flip(-1)
        return x if self.compact else _normalize_uint8(x, *self._mean_std())

    def finish(self, batch: Any) -> Any:
        """Complete a ``compact`` sample or batch (a dict, or a ``(dict, label)`` pair) on whatever device it
        is: uint8 rgb-kind modalities -> float32 ``(x / 255 - mean) / std``, label maps -> int64.
        Bit-identical to the default (non-compact) output; finished tensors and other entries pass through."""
        if isinstance(batch, (tuple, list)):
            return type(batch)([self.finish(batch[0]), *batch[1:]])
        out = dict(batch)
        for name, x in batch.items():
            kind = get_modality(name).kind
            if kind == 'rgb' and x.dtype == torch.uint8:
                out[name] = _normalize_uint8(x, *self._mean_std(x.device))
            elif kind == 'label' and x.dtype != torch.int64:
                out[name] = x.long()
        return out

    def _mean_std(self, device: torch.device = torch.device('cpu')) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``(C, 1, 1)`` tensors on ``device``, made once per device (copying them
        to a GPU in every step would synchronise the host)."""
        cache = self.__dict__.setdefault('_mean_std_cache', {})
        if device not in cache:
            cache[device] = tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device)
                                  for v in (self.mean, self.std))
        return cache[device]

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop('_mean_std_cache', None)  # may hold GPU tensors; a loader worker builds its own
        return state

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
        x = x * m.value_scale  # a new tensor: what follows may work in place
        if flipped and m.hflip_negate_channels:
            lo, hi = m.value_range or (-1.0, 1.0)
            idx = list(m.hflip_negate_channels)
            x[idx] = (lo + hi) - x[idx]
        if m.value_range is not None:
            x.clamp_(*m.value_range)
        return x

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, hflip={self.hflip}, scale={self.crop.scale}, "
                f"ratio={self.crop.ratio}, mean={self.mean}, std={self.std})")

