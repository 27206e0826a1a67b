"""Classification data: ImageNet-style folders (a multi-modal split folder is read from its ``rgb/``), tar
shards of a split for training (``--data_path`` naming a shard manifest or pattern, tools/make_shards.py) and
CIFAR-100 from local files, with the fine-tuning (timm ``create_transform``) or linear-probe transforms,
and the prediction pictures of fixed validation images."""
from __future__ import annotations

import os
import random
import sys
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from utils.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                  IMAGENET_INCEPTION_STD, IMG_EXTENSIONS)
from utils.dist import DistContext
from utils.finetune.common import PredictionPictures
from utils.finetune.config import ClsConfig

__all__ = ["CLS", "RGB", "cls_mean_std", "build_cls_transform_from_args", "ShardRgbTransform", "build_cls_dataset",
           "check_same_classes", "render_cls_predictions", "build_cls_pictures"]

CLS = "cls"
RGB = "rgb"


def _image_folder_root(path: str) -> str:
    """``path`` itself, or ``path/rgb`` when ``path`` is a multi-modal split: its ``rgb/`` holds class folders
    (not images), whatever lies beside it (e.g. a ``normal/`` not registered in this process)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder '{path}' does not exist (expected <root>/<class>/<image> or a "
                                "split folder holding rgb/<class>/<image>)")
    rgb = os.path.join(path, RGB)
    entries = list(os.scandir(rgb)) if os.path.isdir(rgb) else []
    if any(e.is_dir() for e in entries) and not any(os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS
                                                    for e in entries if e.is_file()):
        return rgb
    return path


def cls_mean_std(cfg: ClsConfig) -> tuple[tuple, tuple]:
    """Normalisation of the rgb input: ImageNet mean/std, else the Inception 0.5/0.5."""
    if cfg.imagenet_default_mean_and_std:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)


def build_cls_transform_from_args(cfg: ClsConfig, is_train: bool) -> Callable:
    """Fine-tuning: timm ``create_transform`` (RandAugment, random erasing). Linear probe
    (train): RandomResizedCrop + horizontal flip only, as MAE. Eval: resize + centre crop."""
    from utils.data.finetune_transforms import build_cls_transform

    mean, std = cls_mean_std(cfg)
    if is_train and cfg.linear_probe:
        from torchvision import transforms as T

        interp = T.InterpolationMode.BICUBIC if cfg.train_interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        return T.Compose([T.RandomResizedCrop(cfg.input_size, interpolation=interp), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(mean, std)])
    return build_cls_transform(is_train, cfg.input_size, color_jitter=cfg.color_jitter, aa=cfg.aa,
                               reprob=cfg.reprob, remode=cfg.remode, recount=cfg.recount,
                               train_interpolation=cfg.train_interpolation, crop_pct=cfg.crop_pct,
                               mean=mean, std=std)


class ShardRgbTransform:
    """The folder pipeline's classification transform on a shard sample: ``{'rgb': uint8 (3, H, W)} ->
    transform(PIL RGB image)``, e.g. a float (3, S, S) tensor.

    timm's and torchvision's PIL augmentations draw from Python's and NumPy's global RNGs; they are seeded
    from the torch RNG (which the shard stream seeds per sample, epoch and seed) and put back afterwards, so a
    sample's augmentation does not depend on the worker that reads it and a resumed epoch repeats it."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, sample: dict[str, Tensor]) -> Any:
        from PIL import Image

        pixels = sample[RGB].permute(1, 2, 0).contiguous().numpy()  # (H, W, 3) uint8
        seed = int(torch.randint(0, 2 ** 31 - 1, ()))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(Image.fromarray(pixels, "RGB"))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _shard_train_split(cfg: ClsConfig, transform: Callable) -> Dataset:
    from utils.data.shards import bad_sample_policy, train_split_stream

    if cfg.data_set == "CIFAR":
        raise ValueError(f"--data_path '{cfg.data_path}' names shards; --data_set CIFAR reads the CIFAR-100 files "
                         "(use --data_set IMNET or image_folder for shards)")
    return train_split_stream(cfg.data_path, "train", [RGB], ShardRgbTransform(transform), cfg.batch_size,
                              cfg.seed, on_bad_sample=bad_sample_policy(cfg))


def load_rgb_image(path: str) -> Any:
    """``ImageFolder``'s loader, except that an unreadable file (empty, truncated, not an image) raises
    :class:`utils.data.datasets.BadSampleError` naming it, which ``--on_bad_sample skip`` replaces."""
    from PIL import Image

    from utils.data.datasets import BadSampleError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # decodes the whole file: truncation shows here
    except (OSError, ValueError, SyntaxError) as exc:  # PIL: UnidentifiedImageError is an OSError
        size = os.path.getsize(path) if os.path.exists(path) else None
        raise BadSampleError(f"rgb file '{path}' cannot be read as an image ({size} bytes): "
                             f"{type(exc).__name__}: {exc}") from None


def build_cls_dataset(cfg: ClsConfig, is_train: bool) -> Dataset:
    """The train (``data_path``) or eval (``eval_data_path``) split with its transform.

    ``IMNET`` / ``image_folder``: a torchvision ``ImageFolder`` (a multi-modal split folder is read from its
    ``rgb/``). ``image_folder`` needs exactly ``nb_classes`` classes; ``IMNET`` at most (fewer is allowed
    with a warning, so ImageNet configs run on small folders). ``CIFAR``: CIFAR-100 files already under
    ``data_path`` (``cifar-100-python/``); nothing is downloaded. A training ``data_path`` naming tar shards
    (with ``rgb``) is streamed (:class:`utils.data.shards.ShardStream`, batches of the same augmentations).
    """
    from torchvision import datasets

    from utils.data.shards import is_shard_source

    transform = build_cls_transform_from_args(cfg, is_train)
    path = cfg.data_path if is_train else cfg.eval_data_path
    if is_train and is_shard_source(path):
        ds = _shard_train_split(cfg, transform)
        found = len(ds.classes)
    elif cfg.data_set == "CIFAR":
        try:
            ds = datasets.CIFAR100(cfg.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise FileNotFoundError(f"CIFAR-100 not found under --data_path '{cfg.data_path}' (expected "
                                    f"cifar-100-python/ from the official archive; nothing is downloaded): {e}") from e
        found = 100
    else:
        ds = datasets.ImageFolder(_image_folder_root(path), transform=transform, loader=load_rgb_image)
        found = len(ds.classes)
    split = "train" if is_train else "eval"
    where = f"{split} split {getattr(ds, 'root', path)!r} (--data_set {cfg.data_set})"
    if found > cfg.nb_classes or (found != cfg.nb_classes and cfg.data_set != "IMNET"):
        raise ValueError(f"{where} has {found} classes but --nb_classes is {cfg.nb_classes}")
    if found != cfg.nb_classes:
        # printed: a plain line on the console of every script
        print(f"warning: {where} has {found} classes; the head has --nb_classes {cfg.nb_classes} outputs",
              file=sys.stderr)
    return ds


def check_same_classes(train: Dataset, val: Dataset | None) -> None:
    """Train and eval splits must number their classes the same way."""
    a, b = getattr(train, "classes", None), getattr(val, "classes", None)
    if val is not None and a is not None and b is not None and list(a) != list(b):
        diff = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"train split '{getattr(train, 'root', '(shards)')}' and eval split '{val.root}' have "
                         f"different classes "
                         f"({len(a)} vs {len(b)}; e.g. {diff}): class indices would not match")



# ----------------------------------------------------------------------------------------------
# prediction pictures

class _PictureView(Dataset):
    """``(image, label) -> ({'rgb': image, 'label': label}, label)``: the sample layout
    :class:`utils.finetune.common.PredictionPictures` expects (a dict of inputs), with the label kept for the
    picture."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], int]:
        x, y = self.dataset[i]
        return {RGB: x, "label": torch.tensor(y)}, y


def render_cls_predictions(inputs: dict[str, Tensor], preds: dict[str, Tensor], class_names: Sequence[str],
                           mean: Sequence[float], std: Sequence[float], tile: int = 128) -> np.ndarray:
    """One tile per image: the input (``inputs['rgb']`` (N, 3, H, W), normalised) with the true class
    (``inputs['label']`` (N,)) and the top prediction (``preds['cls']`` logits (N, K)) and its probability
    written below, green when right, red when wrong. Returns an (H, W, 3) uint8 picture."""
    from PIL import Image, ImageDraw

    from utils.vis import denormalize_rgb

    images, labels, logits = inputs[RGB], inputs["label"], preds[CLS]
    prob, pred = logits.float().softmax(-1).max(-1)
    name = lambda i: class_names[i] if i < len(class_names) else str(i)  # noqa: E731
    text_h = 28
    canvas = Image.new("RGB", (tile * len(images), tile + text_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (img, y, p, q) in enumerate(zip(images, labels.tolist(), pred.tolist(), prob.tolist())):
        picture = Image.fromarray(denormalize_rgb(img, mean, std)).resize((tile, tile), Image.BICUBIC)
        canvas.paste(picture, (j * tile, 0))
        colour = (0, 140, 0) if p == y else (200, 0, 0)
        draw.rectangle([j * tile, 0, (j + 1) * tile - 1, tile - 1], outline=colour, width=3)
        draw.text((j * tile + 3, tile + 2), f"gt: {name(y)}"[:22], fill=(0, 0, 0))
        draw.text((j * tile + 3, tile + 14), f"pred: {name(p)} {100 * q:.0f}%"[:22], fill=colour)
    return np.asarray(canvas)


def build_cls_pictures(cfg: ClsConfig, dataset: Dataset, ctx: DistContext, wandb: Any = None
                       ) -> PredictionPictures | None:
    """:class:`utils.finetune.common.PredictionPictures` of ``num_vis`` eval images (``output_dir/vis/``, every
    ``log_images_freq`` epochs; to W&B with ``log_images_wandb``); None when ``num_vis`` is 0."""
    if not cfg.num_vis or not cfg.output_dir:
        return None
    mean, std = cls_mean_std(cfg)
    classes = list(getattr(dataset, "classes", []))
    return PredictionPictures(
        _PictureView(dataset), lambda net, batch: {CLS: net({RGB: batch[0][RGB]})[CLS]},
        partial(render_cls_predictions, class_names=classes, mean=mean, std=std), cfg.output_dir,
        cfg.num_vis, cfg.log_images_freq, cfg.epochs, ctx.device, ctx.amp, wandb, cfg.log_images_wandb)
