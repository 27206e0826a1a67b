"""Fine-tuning data transforms: semantic segmentation, NYUv2 depth, dense regression, classification.

Dense transforms take the dict that `MultiModalImageFolder` yields, `{modality: tensor}` with uint8 /
uint16 tensors in CHW layout (label maps may be (H, W)), and return a dict of tensors. The geometry
(flip, resize, pad, crop) is sampled once per sample and applied to every modality with torchvision
v2 joint transforms: `rgb` is a `tv_tensors.Image` (bilinear, colour augmentation), every other
modality a `tv_tensors.Mask` (nearest, untouched by colour augmentation), so label maps and depth are
never blended or jittered. Randomness comes from torch's RNG (the classification transforms of timm also
draw from Python's ``random``); the training loaders seed both per sample from ``(seed, epoch, index)``
(``utils.data.seeding.PerSampleSeed``), so no worker's stream state matters.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from utils.data.constants import (COCO_SEMSEG_NUM_CLASSES, DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                             NYU_MEAN, NYU_STD, PAD_MASK_VALUE, SEG_IGNORE_INDEX, SEMSEG_STRIDE)
from utils.data.depth import robust_standardize

__all__ = [
    "PADDING_KEY", "SemSegAugment", "SemSegTarget", "build_semseg_transform",
    "NYUDepthAugment", "DepthTarget", "build_nyu_depth_transform",
    "TASKONOMY_SCALING", "DenseRegressionTransform", "ClsTransform", "build_cls_transform",
]

# Extra entry added by the augmentations: bool (1, H, W), True where the pixel is padding. Targets use it
# instead of guessing padding from a magic value, which a real depth reading can equal.
PADDING_KEY = "_padding"
RGB = "rgb"


def _wrap(sample: Mapping[str, Tensor], image_keys: Sequence[str] = (RGB,)) -> dict[str, Tensor]:
    """Check sizes, make every map (C, H, W) and wrap it as tv_tensors.Image (image_keys) or Mask."""
    out, size, first = {}, None, None
    for key, x in sample.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"modality {key!r}: expected a tensor decoded by the dataset, got {type(x).__name__}")
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.dim() != 3:
            raise ValueError(f"modality {key!r}: expected a (C, H, W) or (H, W) tensor, got shape {tuple(x.shape)}")
        if size is None:
            size, first = tuple(x.shape[-2:]), key
        elif tuple(x.shape[-2:]) != size:
            raise ValueError(f"modality {key!r} is {tuple(x.shape[-2:])} pixels but {first!r} is {size}; "
                             "all modalities of a sample must have the same size")
        if key in image_keys:
            out[key] = tv_tensors.Image(x)
        else:
            if x.dtype == torch.uint16:  # few kernels support uint16; int32 holds every value exactly
                x = x.to(torch.int32)
            out[key] = tv_tensors.Mask(x)
    return out


def _unwrap(sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.as_subclass(Tensor) for k, v in sample.items()}


def _normalize_rgb(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return TF.normalize(TF.to_dtype(x.as_subclass(Tensor), torch.float32, scale=True), list(mean), list(std))


def _resize_all(sample: dict[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
    # tv_tensors dispatch: Image -> bilinear (antialiased), Mask -> nearest
    return {k: TF.resize(v, list(size), antialias=True) for k, v in sample.items()}


# ------------------------------------------------------------------------------------------------ semseg
class SemSegAugment:
    """The `simple` semseg augmentation on a dict of modalities.

    train: horizontal flip (p=hflip) -> longest side to `input_size` -> colour jitter on rgb (p=0.5) ->
    random scale by a factor in `scale_range` -> pad bottom/right to input_size^2 -> random crop
    input_size^2 -> rgb normalised. val: longest side to input_size -> pad -> normalise.
    Padding: rgb `pad_value` grey, label maps `pad_mask_value`, `depth` 0; the padded pixels are also
    returned as `sample[PADDING_KEY]` (bool (1, S, S)). Non-rgb outputs keep their (integer) dtype, depth
    becomes float32.
    """

    def __init__(self, train: bool, input_size: int = 512, hflip: float = 0.5, color_jitter_p: float = 0.5,
                 scale_range: tuple[float, float] = (0.1, 2.0), pad_value: int = 128,
                 pad_mask_value: int = PAD_MASK_VALUE, depth_keys: Sequence[str] = ("depth",),
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.train, self.input_size = train, input_size
        self.scale_range, self.pad_value, self.pad_mask_value = scale_range, pad_value, pad_mask_value
        self.depth_keys, self.mean, self.std = tuple(depth_keys), mean, std
        self.flip = v2.RandomHorizontalFlip(hflip)
        self.longest = v2.Resize(size=None, max_size=input_size, antialias=True)
        self.jitter = v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                                     p=color_jitter_p)
        self.crop = v2.RandomCrop(input_size)

    def _pad(self, sample: dict[str, Tensor]) -> dict[str, Tensor]:
        h, w = sample[PADDING_KEY].shape[-2:]
        pad = [0, 0, max(self.input_size - w, 0), max(self.input_size - h, 0)]  # left, top, right, bottom
        if pad[2] == 0 and pad[3] == 0:
            return sample
        out = {}
        for k, v in sample.items():
            fill = (self.pad_value if k == RGB else True if k == PADDING_KEY else
                    0 if k in self.depth_keys else self.pad_mask_value)
            out[k] = TF.pad(v, pad, fill=fill)
        return out

    def __call__(self, sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if RGB not in sample:
            raise KeyError(f"semseg transform needs an 'rgb' modality; got {sorted(sample)}")
        s = _wrap(sample)
        for k in self.depth_keys:
            if k in s:
                s[k] = tv_tensors.Mask(s[k].float())
        s[PADDING_KEY] = tv_tensors.Mask(torch.zeros((1, *s[RGB].shape[-2:]), dtype=torch.bool))
        if self.train:
            s = self.flip(s)
        s = self.longest(s)
        if self.train:
            s = self.jitter(s)
            lo, hi = self.scale_range
            f = lo + (hi - lo) * torch.rand(()).item()
            h, w = s[RGB].shape[-2:]
            s = _resize_all(s, (max(1, round(h * f)), max(1, round(w * f))))
        s = self._pad(s)
        if self.train:
            s = self.crop(s)
        s[RGB] = _normalize_rgb(s[RGB], self.mean, self.std)
        return _unwrap(s)


class SemSegTarget:
    """Post-processing of an augmented semseg sample: labels, validity mask, standardised depth.

    - `semseg` (ground truth) -> int64 (S, S): with `reduce_zero_label`, 0 becomes ignore and 1..K -> 0..K-1;
      padding -> void label `num_classes` if `use_void_label` else `ignore_index`.
    - `mask_valid` -> bool (1, S, S) = (raw == 255) and not padding.
    - `depth` -> float (1, S, S): with `standardize_depth`, robust per-image standardisation whose statistics
      exclude padding; invalid pixels (mask_valid present) count in the statistics unless
      `depth_stats_valid_only`; the output is 0 at padding and invalid pixels.
    - `pseudo_semseg` (an input) -> int64 (S/stride, S/stride), nearest; padding and any value >=
      `pseudo_num_classes` become the padding class `pseudo_num_classes` (same rule in train and eval).
    - other dense inputs named in `dense_scales` -> float, file value x scale, 0 at padding.
    Other modalities pass through.
    """

    def __init__(self, num_classes: int, ignore_index: int = SEG_IGNORE_INDEX, standardize_depth: bool = True,
                 reduce_zero_label: bool = False, use_void_label: bool = False,
                 pseudo_num_classes: int = COCO_SEMSEG_NUM_CLASSES, semseg_stride: int = SEMSEG_STRIDE,
                 depth_stats_valid_only: bool = False, dense_scales: Mapping[str, float] | None = None):
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.dense_scales = dict(dense_scales or {})
        self.depth_stats_valid_only = depth_stats_valid_only
        self.standardize_depth, self.reduce_zero_label = standardize_depth, reduce_zero_label
        self.use_void_label, self.pseudo_num_classes, self.stride = use_void_label, pseudo_num_classes, semseg_stride

    def _labels(self, seg: Tensor, pad: Tensor) -> Tensor:
        lab = seg.long()
        ignore = lab == self.ignore_index
        if self.reduce_zero_label:
            ignore |= lab == 0
            lab = lab - 1
        lab = torch.where(ignore, self.ignore_index, lab)
        return torch.where(pad, self.num_classes if self.use_void_label else self.ignore_index, lab)

    def __call__(self, sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sample)
        ref = next(iter(sample.values()))
        pad = out.pop(PADDING_KEY, None)
        pad = torch.zeros((1, *ref.shape[-2:]), dtype=torch.bool) if pad is None else pad.reshape(1, *ref.shape[-2:])
        valid = None
        if "mask_valid" in out:
            valid = (out["mask_valid"].reshape(pad.shape) == 255) & ~pad
            out["mask_valid"] = valid
        if "depth" in out:
            depth = out["depth"].float().reshape(pad.shape)
            keep = ~pad if valid is None else valid
            if self.standardize_depth:
                stats = keep if self.depth_stats_valid_only else ~pad
                depth = robust_standardize(depth[None], stats[None])[0]
            out["depth"] = torch.where(keep, depth, 0.0)
        for k, scale in self.dense_scales.items():
            if k in out:
                out[k] = torch.where(pad, 0.0, out[k].float() * scale)
        if "semseg" in out:
            out["semseg"] = self._labels(out["semseg"].reshape(pad.shape)[0], pad[0])
        if "pseudo_semseg" in out:
            ps = out["pseudo_semseg"].long().reshape(pad.shape)
            ps = torch.where(pad | (ps >= self.pseudo_num_classes), self.pseudo_num_classes, ps)
            ps = F.interpolate(ps[None].float(), scale_factor=1 / self.stride, mode="nearest")
            out["pseudo_semseg"] = ps[0, 0].long()
        return out


def build_semseg_transform(train: bool, input_size: int, num_classes: int, aug_name: str = "simple",
                           dense_scales: Mapping[str, float] | None = None,
                           **target_kwargs) -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """`SemSegAugment` then `SemSegTarget(num_classes, **target_kwargs)`; aug_name 'simple' is the only one.
    ``dense_scales``: dense inputs other than depth (any registered dense modality) and the factor that
    turns their file values into floats (the modality's ``value_scale``); they are resized, padded with 0
    and scaled like depth, without its standardisation."""
    if aug_name != "simple":
        raise ValueError(f"unknown semseg augmentation {aug_name!r}; expected 'simple'")
    dense_scales = dict(dense_scales or {})
    return v2.Compose([SemSegAugment(train, input_size, depth_keys=("depth", *dense_scales)),
                       SemSegTarget(num_classes, dense_scales=dense_scales, **target_kwargs)])


# ------------------------------------------------------------------------------------------------ NYU depth
class NYUDepthAugment:
    """The NYUv2 depth augmentation on a dict of modalities.

    train: smaller side to `input_size` -> horizontal flip -> [colour_aug: colour jitter (p=0.5) and grayscale
    (p=0.3) on rgb] -> random crop input_size^2 -> rgb normalised. val: smaller side -> centre crop -> normalise.
    """

    def __init__(self, train: bool, input_size: int = 256, color_aug: bool = False, hflip: float = 0.5,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.train, self.mean, self.std = train, mean, std
        ops: list[Callable] = [v2.Resize(input_size, antialias=True)]
        if train:
            ops.append(v2.RandomHorizontalFlip(hflip))
            if color_aug:
                jitter = v2.ColorJitter(brightness=0.1255, contrast=0.4, saturation=(0.5, 1.5), hue=(-0.2, 0.2))
                ops += [v2.RandomApply([jitter], p=0.5), v2.RandomGrayscale(p=0.3)]
            ops.append(v2.RandomCrop(input_size))
        else:
            ops.append(v2.CenterCrop(input_size))
        self.ops = v2.Compose(ops)

    def __call__(self, sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s = _wrap(sample)
        if "depth" in s:
            s["depth"] = tv_tensors.Mask(s["depth"].float())
        s = self.ops(s)
        if RGB in s:
            s[RGB] = _normalize_rgb(s[RGB], self.mean, self.std)
        return _unwrap(s)


class DepthTarget:
    """Depth target post-processing (NYU constants by default).

    depth -> (depth - mean) / std, float (1, H, W); mask_valid -> bool (1, H, W) = raw == 255 (when the
    sample has no mask_valid, valid = raw depth > 0); invalid depth -> `mask_value`.
    """

    def __init__(self, mean: float = NYU_MEAN, std: float = NYU_STD, mask_value: float = 0.0,
                 depth_key: str = "depth"):
        self.mean, self.std, self.mask_value, self.depth_key = mean, std, mask_value, depth_key

    def __call__(self, sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = dict(sample)
        if self.depth_key not in out:
            raise KeyError(f"depth target transform needs a {self.depth_key!r} modality; got {sorted(sample)}")
        raw = out[self.depth_key].float()
        raw = raw.unsqueeze(0) if raw.dim() == 2 else raw
        valid = (out["mask_valid"].reshape(raw.shape) == 255) if "mask_valid" in out else raw > 0
        out["mask_valid"] = valid
        out[self.depth_key] = torch.where(valid, (raw - self.mean) / self.std, self.mask_value)
        return out


def build_nyu_depth_transform(train: bool, input_size: int = 256, color_aug: bool = False,
                              aug_name: str = "nyu-augs") -> Callable[[Mapping[str, Tensor]], dict[str, Tensor]]:
    """`NYUDepthAugment` then `DepthTarget` (NYU_MEAN / NYU_STD)."""
    if aug_name != "nyu-augs":
        raise ValueError(f"unknown depth augmentation {aug_name!r}; expected 'nyu-augs'")
    return v2.Compose([NYUDepthAugment(train, input_size, color_aug), DepthTarget()])


# ------------------------------------------------------------------------------------------------ Taskonomy
def _div(scale: float, channels: int | None = None) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        x = x[:channels] if channels else x
        return x.float() / scale
    return f


def _clamp_rescale(scale: float, hi: float) -> Callable[[Tensor], Tensor]:
    return lambda x: (x.float() / scale).clamp(0.0, hi) / hi


def _blurred(scale: float) -> Callable[[Tensor], Tensor]:
    return lambda x: TF.gaussian_blur(x.float() / scale, kernel_size=[3, 3], sigma=[1.0, 1.0])


def _eroded_valid_mask(x: Tensor, cell: int = 4) -> Tensor:
    # valid = full-scale value; a pixel stays valid only if its whole cell x cell block is valid
    # (invert, max-pool with stride `cell`, nearest upsample, == 0)
    x = x[:1]
    full = True if x.dtype == torch.bool else 255 if x.dtype == torch.uint8 else 65535
    invalid = (x != full).float()[None]
    pooled = F.max_pool2d(invalid, kernel_size=cell, stride=cell, ceil_mode=True)
    return F.interpolate(pooled, scale_factor=cell, mode="nearest")[0, :, :x.shape[-2], :x.shape[-1]] == 0


_U16 = 65535.0
# Per-task scaling of decoded Taskonomy-style images to training targets.
TASKONOMY_SCALING: dict[str, Callable[[Tensor], Tensor]] = {
    "normal": _div(255.0, 3),
    "principal_curvature": _div(255.0, 2),
    "curvature": _div(255.0, 2),
    "reshading": _div(255.0, 1),
    "keypoints2d": _div(_U16),
    "keypoints3d": _div(_U16),
    "edge_texture": _clamp_rescale(_U16, 0.25),
    "edge_occlusion": _blurred(_U16),
    "depth_zbuffer": _clamp_rescale(_U16, 8000.0 / _U16),
    "depth_euclidean": _clamp_rescale(_U16, 8000.0 / _U16),
    "depth": _clamp_rescale(_U16, 8000.0 / _U16),  # the depth script's name for depth_zbuffer
    "mask_valid": _eroded_valid_mask,
}


class DenseRegressionTransform:
    """Taskonomy-style dense targets: resize the smaller side to `image_size` (rgb bilinear, others nearest),
    optional joint horizontal flip, rgb normalised, every other task scaled by `scaling[task]` (default
    `TASKONOMY_SCALING`; unknown tasks: uint8 / 255, other integers / 65535). Outputs float (C, S, S),
    mask_valid bool (1, S, S)."""

    def __init__(self, image_size: int = 384, hflip: float = 0.0,
                 scaling: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.scaling = dict(TASKONOMY_SCALING if scaling is None else scaling)
        self.mean, self.std = mean, std
        self.ops = v2.Compose([v2.Resize(image_size, antialias=True), v2.RandomHorizontalFlip(hflip)])

    def _scale(self, task: str, x: Tensor) -> Tensor:
        if task in self.scaling:
            return self.scaling[task](x)
        if x.is_floating_point() or x.dtype == torch.bool:
            return x
        return x.float() / (255.0 if x.dtype == torch.uint8 else _U16)

    def __call__(self, sample: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s = _unwrap(self.ops(_wrap(sample)))  # uint16 maps come back as int32 with the same values
        return {k: _normalize_rgb(v, self.mean, self.std) if k == RGB else self._scale(k, v) for k, v in s.items()}


# ------------------------------------------------------------------------------------------------ classification
class ClsTransform:
    """Apply a timm transform to a PIL image, a uint8 (C, H, W) tensor or a dict holding one under 'rgb'."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, img):
        if isinstance(img, Mapping):
            img = img[RGB]
        if isinstance(img, Tensor):
            img = TF.to_pil_image(img)
        return self.transform(img)

    def __repr__(self) -> str:
        return f"ClsTransform({self.transform!r})"


def _posterize(img, bits_to_keep: int, **_):
    """timm's posterize with the old Pillow result for 0 bits (a black image): Pillow >= 11 raises on 0,
    which ``rand-m9-mstd0.5-inc1`` draws whenever its magnitude reaches 10 (a crash every few hundred
    batches)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))


def _patch_timm_posterize() -> None:
    # Transforms built afterwards hold this function (pickled by reference, so spawned workers get it too).
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


def build_cls_transform(is_train: bool, input_size: int = 224, color_jitter: float | None = 0.4,
                        aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.0, remode: str = "pixel",
                        recount: int = 1, train_interpolation: str = "bicubic", crop_pct: float | None = None,
                        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                        std: Sequence[float] = IMAGENET_DEFAULT_STD) -> ClsTransform:
    """Classification transform via `timm.data.create_transform`.

    train: random-resized crop, flip, RandAugment `aa` (colour jitter when aa is None), normalise, random
    erasing. eval: resize to int(input_size / crop_pct) bicubic, centre crop; crop_pct defaults to
    224/256 below 384 px and 1.0 from 384 px.
    """
    from timm.data import create_transform

    _patch_timm_posterize()
    if is_train:
        tf = create_transform(input_size=input_size, is_training=True, color_jitter=color_jitter,
                              auto_augment=aa or None, interpolation=train_interpolation, re_prob=reprob,
                              re_mode=remode, re_count=recount, mean=tuple(mean), std=tuple(std))
    else:
        if crop_pct is None:
            crop_pct = DEFAULT_CROP_PCT if input_size < 384 else 1.0
        tf = create_transform(input_size=input_size, is_training=False, interpolation="bicubic",
                              crop_pct=crop_pct, mean=tuple(mean), std=tuple(std))
    return ClsTransform(tf)
