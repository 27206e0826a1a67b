"""Image classification on a MultiViT: fine-tuning and linear probing (``run_finetuning_cls.py``).

The model is an ``rgb`` input adapter, the MultiViT encoder and a ``LinearOutputAdapter`` named ``cls``
(spec 3.2 / 5.5). This module builds the data (ImageNet-style folders, CIFAR-100 from local files), the
model and its pre-trained weights, the train step (Mixup/CutMix with a soft-target loss, else label
smoothing), the split-level top-1/top-5 evaluation of the model and of its EMA, and the shared
:class:`~utils.engine.trainer.Trainer` that runs the loop.

Linear probe (``--linear_probe``, the MAE protocol): every parameter except the head is frozen and the
frozen modules stay in eval mode (no drop path, no dropout); the head is ``BatchNorm1d(affine=False,
eps=1e-6)`` on the pooled encoder features followed by a linear layer (trunc-normal std 0.01), trained
with LARS (trust ratio on the weight matrix, as MAE's LARS) or SGD on RandomResizedCrop + flip
augmentation. The flag changes defaults only (:data:`LINPROBE_DEFAULTS`); values given in a YAML file or
on the command line win.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from utils.config import ConfigError, args_to_dict, load_yaml_config
from utils.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                                  IMAGENET_INCEPTION_STD, IMG_EXTENSIONS)
from utils.dist import get_world_size
from utils.engine.trainer import Trainer, autocast, unwrap_model
from utils.finetune.runner import build_schedules, count_params, wrap_model
from utils.finetune.metrics import ClassificationMetrics
from utils.data.modalities import build_input_adapters
from utils.engine.optim import create_optimizer, finetune_param_groups

__all__ = [
    "LINPROBE_DEFAULTS", "apply_linprobe_defaults", "mixup_active", "validate_cls_args",
    "build_cls_transform_from_args", "build_cls_dataset", "check_same_classes",
    "build_cls_model", "load_cls_pretrained", "freeze_for_linear_probe", "build_model_ema", "build_mixup",
    "build_train_criterion", "ClsStep", "evaluate_cls", "ClsEvalCallback", "evaluate_checkpoint",
    "render_cls_predictions", "build_cls_pictures", "build_cls_trainer",
]

CLS = "cls"
RGB = "rgb"

# MAE linear probing (main_linprobe.py): LARS, blr 0.1, no weight decay, 90 epochs with 10 warm-up,
# 512 images per process, no mixup / cutmix / label smoothing / random erasing / drop path.
LINPROBE_DEFAULTS: dict[str, Any] = dict(
    batch_size=512, epochs=90, warmup_epochs=10, opt="lars", blr=0.1, weight_decay=0.0, min_lr=0.0,
    drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0,
)


# ----------------------------------------------------------------------------------------------
# configuration

def apply_linprobe_defaults(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> bool:
    """If ``--linear_probe`` is on (command line, else the ``-c`` YAML files), make
    :data:`LINPROBE_DEFAULTS` the parser defaults, so only values not given explicitly change.
    Returns whether the probe is on. Call before ``utils.config.parse_args``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("-c", "--config", nargs="+", action="extend", default=[])
    pre.add_argument("--linear_probe", dest="probe", action="store_true", default=None)
    pre.add_argument("--no_linear_probe", dest="probe", action="store_false")
    known = pre.parse_known_args(argv)[0]
    probe = known.probe
    if probe is None:
        probe = False
        for path in known.config:
            try:
                probe = load_yaml_config(parser, path).get("linear_probe", probe)
            except ConfigError:
                pass  # parse_args reports it
    if probe:
        parser.set_defaults(**LINPROBE_DEFAULTS)
    return bool(probe)


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def validate_cls_args(args: argparse.Namespace) -> list[str]:
    """Cross-argument checks of ``run_finetuning_cls.py`` (one line per problem)."""
    errors = []
    if args.input_size % args.patch_size:
        errors.append(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    for name in ("batch_size", "epochs", "update_freq"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if mixup_active(args) and args.batch_size % 2:
        errors.append(f"Mixup/CutMix pairs samples within a batch: --batch_size {args.batch_size} must be even "
                      "(or pass --mixup 0 --cutmix 0)")
    if args.cutmix_minmax is not None and len(args.cutmix_minmax) != 2:
        errors.append(f"--cutmix_minmax takes two values (min max), got {args.cutmix_minmax}")
    if not 0.0 <= args.smoothing < 1.0:
        errors.append(f"--smoothing must be in [0, 1), got {args.smoothing}")
    if args.nb_classes < 1:
        errors.append(f"--nb_classes must be >= 1, got {args.nb_classes}")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        errors.append(f"--max_steps_per_epoch must be >= 1, got {args.max_steps_per_epoch}")
    return errors


# ----------------------------------------------------------------------------------------------
# data

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


def _mean_std(args: argparse.Namespace) -> tuple[tuple, tuple]:
    if args.imagenet_default_mean_and_std:
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    return tuple(IMAGENET_INCEPTION_MEAN), tuple(IMAGENET_INCEPTION_STD)


def build_cls_transform_from_args(args: argparse.Namespace, is_train: bool) -> Callable:
    """Fine-tuning: timm ``create_transform`` (RandAugment, random erasing; spec 6.7). Linear probe
    (train): RandomResizedCrop + horizontal flip only, as MAE. Eval: resize + centre crop."""
    from utils.data.finetune_transforms import build_cls_transform

    mean, std = _mean_std(args)
    if is_train and args.linear_probe:
        from torchvision import transforms as T

        interp = T.InterpolationMode.BICUBIC if args.train_interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        return T.Compose([T.RandomResizedCrop(args.input_size, interpolation=interp), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(mean, std)])
    return build_cls_transform(is_train, args.input_size, color_jitter=args.color_jitter, aa=args.aa,
                               reprob=args.reprob, remode=args.remode, recount=args.recount,
                               train_interpolation=args.train_interpolation, crop_pct=args.crop_pct,
                               mean=mean, std=std)


def build_cls_dataset(args: argparse.Namespace, is_train: bool) -> Dataset:
    """The train (``data_path``) or eval (``eval_data_path``) split with its transform.

    ``IMNET`` / ``image_folder``: a torchvision ``ImageFolder`` (a multi-modal split folder is read from its
    ``rgb/``). ``image_folder`` needs exactly ``nb_classes`` classes; ``IMNET`` at most (fewer is allowed
    with a warning, so ImageNet configs run on small folders). ``CIFAR``: CIFAR-100 files already under
    ``data_path`` (``cifar-100-python/``); nothing is downloaded.
    """
    from torchvision import datasets

    transform = build_cls_transform_from_args(args, is_train)
    path = args.data_path if is_train else args.eval_data_path
    if args.data_set == "CIFAR":
        try:
            ds = datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise FileNotFoundError(f"CIFAR-100 not found under --data_path '{args.data_path}' (expected "
                                    f"cifar-100-python/ from the official archive; nothing is downloaded): {e}") from e
        found = 100
    else:
        ds = datasets.ImageFolder(_image_folder_root(path), transform=transform)
        found = len(ds.classes)
    split = "train" if is_train else "eval"
    where = f"{split} split {getattr(ds, 'root', path)!r} (--data_set {args.data_set})"
    if found > args.nb_classes or (found != args.nb_classes and args.data_set != "IMNET"):
        raise ValueError(f"{where} has {found} classes but --nb_classes is {args.nb_classes}")
    if found != args.nb_classes:
        # printed, not warnings.warn: the scripts hide UserWarnings unless --show_user_warnings
        print(f"warning: {where} has {found} classes; the head has --nb_classes {args.nb_classes} outputs",
              file=sys.stderr)
    return ds


def check_same_classes(train: Dataset, val: Dataset | None) -> None:
    """Train and eval splits must number their classes the same way."""
    a, b = getattr(train, "classes", None), getattr(val, "classes", None)
    if val is not None and a is not None and b is not None and list(a) != list(b):
        diff = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"train split '{train.root}' and eval split '{val.root}' have different classes "
                         f"({len(a)} vs {len(b)}; e.g. {diff}): class indices would not match")


# ----------------------------------------------------------------------------------------------
# model

def build_cls_model(args: argparse.Namespace) -> nn.Module:
    """``args.model`` (a MultiViT, size preset overridden by ``encoder_depth/_dim/_num_heads`` when set) with
    an ``rgb`` input adapter and the ``cls`` head.

    Fine-tuning head: LayerNorm + linear, weights trunc-normal(0.02) x ``init_scale`` (the published
    model's global Xavier init silently overwrote ``init_scale``, spec 9.1; here it takes effect).
    Linear probe: BatchNorm1d(affine=False, eps=1e-6) + linear, trunc-normal(0.01) as MAE.
    """
    from multimae import LinearOutputAdapter, create_model
    from timm.layers import trunc_normal_

    norm = partial(nn.BatchNorm1d, affine=False, eps=1e-6) if args.linear_probe else partial(nn.LayerNorm, eps=1e-6)
    head = LinearOutputAdapter(args.nb_classes, use_mean_pooling=args.use_mean_pooling, norm_layer=norm,
                               init_scale=args.init_scale)
    size = {k: v for k, v in (("depth", args.encoder_depth), ("dim_tokens", args.encoder_dim),
                              ("num_heads", args.encoder_num_heads)) if v is not None}
    model = create_model(args.model, input_adapters=build_input_adapters([RGB], args.patch_size, args.input_size),
                         output_adapters={CLS: head}, num_global_tokens=args.num_global_tokens,
                         drop_rate=args.drop, attn_drop_rate=args.attn_drop_rate, drop_path_rate=args.drop_path,
                         **size)
    linear = model.output_adapters[CLS].head
    with torch.no_grad():
        trunc_normal_(linear.weight, std=0.01 if args.linear_probe else 0.02)
        nn.init.zeros_(linear.bias)
        if not args.linear_probe:
            linear.weight.mul_(args.init_scale)
    return model


def load_cls_pretrained(model: nn.Module, path: str, keep_head: bool = True,
                        log: Callable[[str], None] | None = print):
    """Load pre-trained weights (MultiMAE/MultiViT/timm, .pth/.safetensors) via
    :func:`utils.weights.load_finetune_weights`: pre-training decoders are dropped, position embeddings
    interpolated, every key reported, missing encoder weights are an error. A ``cls`` head of the right
    shape (a fine-tuned checkpoint) is loaded when ``keep_head``. Returns the load report."""
    from utils.weights import load_finetune_weights, load_weights_file

    sd = load_weights_file(path)
    head = f"output_adapters.{CLS}."
    dropped = [k for k in sd if k.startswith("output_adapters.") and not (keep_head and k.startswith(head))]
    sd = {k: v for k, v in sd.items() if k not in set(dropped)}
    report = load_finetune_weights(model, sd, log=None, drop_output_adapters=False)
    report.source, report.dropped = str(path), dropped + report.dropped
    if log is not None:
        log(report.summary())
    return report


def freeze_for_linear_probe(model: nn.Module) -> list[str]:
    """Freeze everything except the ``cls`` head; returns the names of the trainable parameters."""
    prefix = f"output_adapters.{CLS}."
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefix))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def keep_frozen_modules_in_eval(trainer: Trainer, epoch: int) -> None:
    """Epoch-start hook of the linear probe: the frozen encoder runs in eval mode (no drop path/dropout),
    only the head (its BatchNorm statistics) trains."""
    for name, module in unwrap_model(trainer.model).named_children():
        if name != "output_adapters":
            module.eval()


def build_model_ema(args: argparse.Namespace, model: nn.Module) -> nn.Module | None:
    """timm ``ModelEmaV3`` of ``model`` when ``--model_ema`` (on the CPU with ``--model_ema_force_cpu``)."""
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)


# ----------------------------------------------------------------------------------------------
# training step

def build_mixup(args: argparse.Namespace) -> Callable | None:
    """timm ``Mixup`` (label smoothing folded into the soft targets) when mixup/cutmix is on."""
    if not mixup_active(args):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)


def build_train_criterion(args: argparse.Namespace) -> nn.Module:
    """Soft-target CE with mixup, else label-smoothing CE when ``smoothing > 0``, else CE (spec 4.3)."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active(args):
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


class ClsStep:
    """``step(model, (images (B, 3, S, S), labels (B,))) -> (loss, logs)``: optional Mixup/CutMix on the
    device, ``model({'rgb': x})['cls']`` logits (B, K), the training loss; ``class_acc`` is logged when
    the targets are hard labels (no mixup), as published."""

    def __init__(self, criterion: nn.Module, mixup_fn: Callable | None = None):
        self.criterion, self.mixup_fn = criterion, mixup_fn

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        target = y
        if self.mixup_fn is not None:
            x, target = self.mixup_fn(x, y)
        logits = model({RGB: x})[CLS]
        loss = self.criterion(logits, target)
        logs = {} if self.mixup_fn is not None else {"class_acc": (logits.argmax(-1) == y).float().mean()}
        return loss, logs


# ----------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate_cls(model: nn.Module, loader: DataLoader, amp: str = "none") -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) over every sample of ``loader`` on the device of
    ``model``, summed over the processes (the eval loader shards the split without padding), plus
    ``num_samples``. The model is evaluated in eval mode and put back in its previous mode."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    metrics = ClassificationMetrics(topk=(1, 5), device=device)
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model({RGB: images})[CLS]
        logits = logits.float()
        metrics.update(logits, target, F.cross_entropy(logits, target))
    model.train(was_training)
    metrics.reduce_across_processes()
    out = metrics.compute()
    out["num_samples"] = int(metrics.sums[0].item())
    return out


def _evaluate_and_print(model: nn.Module, loader: DataLoader, amp: str, suffix: str = "") -> dict[str, float]:
    m = evaluate_cls(model, loader, amp)
    name = "EMA network" if suffix else "network"
    print(f"Accuracy of the {name} on the {m['num_samples']} test images: {m['acc1']:.2f}% (top-5 "
          f"{m['acc5']:.2f}%, loss {m['loss']:.4f})")
    return {f"test_{k}{suffix}": v for k, v in m.items() if k != "num_samples"}


class ClsEvalCallback:
    """Trainer callback: every ``eval_freq`` epochs and after the last, loss/top-1/top-5 of the model -- and
    of its EMA when there is one -- over the whole eval split: ``test_loss, test_acc1, test_acc5`` (+ the
    same with ``_ema``). ``test_acc1`` drives ``checkpoint-best.pth``."""

    def __init__(self, loader: DataLoader, amp: str = "none", eval_freq: int = 1, epochs: int = 1):
        self.loader, self.amp = loader, amp
        self.eval_freq, self.epochs = max(1, int(eval_freq)), epochs
        self.max_acc1: float | None = None

    def __call__(self, trainer: Trainer, epoch: int, stats: dict) -> dict | None:
        if epoch % self.eval_freq and epoch + 1 != self.epochs:
            return None
        out = _evaluate_and_print(trainer.model, self.loader, self.amp)
        if trainer.model_ema is not None:
            out.update(_evaluate_and_print(trainer.model_ema.module, self.loader, self.amp, "_ema"))
        self.max_acc1 = max(v for v in (self.max_acc1, trainer.best_value, out["test_acc1"]) if v is not None)
        print(f"Max accuracy: {self.max_acc1:.2f}%")
        return out


def evaluate_checkpoint(args: argparse.Namespace, model: nn.Module, loader: DataLoader,
                        checkpoint: str | None) -> dict[str, float]:
    """``--eval``: load ``checkpoint`` (model, and its EMA when saved) into ``model`` -- or keep the
    ``--finetune`` weights already loaded -- and evaluate both on the whole split. Prints the results as
    one JSON line too."""
    from utils.checkpoint import load_checkpoint, load_model_state

    ema_model = None
    if checkpoint:
        ckpt = load_checkpoint(checkpoint, map_location="cpu")
        load_model_state(model, ckpt["model"], strict=True, source=checkpoint)
        if ckpt.get("model_ema"):
            ema_model = copy.deepcopy(model)
            load_model_state(ema_model, ckpt["model_ema"], strict=True, source=f"{checkpoint} (model_ema)")
        print(f"Evaluating {checkpoint} (epoch {ckpt.get('epoch', '?')})")
    elif args.finetune:
        print(f"Evaluating the --finetune weights {args.finetune}")
    else:
        raise ValueError("--eval needs weights: --resume <checkpoint>, a checkpoint in --output_dir (with "
                         "--auto_resume) or --finetune <weights>")
    results = _evaluate_and_print(model, loader, args.amp)
    if ema_model is not None:
        results.update(_evaluate_and_print(ema_model, loader, args.amp, "_ema"))
    print(json.dumps(results))
    return results


# ----------------------------------------------------------------------------------------------
# prediction pictures

class _PictureView(Dataset):
    """``(image, label) -> ({'rgb': image, 'label': label}, label)``: the sample layout
    :class:`utils.finetune.runner.PredictionPictures` expects (a dict of inputs), with the label kept for the
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


def build_cls_pictures(args: argparse.Namespace, dataset: Dataset, device: torch.device, wandb: Any = None):
    """:class:`utils.finetune.runner.PredictionPictures` of ``num_vis`` eval images (``output_dir/vis/``, every
    ``log_images_freq`` epochs; to W&B with ``log_images_wandb``); None when ``num_vis`` is 0."""
    from utils.finetune.runner import PredictionPictures

    if not args.num_vis or not args.output_dir:
        return None
    mean, std = _mean_std(args)
    classes = list(getattr(dataset, "classes", []))
    return PredictionPictures(
        _PictureView(dataset), lambda net, batch: {CLS: net({RGB: batch[0][RGB]})[CLS]},
        partial(render_cls_predictions, class_names=classes, mean=mean, std=std), args.output_dir,
        args.num_vis, args.log_images_freq, args.epochs, device, args.amp, wandb, args.log_images_wandb)


# ----------------------------------------------------------------------------------------------
# optimisation and the trainer

def _lars_param_groups(groups: list[dict]) -> list[dict]:
    """MAE's LARS adapts the update of every matrix (ndim > 1) by its trust ratio, whatever the weight
    decay; timm's ``Lars`` does so only for groups with weight decay unless ``always_adapt``."""
    out = []
    for g in groups:
        mats = [p for p in g["params"] if p.ndim > 1]
        rest = [p for p in g["params"] if p.ndim <= 1]
        if mats:
            out.append({**g, "params": mats, "always_adapt": True})
        if rest:
            out.append({**g, "params": rest})
    return out


def build_cls_trainer(args: argparse.Namespace, model: nn.Module, loader: DataLoader, device: torch.device,
                      wandb: Any = None, model_ema: nn.Module | None = None) -> Trainer:
    """Optimizer with layer-wise lr decay over the trainable parameters, schedules (``lr = blr x batch x
    update_freq x processes / 256`` unless ``--lr``), DDP and the :class:`Trainer`. Sets ``args.lr``."""
    world = get_world_size()
    lr_from = "--lr"
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.update_freq * world / 256
        lr_from = f"blr {args.blr} x batch {args.batch_size} x update_freq {args.update_freq} x {world} processes / 256"
    groups = finetune_param_groups(model, args.weight_decay, args.layer_decay)
    if str(args.opt).lower().endswith("lars"):
        groups = _lars_param_groups(groups)
    optimizer = create_optimizer(args, groups)
    steps = len(loader) // args.update_freq
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"the train split ({len(loader.dataset)} images) gives no full step of batch_size "
                         f"{args.batch_size} x update_freq {args.update_freq} x {world} processes")
    lr_schedule, wd_schedule = build_schedules(args, steps)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    n_parameters = count_params(model)
    step_fn = ClsStep(build_train_criterion(args), build_mixup(args))
    mode = "linear probe" if args.linear_probe else "fine-tuning"
    print(f"{mode}: lr {args.lr:.3e} ({lr_from}), {steps} steps per epoch, {n_parameters / 1e6:.3f}M trainable "
          f"parameters, {len(optimizer.param_groups)} parameter groups")
    return Trainer(wrap_model(model, args, device), optimizer, step_fn, lr_schedule=lr_schedule,
                   wd_schedule=wd_schedule, steps_per_epoch=steps, epochs=args.epochs, device=device, amp=args.amp,
                   clip_grad=args.clip_grad, skip_grad=args.skip_grad, update_freq=args.update_freq,
                   model_ema=model_ema, output_dir=args.output_dir, save_ckpt=args.save_ckpt,
                   save_ckpt_freq=args.save_ckpt_freq, keep_last=args.keep_last, print_freq=args.print_freq,
                   config=args_to_dict(args), wandb=wandb, batch_size=args.batch_size, log_prefix="train_",
                   best_metric="test_acc1", extra_log={"n_parameters": n_parameters},
                   epoch_start_hooks=[keep_frozen_modules_in_eval] if args.linear_probe else [])
