"""Image classification on a MultiViT: fine-tuning and linear probing, the ``('finetune', 'cls')`` job of
``run_finetuning_cls.py``.

The model is an ``rgb`` input adapter, the MultiViT encoder and a ``LinearOutputAdapter`` named ``cls``.
This module builds the model and its pre-trained weights, the train step (Mixup/CutMix with a soft-target
loss, else label smoothing), the split-level top-1/top-5 evaluation of the model and of its EMA, and the
job that hands them to :func:`utils.runner.run` (data: :mod:`utils.finetune.cls_data`).

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
import sys
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from utils.config import ConfigError, load_yaml_config
from utils.config.checks import check_split_folders, require_data_path
from utils.data.modalities import build_input_adapters
from utils.dist import DistContext
from utils.engine.factory import TrainingPlan, peak_lr
from utils.engine.optim import finetune_param_groups
from utils.engine.trainer import Trainer, autocast, unwrap_model
from utils.finetune.cls_data import (CLS, RGB, build_cls_dataset, build_cls_pictures, build_cls_transform_from_args,
                                     check_same_classes)
from utils.finetune.common import build_eval_loader, build_train_loader
from utils.finetune.config import ClsConfig
from utils.finetune.metrics import ClassificationMetrics
from utils.jobs import Job, Parts, register_job

__all__ = [
    "LINPROBE_DEFAULTS", "apply_linprobe_defaults", "mixup_active", "validate_cls_args", "build_cls_dataset",
    "build_cls_transform_from_args", "build_cls_model", "load_cls_pretrained", "freeze_for_linear_probe",
    "build_model_ema", "build_mixup", "build_train_criterion", "ClsStep", "evaluate_cls", "ClsEvalCallback",
    "evaluate_checkpoint", "ClsJob",
]

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


def mixup_active(cfg: ClsConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None


def validate_cls_args(cfg: ClsConfig) -> list[str]:
    """Cross-argument checks of ``run_finetuning_cls.py`` (one line per problem)."""
    errors = []
    if cfg.input_size % cfg.patch_size:
        errors.append(f"--input_size {cfg.input_size} is not a multiple of --patch_size {cfg.patch_size}")
    for name in ("batch_size", "epochs", "update_freq"):
        if getattr(cfg, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if mixup_active(cfg) and cfg.batch_size % 2:
        errors.append(f"Mixup/CutMix pairs samples within a batch: --batch_size {cfg.batch_size} must be even "
                      "(or pass --mixup 0 --cutmix 0)")
    if cfg.cutmix_minmax is not None and len(cfg.cutmix_minmax) != 2:
        errors.append(f"--cutmix_minmax takes two values (min max), got {cfg.cutmix_minmax}")
    if not 0.0 <= cfg.smoothing < 1.0:
        errors.append(f"--smoothing must be in [0, 1), got {cfg.smoothing}")
    if cfg.nb_classes < 1:
        errors.append(f"--nb_classes must be >= 1, got {cfg.nb_classes}")
    if cfg.max_steps_per_epoch is not None and cfg.max_steps_per_epoch < 1:
        errors.append(f"--max_steps_per_epoch must be >= 1, got {cfg.max_steps_per_epoch}")
    errors += filter(None, [require_data_path("data_path", cfg.data_path)])
    if cfg.data_set != "CIFAR":  # CIFAR-100 reads both splits from --data_path
        errors += filter(None, [require_data_path("eval_data_path", cfg.eval_data_path, "data/synthetic/val")])
    return errors + check_split_folders(cfg, ("data_path", "eval_data_path"))


# ----------------------------------------------------------------------------------------------
# model

def build_cls_model(cfg: ClsConfig) -> nn.Module:
    """``cfg.model`` (a MultiViT, size preset overridden by ``encoder_depth/_dim/_num_heads`` when set) with
    an ``rgb`` input adapter and the ``cls`` head.

    Fine-tuning head: LayerNorm + linear. ``head_init='published'`` (the default, the init of the published
    recipe): the model's global init (Xavier-uniform weight, std sqrt(2 / (dim + classes)) ~ 0.034 for
    ViT-B/1000 classes, zero bias), which overwrites the adapter's ``init_scale``, so ``init_scale`` has no
    effect; ``'scaled'``: trunc-normal(0.02) x ``init_scale``.
    Linear probe: BatchNorm1d(affine=False, eps=1e-6) + linear, trunc-normal(0.01) as MAE.
    """
    from multimae import LinearOutputAdapter, create_model
    from timm.layers import trunc_normal_

    norm = partial(nn.BatchNorm1d, affine=False, eps=1e-6) if cfg.linear_probe else partial(nn.LayerNorm, eps=1e-6)
    head = LinearOutputAdapter(cfg.nb_classes, use_mean_pooling=cfg.use_mean_pooling, norm_layer=norm,
                               init_scale=cfg.init_scale)
    size = {k: v for k, v in (("depth", cfg.encoder_depth), ("dim_tokens", cfg.encoder_dim),
                              ("num_heads", cfg.encoder_num_heads)) if v is not None}
    model = create_model(cfg.model, input_adapters=build_input_adapters([RGB], cfg.patch_size, cfg.input_size),
                         output_adapters={CLS: head}, num_global_tokens=cfg.num_global_tokens,
                         drop_rate=cfg.drop, attn_drop_rate=cfg.attn_drop_rate, drop_path_rate=cfg.drop_path,
                         **size)
    linear = model.output_adapters[CLS].head
    if not cfg.linear_probe and cfg.head_init == "published":
        return model
    with torch.no_grad():
        trunc_normal_(linear.weight, std=0.01 if cfg.linear_probe else 0.02)
        nn.init.zeros_(linear.bias)
        if not cfg.linear_probe:
            linear.weight.mul_(cfg.init_scale)
    return model


def load_cls_pretrained(model: nn.Module, path: str, keep_head: bool = True,
                        log: Callable[[str], None] | None = print, output_dir: str = ""):
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
        log(report.summary(report.write(output_dir)))
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


def build_model_ema(cfg: ClsConfig, model: nn.Module) -> nn.Module | None:
    """timm ``ModelEmaV3`` of ``model`` when ``--model_ema`` (on the CPU with ``--model_ema_force_cpu``)."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.model_ema_decay, device="cpu" if cfg.model_ema_force_cpu else None)


# ----------------------------------------------------------------------------------------------
# training step

def build_mixup(cfg: ClsConfig) -> Callable | None:
    """timm ``Mixup`` (label smoothing folded into the soft targets) when mixup/cutmix is on."""
    if not mixup_active(cfg):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                 label_smoothing=cfg.smoothing, num_classes=cfg.nb_classes)


def build_train_criterion(cfg: ClsConfig) -> nn.Module:
    """Soft-target CE with mixup, else label-smoothing CE when ``smoothing > 0``, else CE."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active(cfg):
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


class ClsStep:
    """``step(model, (images (B, 3, S, S), labels (B,))) -> (loss, logs)``: optional Mixup/CutMix on the
    device, ``model({'rgb': x})['cls']`` logits (B, K), the training loss; ``class_acc`` is logged when
    the targets are hard labels (no mixup: soft targets have no accuracy)."""

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


def evaluate_checkpoint(model: nn.Module, loader: DataLoader, checkpoint: str | None, finetune: str = "",
                        amp: str = "none") -> dict[str, float]:
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
    elif finetune:
        print(f"Evaluating the --finetune weights {finetune}")
    else:
        raise ValueError("--eval needs weights: --resume <checkpoint>, a checkpoint in --output_dir (with "
                         "--auto_resume) or --finetune <weights>")
    results = _evaluate_and_print(model, loader, amp)
    if ema_model is not None:
        results.update(_evaluate_and_print(ema_model, loader, amp, "_ema"))
    print(json.dumps(results))
    return results


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



@register_job('finetune', 'cls')
class ClsJob(Job):
    """Classification fine-tuning, or the linear probe with ``--linear_probe``: validation (model and EMA)
    every ``eval_freq`` epochs unless ``--disable_eval_during_finetuning``, best checkpoint on ``test_acc1``;
    ``--eval`` evaluates a checkpoint (or the ``--finetune`` weights) and writes no config."""
    config_class = ClsConfig

    def saves_config(self, cfg: ClsConfig) -> bool:
        return not cfg.eval

    def build(self, cfg: ClsConfig, ctx: DistContext) -> Parts:
        val_ds = build_cls_dataset(cfg, is_train=False) if cfg.eval or not cfg.disable_eval_during_finetuning else None
        model = build_cls_model(cfg)
        if cfg.finetune:
            load_cls_pretrained(model, cfg.finetune, keep_head=not cfg.linear_probe,
                                output_dir=cfg.checkpoint.output_dir)
        if cfg.linear_probe:
            print(f"Linear probe: training only {freeze_for_linear_probe(model)}")
        model.to(ctx.device)
        eval_loader = build_eval_loader(val_ds, int(1.5 * cfg.batch_size), cfg.runtime) if val_ds is not None else None
        extra = {'val_set': val_ds, 'eval_loader': eval_loader}
        if cfg.eval:
            return Parts(model, None, extra)
        train_ds = build_cls_dataset(cfg, is_train=True)
        check_same_classes(train_ds, val_ds)
        loader = build_train_loader(train_ds, cfg.batch_size, cfg.runtime, ctx)
        print(f"Data: {len(train_ds)} train images from {getattr(train_ds, 'root', cfg.data_path)}"
              + (f", {len(val_ds)} eval images from {val_ds.root}" if val_ds is not None else ""))
        return Parts(model, loader, extra)

    def evaluate_only(self, cfg: ClsConfig, ctx: DistContext, parts: Parts, wandb: Any) -> dict | None:
        if not cfg.eval:
            return None
        from utils.checkpoint import resolve_resume

        return evaluate_checkpoint(parts.model, parts.extra['eval_loader'], resolve_resume(cfg.checkpoint),
                                   cfg.finetune, ctx.amp)

    def plan(self, cfg: ClsConfig, ctx: DistContext, parts: Parts) -> TrainingPlan:
        """Layer-wise lr decay over the trainable parameters (LARS groups for ``--opt lars``), ``lr = blr x
        batch x update_freq x processes / 256`` unless ``--lr``, the EMA, the probe's eval-mode hook."""
        model = parts.model
        model_ema = build_model_ema(cfg, model)
        lr, lr_from = peak_lr(cfg.optim, cfg.batch_size, cfg.update_freq, ctx.world_size)
        groups = finetune_param_groups(model, cfg.weight_decay, cfg.layer_decay)
        if str(cfg.opt).lower().endswith("lars"):
            groups = _lars_param_groups(groups)
        step_fn = ClsStep(build_train_criterion(cfg), build_mixup(cfg))
        mode = "linear probe" if cfg.linear_probe else "fine-tuning"

        def describe(steps: int, optimizer: torch.optim.Optimizer, n_parameters: int) -> str:
            return (f"{mode}: lr {lr:.3e} ({lr_from}), {steps} steps per epoch, {n_parameters / 1e6:.3f}M "
                    f"trainable parameters, {len(optimizer.param_groups)} parameter groups")

        return TrainingPlan(step_fn, groups, lr, model_ema=model_ema, log_prefix="train_", best_metric="test_acc1",
                            epoch_start_hooks=[keep_frozen_modules_in_eval] if cfg.linear_probe else [],
                            fit_warmup=True, describe=describe)

    def callbacks(self, cfg: ClsConfig, ctx: DistContext, parts: Parts, trainer: Trainer, wandb: Any
                  ) -> list[Callable]:
        val_ds = parts.extra['val_set']
        if val_ds is None:
            return []
        evaluator = ClsEvalCallback(parts.extra['eval_loader'], ctx.amp, cfg.eval_freq, cfg.epochs)
        pictures = build_cls_pictures(cfg, val_ds, ctx, wandb)
        return [evaluator] + ([pictures] if pictures is not None else [])
