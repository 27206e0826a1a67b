"""Pictures of multi-modal data and of MultiMAE reconstructions (depth colour map, semseg palette, grids)."""
from __future__ import annotations

import colorsys
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from utils.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, SEG_IGNORE_INDEX
from utils.data.modalities import MODALITIES

__all__ = ['DEPTH_LUT', 'colorize_depth', 'semseg_palette', 'colorize_semseg', 'denormalize_rgb',
           'patch_mask_to_pixels', 'reconstruction_grid', 'dataset_grid', 'save_png_atomic',
           'save_reconstruction_grid']

# Piecewise-linear colour ramp, dark violet -> blue -> teal -> green -> yellow, with increasing lightness
# so it reads correctly in greyscale as well. Index 0 = far, 255 = near.
_DEPTH_ANCHORS = np.array([
    [0.00, 0.07, 0.03, 0.18],
    [0.22, 0.25, 0.12, 0.52],
    [0.45, 0.13, 0.42, 0.62],
    [0.68, 0.22, 0.66, 0.45],
    [0.86, 0.66, 0.84, 0.24],
    [1.00, 0.99, 0.95, 0.55],
])
DEPTH_LUT = (np.stack([np.interp(np.linspace(0, 1, 256), _DEPTH_ANCHORS[:, 0], _DEPTH_ANCHORS[:, c])
                       for c in (1, 2, 3)], axis=1) * 255 + 0.5).astype(np.uint8)
# distinct colours for the first classes (none close to the grey of hidden patches); further ones are
# spread around the hue circle
_BASE_PALETTE = [(150, 105, 60), (220, 210, 170), (230, 60, 45), (45, 100, 230), (50, 180, 75),
                 (170, 70, 210), (245, 160, 30), (40, 200, 200), (240, 110, 170), (20, 140, 90),
                 (150, 220, 60), (20, 60, 110)]
_GREY = 128


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def colorize_depth(depth, valid=None, vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """(H, W) or (1, H, W) depth -> (H, W, 3) uint8, near bright / far dark, invalid pixels black.

    Without vmin/vmax the 2nd/98th percentiles of the valid values set the range.
    """
    d = _np(depth).reshape(_np(depth).shape[-2:])
    ok = np.ones(d.shape, bool) if valid is None else _np(valid).reshape(d.shape) > 0
    ok &= np.isfinite(d)
    if vmin is None or vmax is None:
        lo, hi = np.percentile(d[ok], [2, 98]) if ok.any() else (0.0, 1.0)
        vmin, vmax = (lo if vmin is None else vmin), (hi if vmax is None else vmax)
    t = np.clip((d - vmin) / max(vmax - vmin, 1e-8), 0, 1)
    img = DEPTH_LUT[np.round((1 - np.nan_to_num(t)) * 255).astype(np.int64)]
    img[~ok] = 0
    return img


def semseg_palette(num_classes: int = 256) -> np.ndarray:
    """(num_classes, 3) uint8 colours: hand-picked for the first 12 classes, golden-ratio hues after."""
    cols = list(_BASE_PALETTE[:num_classes])
    for i in range(len(cols), num_classes):
        h = (i * 0.618033988749895) % 1.0
        s, v = (0.55, 0.95) if i % 2 else (0.85, 0.7)
        cols.append(tuple(int(c * 255 + 0.5) for c in colorsys.hsv_to_rgb(h, s, v)))
    return np.array(cols, dtype=np.uint8).reshape(-1, 3)


_PALETTE = semseg_palette(256)


def colorize_semseg(labels, ignore_index: int = SEG_IGNORE_INDEX) -> np.ndarray:
    """(H, W) integer class ids -> (H, W, 3) uint8 palette colours; ``ignore_index`` is black."""
    lab = _np(labels).astype(np.int64).reshape(_np(labels).shape[-2:])
    img = _PALETTE[np.clip(lab, 0, 255)]
    img[(lab == ignore_index) | (lab < 0)] = 0
    return img


def denormalize_rgb(x, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                    std: Sequence[float] = IMAGENET_DEFAULT_STD) -> np.ndarray:
    """Normalised (3, H, W) image -> (H, W, 3) uint8."""
    a = _np(x) * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return (np.clip(a.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def patch_mask_to_pixels(mask, height: int, width: int) -> np.ndarray:
    """Token mask (N,) with 1 = hidden on an (n_h, n_w) grid of the image aspect -> (H, W) bool hidden."""
    m = _np(mask).reshape(-1)
    n_h = int(round(math.sqrt(m.size * height / width)))
    n_w = m.size // max(n_h, 1)
    if n_h * n_w != m.size or height % n_h or width % n_w:
        raise ValueError(f"cannot lay out a mask of {m.size} tokens on a {height}x{width} image")
    grid = m.reshape(n_h, n_w) > 0.5
    return grid.repeat(height // n_h, axis=0).repeat(width // n_w, axis=1)


def _upscale(img: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size, size), Image.NEAREST))


def _tiles_for(kind: str, x, pred, hidden_tokens, valid, mean, std, n_channels: int):
    """(masked input, prediction, target) uint8 tiles for one sample of one modality."""
    x = _np(x)
    h, w = x.shape[-2:]
    hidden = patch_mask_to_pixels(hidden_tokens, h, w) if hidden_tokens is not None else np.ones((h, w), bool)
    if kind == 'label':
        target_lab = x.reshape(h, w)
        pred_lab = None if pred is None else np.where(hidden, _np(pred).argmax(0), target_lab)
        render = colorize_semseg
        vis_in, target = render(target_lab), render(target_lab)
        shown = None if pred_lab is None else render(pred_lab)
    else:
        paste = None if pred is None else np.where(hidden[None], _np(pred), x)
        if kind == 'rgb':
            render = lambda a: denormalize_rgb(a, mean, std)  # noqa: E731
        elif n_channels == 1:
            ok = None if valid is None else _np(valid).reshape(h, w) > 0
            sel = x.reshape(h, w)[ok] if ok is not None and ok.any() else x.reshape(-1)
            lo, hi = np.percentile(sel, [2, 98])
            render = lambda a: colorize_depth(a, vmin=lo, vmax=hi)  # noqa: E731
        else:
            render = lambda a: (np.clip(a[:3].transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa
        vis_in, shown = render(x), (None if paste is None else render(paste))
        target = render(x)
        if kind == 'dense' and n_channels == 1 and valid is not None:
            target[~(_np(valid).reshape(h, w) > 0)] = 0
    vis_in = vis_in.copy()
    vis_in[hidden] = _GREY
    if shown is None:
        shown = np.full_like(target, _GREY)
    return vis_in, shown, target


def reconstruction_grid(inputs: Dict[str, torch.Tensor], preds: Dict[str, torch.Tensor],
                        masks: Dict[str, torch.Tensor], max_samples: int = 8, domains: Optional[Sequence[str]] = None,
                        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                        tile_size: Optional[int] = None, labels: bool = True) -> np.ndarray:
    """Grid picture of reconstructions: one row per sample, three columns per modality.

    Columns: masked input (hidden patches grey), prediction with the visible patches pasted back (labels
    argmax'ed), target. Depth uses ``colorize_depth`` with the target's
    range (invalid pixels black when ``inputs['mask_valid']`` exists), semseg the class palette.

    Args:
        inputs: batch dict (targets too): rgb (B,3,H,W) normalised, depth (B,1,H,W), semseg (B,h,w) int.
        preds: model outputs, e.g. rgb (B,3,H,W), semseg logits (B,K,h,w); keys like 'norm_rgb' that are
            not in ``inputs`` are skipped.
        masks: (B, N) token masks, 1 = hidden; a domain without mask is shown as fully hidden.
        domains: modalities to show (default: registered, non-mask keys of ``inputs``, in order).
        tile_size: side of every tile in pixels (default: >= 112, a multiple of the image size).
    Returns:
        (H_grid, W_grid, 3) uint8 image.
    """
    if domains is None:
        domains = [d for d in inputs if d in MODALITIES and MODALITIES[d].kind != 'mask']
    if not domains:
        raise ValueError(f"nothing to show: no image modality among inputs {list(inputs)}")
    n = min(max_samples, next(iter(inputs.values())).shape[0])
    valid = inputs.get('mask_valid')
    side = max(t.shape[-1] * (MODALITIES[d].stride_level if d in MODALITIES else 1) for d, t in inputs.items()
               if d in domains)
    tile = tile_size or side * max(1, math.ceil(112 / side))
    gap, group_gap, header = 2, 8, 14 if labels else 0
    width = len(domains) * 3 * (tile + gap) + (len(domains) - 1) * group_gap
    canvas = np.full((header + n * (tile + gap), width, 3), 255, np.uint8)
    titles = []
    for row in range(n):
        x0 = 0
        for d in domains:
            kind = MODALITIES[d].kind if d in MODALITIES else 'dense'
            x = inputs[d][row]
            n_ch = 1 if x.ndim == 2 else x.shape[0]
            v = valid[row] if valid is not None and kind == 'dense' else None
            tiles = _tiles_for(kind, x, None if d not in preds else preds[d][row],
                               masks[d][row] if d in masks else None, v, mean, std, n_ch)
            for name, t in zip(('masked', 'pred', 'target'), tiles):
                y = header + row * (tile + gap)
                canvas[y:y + tile, x0:x0 + tile] = _upscale(t, tile)
                if row == 0:
                    titles.append((x0, f'{d} {name}'))
                x0 += tile + gap
            x0 += group_gap
    if labels:
        img = Image.fromarray(canvas)
        draw = ImageDraw.Draw(img)
        for x0, text in titles:
            draw.text((x0 + 2, 1), text, fill=(0, 0, 0))
        canvas = np.asarray(img)
    return canvas


def _raw_tile(kind: str, x: np.ndarray, valid: Optional[np.ndarray]) -> np.ndarray:
    if kind == 'label':
        return colorize_semseg(x[0])
    if kind == 'mask':
        return np.repeat(((x[0] != 0) * 255).astype(np.uint8)[..., None], 3, axis=2)
    if x.shape[0] == 1:
        return colorize_depth(x[0], valid)
    scale = 255.0 if x.max() > 1.0 else 1.0  # decoded uint8 files vs. already scaled floats
    return (np.clip(x[:3].transpose(1, 2, 0) / scale, 0, 1) * 255 + 0.5).astype(np.uint8)


def dataset_grid(samples: Sequence[Dict[str, torch.Tensor]], domains: Optional[Sequence[str]] = None,
                 tile_size: Optional[int] = None) -> np.ndarray:
    """Picture of decoded, untransformed samples (``MultiModalImageFolder.load``): one row per sample,
    one column per modality (depth colour-mapped with invalid pixels black, labels as palette)."""
    domains = list(domains or samples[0])
    side = max(int(t.shape[-1]) for t in samples[0].values())
    tile = tile_size or side * max(1, math.ceil(112 / side))
    gap = 2
    canvas = np.full((len(samples) * (tile + gap), len(domains) * (tile + gap), 3), 255, np.uint8)
    for r, sample in enumerate(samples):
        valid = _np(sample['mask_valid'])[0] if 'mask_valid' in sample else None
        for c, d in enumerate(domains):
            kind = MODALITIES[d].kind if d in MODALITIES else 'dense'
            x = _np(sample[d])
            t = _upscale(_raw_tile(kind, x, valid), tile)
            canvas[r * (tile + gap):r * (tile + gap) + tile, c * (tile + gap):c * (tile + gap) + tile] = t
    return canvas


def save_png_atomic(image: np.ndarray, path: str) -> None:
    """Write a uint8 (H, W, 3) image as PNG via a temporary file and ``os.replace`` (no torn files)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        Image.fromarray(image).save(tmp, format='PNG')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_reconstruction_grid(path: str, inputs: Dict[str, torch.Tensor], preds: Dict[str, torch.Tensor],
                             masks: Dict[str, torch.Tensor], **kwargs) -> np.ndarray:
    """``reconstruction_grid`` saved atomically to ``path``; returns the image (e.g. for W&B)."""
    image = reconstruction_grid(inputs, preds, masks, **kwargs)
    save_png_atomic(image, path)
    return image
