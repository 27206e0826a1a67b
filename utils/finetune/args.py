"""Argument groups of the fine-tuning scripts (published names and defaults): what every fine-tuning
script shares (:func:`add_finetune_args`), the dense scripts' task/model group (:func:`add_dense_args`)
and the classification script's own groups (:func:`add_cls_args`). Each entry script's typed config
(:mod:`utils.finetune.config`) has exactly these arguments as fields."""
from __future__ import annotations

import argparse
from typing import Any

from utils.config import (OMIT, add_arg_group, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args,
                          add_runtime_args, add_wandb_args)
from utils.finetune.models import HEADS

__all__ = ["add_finetune_args", "add_dense_args", "add_cls_args"]


def add_finetune_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Arguments every fine-tuning script shares (published names). Pass a script's defaults as overrides;
    ``OMIT`` leaves an argument out.

    model, num_global_tokens, patch_size, input_size, finetune, data_path, eval_data_path,
    test_data_path, max_val_images, eval_freq, eval (bool), test (bool), dist_eval (bool),
    max_steps_per_epoch, num_vis.
    """
    specs = {
        'model': ('multivit_base', dict(type=str, help='the MultiViT to fine-tune')),
        'num_global_tokens': (1, dict(type=int, help='global tokens appended to the patch tokens')),
        'patch_size': (16, dict(type=int, help='patch size of the input adapters')),
        'input_size': (224, dict(type=int, help='image size the network sees (square)')),
        'finetune': ('', dict(type=str, help='pre-trained weights (MultiMAE/MultiViT/timm; .pth/.safetensors/URL)')),
        'data_path': ('', dict(type=str, help='training split folder (<modality>/<class>/<image>)')),
        'eval_data_path': ('', dict(type=str, help='validation split folder')),
        'test_data_path': (None, dict(type=str, help='test split folder (best checkpoint tested after training)')),
        'max_val_images': (None, dict(type=int, help='validate on a fixed random subset of this many images')),
        'eval_freq': (1, dict(type=int, help='validate every N epochs (and after the last)')),
        'eval': (False, dict(bool=True, help='only evaluate the validation split (weights: --resume / output_dir)')),
        'test': (False, dict(bool=True, help='only evaluate the test split and exit')),
        'dist_eval': (False, dict(bool=True, help='published; evaluation is always sharded exactly over processes')),
        'max_steps_per_epoch': (None, dict(type=int, help='debugging: cap the optimizer steps per epoch')),
        'num_vis': (8, dict(type=int, help='validation images in the prediction pictures (0: none)')),
    }
    add_arg_group(parser, 'fine-tuning', specs, overrides)



def add_dense_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Task/model arguments of the dense scripts (published names; script defaults as overrides, ``OMIT``
    drops one): in_domains, out_domains, decoder_main_tasks, standardize_depth, use_mask_valid
    (``--no_mask_valid``), load_pseudo_depth, drop_path_encoder, learnable_pos_emb, output_adapter,
    decoder_dim, decoder_depth, drop_path_decoder, decoder_preds_per_patch, decoder_interpolate_mode,
    dataset_name, amp, fp16."""

    specs = {
        'in_domains': ('rgb', dict(type=str, help="hyphen-separated inputs, e.g. 'rgb-depth'")),
        'out_domains': (OMIT, dict(type=str, help='hyphen-separated dense targets')),
        'decoder_main_tasks': ('rgb', dict(type=str, help='inputs whose tokens the head reads (hyphen list)')),
        'standardize_depth': (True, dict(bool=True, help='robust per-image standardisation of depth inputs')),
        'use_mask_valid': (False, dict(bool=True, no_name='no_mask_valid', help='load mask_valid (invalid depth)')),
        'load_pseudo_depth': (OMIT, dict(bool=True, help="read depth inputs from 'pseudo_depth' folders")),
        'drop_path_encoder': (0.0, dict(type=float, help='stochastic depth of the encoder')),
        'learnable_pos_emb': (OMIT, dict(bool=True, help='learnable position embeddings of the inputs')),
        'output_adapter': ('convnext', dict(type=str, choices=list(HEADS), help='dense head')),
        'decoder_dim': (6144, dict(type=int, help='ConvNeXt / Segmenter head width')),
        'decoder_depth': (4, dict(type=int, help='ConvNeXt / Segmenter head blocks')),
        'drop_path_decoder': (0.0, dict(type=float, help='stochastic depth of the Segmenter head')),
        'decoder_preds_per_patch': (16, dict(type=int, help='ConvNeXt head: sub-patch predictions (square)')),
        'decoder_interpolate_mode': ('bilinear', dict(type=str, choices=['bilinear', 'nearest'],
                                                      help='ConvNeXt head up-sampling')),
        'dataset_name': ('ade20k', dict(type=str, help='data set name (logging)')),
        'amp': ('auto', dict(type=str, choices=['auto', 'bf16', 'fp16', 'none'],
                             help="mixed precision; 'auto' follows --fp16 (fp16 on CUDA, none on CPU)")),
        'fp16': (OMIT, dict(bool=True, help='published mixed-precision switch (used when --amp auto)')),
        'channels_last': ('auto', dict(type=str, choices=['auto', 'on', 'off'],
                                       help="channels-last convolution weights (patch embeddings, ConvNeXt / DPT "
                                            "heads); 'auto': on CUDA only")),
    }
    add_arg_group(parser, 'dense task', specs, overrides)


def add_cls_args(p: argparse.ArgumentParser) -> None:
    """Every argument of run_finetuning_cls.py after ``batch_size``/``epochs``/``update_freq``: linear probe,
    the shared fine-tuning group, model, optimizer, augmentation, data, checkpoint/runtime/dist/W&B."""
    add_bool_arg(p, "linear_probe", False, "frozen encoder, BatchNorm + linear head (MAE protocol); switches "
                 "the defaults to batch 512, 90 epochs (10 warm-up), lars, blr 0.1, wd 0, min_lr 0, no "
                 "mixup/cutmix/smoothing/reprob/drop path, RandomResizedCrop + flip only")
    add_finetune_args(p, test_data_path=OMIT, test=OMIT, max_val_images=OMIT)
    _add_cls_model_args(p)
    add_optim_args(p, blr=5e-4, lr=None, layer_decay=0.65, min_lr=1e-6, warmup_epochs=5)
    _add_cls_augmentation_args(p)
    g = p.add_argument_group("classification data")
    g.add_argument("--model_key", type=str, default="model|module", help="published, unused (found automatically)")
    g.add_argument("--model_prefix", type=str, default="", help="published, unused")
    g.add_argument("--nb_classes", type=int, default=1000, help="number of classes of the head")
    add_bool_arg(g, "imagenet_default_mean_and_std", True, "ImageNet mean/std (else 0.5/0.5)")
    g.add_argument("--data_set", type=str, default="IMNET", choices=["CIFAR", "IMNET", "image_folder"])
    add_checkpoint_args(p, save_ckpt=True, save_every_steps=OMIT)
    add_runtime_args(p, amp=OMIT)
    p.add_argument("--amp", type=str, default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision; auto = fp16 on CUDA (published), none on CPU")
    add_dist_args(p, find_unused_params=False)
    add_wandb_args(p, log_images_wandb=False, log_images_freq=10)


def _add_cls_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("classification model")
    g.add_argument("--encoder_depth", type=int, default=None, help="override the model's number of blocks")
    g.add_argument("--encoder_dim", type=int, default=None, help="override the model's token width")
    g.add_argument("--encoder_num_heads", type=int, default=None, help="override the model's attention heads")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--attn_drop_rate", type=float, default=0.0)
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    add_bool_arg(g, "use_mean_pooling", True, "mean over all tokens (else the last global token)",
                 no_name="no_mean_pooling")
    g.add_argument("--init_scale", type=float, default=0.001,
                   help="--head_init scaled: scale of the head's trunc-normal(0.02) initial weights")
    g.add_argument("--head_init", type=str, default="published", choices=["published", "scaled"],
                   help="fine-tuning head init: 'published' = the model's Xavier-uniform init (init_scale has no "
                        "effect); 'scaled' = trunc-normal(0.02) x init_scale, zero bias")
    add_bool_arg(g, "disable_eval_during_finetuning", False, "no evaluation after each epoch")
    add_bool_arg(g, "model_ema", False, "keep an exponential moving average of the weights (evaluated too)")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    add_bool_arg(g, "model_ema_force_cpu", False, "keep the EMA on the CPU")


def _add_cls_augmentation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation")
    g.add_argument("--color_jitter", type=float, default=0.4, help="colour jitter (used only without --aa)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1",
                   help="timm auto-augment policy ('': off, colour jitter instead)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train_interpolation", type=str, default="bicubic", help="bicubic, bilinear or random")
    g.add_argument("--crop_pct", type=float, default=None,
                   help="eval centre-crop fraction (None: 224/256 below 384 px)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    add_bool_arg(g, "resplit", False, "published, unused")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])
