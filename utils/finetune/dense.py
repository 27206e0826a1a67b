"""Dense fine-tuning tasks: semantic segmentation and dense regression (NYUv2 depth, Taskonomy targets).

For each task: the arguments the two dense scripts share, the data sets (``MultiModalImageFolder`` with the
published augmentations), the model (MultiViT + ConvNeXt / DPT / Segmenter head), the Trainer step, the
split-level evaluation and the prediction pictures, bundled as a :class:`utils.finetune.runner.FinetuneTask`
(``semseg_task(args)``, ``regression_task(args)``) that :func:`utils.finetune.runner.run_finetuning` runs.

Batches are ``(dict modality -> tensor, class_index)`` as the folder data set yields them.
Semantic segmentation: ``semseg`` is the ground truth ``(B, H, W)`` int64 (255 = ignore); a pseudo-labelled
semseg *input* is read from the ``pseudo_semseg`` folder and fed to the model's ``semseg`` input adapter.
Dense regression: every output task ``(B, C, H, W)`` float, ``mask_valid`` ``(B, 1, H, W)`` bool.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from utils.config import add_arg_group, check_list_arg, split_list
from utils.data.constants import COCO_SEMSEG_NUM_CLASSES, SEG_IGNORE_INDEX, SEMSEG_STRIDE
from utils.data.depth import robust_standardize
from utils.data.shards import bad_sample_policy, is_shard_source, train_split_stream
from utils.engine.trainer import autocast, move_to_device
from utils.finetune.runner import HEADS, FinetuneTask, build_dense_head, build_multivit, encoder_info
from utils.finetune.metrics import DepthMetrics, MeanAccumulator, SegmentationMetrics
from utils.data.modalities import MODALITIES, Modality, get_modality, ordered_domains, register_modality

__all__ = [
    "TASKONOMY_TASKS", "register_finetune_modalities", "add_dense_args", "SemSegStep", "SemSegEvaluator",
    "RegressionStep", "RegressionEvaluator", "semseg_model_domains", "validate_semseg_args",
    "validate_regression_args", "build_semseg_dataset", "build_regression_dataset", "semseg_task",
    "regression_task", "render_grid",
]

PSEUDO_SEMSEG = 'pseudo_semseg'
# Taskonomy targets: name -> (channels the model predicts, file decoder). Scaling: TASKONOMY_SCALING.
TASKONOMY_TASKS = {
    'depth_zbuffer': (1, 'gray'), 'depth_euclidean': (1, 'gray'), 'edge_texture': (1, 'gray'),
    'edge_occlusion': (1, 'gray'), 'keypoints2d': (1, 'gray'), 'keypoints3d': (1, 'gray'),
    'normal': (3, 'rgb'), 'principal_curvature': (2, 'rgb'), 'reshading': (1, 'rgb'),
}


def register_finetune_modalities() -> None:
    """Register the fine-tuning-only modalities (idempotent): ``pseudo_semseg`` (COCO pseudo labels, data
    only; the model reads them through its ``semseg`` adapter) and the Taskonomy targets with their real
    channel counts (the published input adapters of normal/curvature had 1 channel)."""
    if PSEUDO_SEMSEG not in MODALITIES:
        register_modality(Modality(PSEUDO_SEMSEG, num_channels=COCO_SEMSEG_NUM_CLASSES, stride_level=SEMSEG_STRIDE,
                                   num_classes=COCO_SEMSEG_NUM_CLASSES, kind='label', decoder='label',
                                   input_adapter=None, output_adapter=None))
    from utils.data.synthetic import register_normal_modality

    register_normal_modality()  # the one 'normal' definition (3 channels in [0, 1], flip negates x)
    for name, (channels, decoder) in TASKONOMY_TASKS.items():
        if name not in MODALITIES:
            # 16-bit targets are scaled by 1/65535: an 8-bit file would be silently wrong, so it is an error
            register_modality(Modality(name, num_channels=channels, kind='dense', decoder=decoder,
                                       value_scale=1 / 255 if decoder == 'rgb' else 1 / 65535,
                                       value_range=(0.0, 1.0), loss='l1', bit_depth=None if decoder == 'rgb' else 16))


register_finetune_modalities()


def add_dense_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Task/model arguments of the dense scripts (published names; script defaults as overrides, ``OMIT``
    drops one): in_domains, out_domains, decoder_main_tasks, standardize_depth, use_mask_valid
    (``--no_mask_valid``), load_pseudo_depth, drop_path_encoder, learnable_pos_emb, output_adapter,
    decoder_dim, decoder_depth, drop_path_decoder, decoder_preds_per_patch, decoder_interpolate_mode,
    dataset_name, amp, fp16."""
    from utils.config import OMIT

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


def _head_errors(args: argparse.Namespace) -> list[str]:
    errors = []
    if args.input_size % args.patch_size:
        errors.append(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    p = args.decoder_preds_per_patch
    if args.output_adapter == 'convnext' and (round(p ** 0.5) ** 2 != p or args.decoder_dim % p):
        errors.append(f"--decoder_preds_per_patch {p} must be a square number dividing --decoder_dim "
                      f"{args.decoder_dim}")
    if args.output_adapter == 'segmenter' and args.decoder_dim % 12:
        errors.append(f"--decoder_dim {args.decoder_dim}: the Segmenter head has 12 heads; use a multiple of 12")
    if args.output_adapter == 'dpt':
        try:
            if encoder_info(args.model).depth < 4:
                errors.append(f"--output_adapter dpt taps 4 encoder blocks; '{args.model}' has fewer")
        except ValueError as e:
            errors.append(f"--model: {e}")
    if args.test and not args.test_data_path:
        errors.append("--test needs --test_data_path")
    return errors


# ----------------------------------------------------------------------------------------------
# semantic segmentation

def semseg_model_domains(in_domains: Sequence[str]) -> list[str]:
    """Model input names: a pseudo-labelled semseg input feeds the ``semseg`` input adapter."""
    return ['semseg' if d == PSEUDO_SEMSEG else d for d in in_domains]


def validate_semseg_args(args: argparse.Namespace) -> list[str]:
    """Cross-argument checks of run_finetuning_semseg.py (one line per problem)."""
    inputs = [m for m, v in MODALITIES.items() if v.input_adapter is not None and m != 'semseg'] + [PSEUDO_SEMSEG]
    errors = check_list_arg(args, 'in_domains', inputs)
    errors += check_list_arg(args, 'decoder_main_tasks', semseg_model_domains(split_list(args.in_domains)))
    if not split_list(args.in_domains) or not split_list(args.decoder_main_tasks):
        errors.append("--in_domains and --decoder_main_tasks must not be empty")
    if args.num_classes < 1:
        errors.append(f"--num_classes must be >= 1, got {args.num_classes}")
    if args.aug_name != 'simple':
        errors.append(f"--aug_name {args.aug_name!r}: only 'simple' exists")
    return errors + _head_errors(args)


def build_semseg_dataset(args: argparse.Namespace, split: str):
    """MultiModalImageFolder over rgb, the inputs, the ground truth ``semseg`` (and ``mask_valid``) of the
    split folder, with the `simple` augmentation (train) or resize + pad (val/test)."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.finetune_transforms import build_semseg_transform

    root = {'train': args.data_path, 'val': args.eval_data_path, 'test': args.test_data_path}[split]
    extra = ['semseg'] + (['mask_valid'] if args.use_mask_valid else [])
    domains = ordered_domains(['rgb'] + split_list(args.in_domains), extra)
    transform = build_semseg_transform(split == 'train', args.input_size, args.num_classes, args.aug_name,
                                       standardize_depth=args.standardize_depth,
                                       reduce_zero_label=args.seg_reduce_zero_label,
                                       use_void_label=args.seg_use_void_label)
    prefixes = {'depth': 'pseudo_'} if args.load_pseudo_depth else None
    max_images = args.max_train_images if split == 'train' else args.max_val_images
    # ground-truth ids beyond the classes would crash the loss or vanish from the metrics: name the file instead
    ranges = {'semseg': (args.num_classes + int(args.seg_reduce_zero_label), (SEG_IGNORE_INDEX,))}
    if is_shard_source(root):  # tar shards, streamed (utils/data/shards.py)
        return train_split_stream(root, split, domains, transform, args.batch_size, args.seed, ranges, max_images,
                                  bad_sample_policy(args))
    return MultiModalImageFolder(root, domains, transform=transform, max_images=max_images, prefixes=prefixes,
                                 label_ranges=ranges)


class SemSegStep:
    """Trainer step: ``(model, batch) -> (cross-entropy, logs)`` on full-resolution logits, ignore 255.

    ``predict(model, batch) -> {'semseg': logits (B, K, H, W)}``; ``model_inputs(x)`` picks the model inputs
    (``pseudo_semseg`` data -> ``semseg`` adapter).
    """

    def __init__(self, in_domains: Sequence[str], return_all_layers: bool = False,
                 ignore_index: int = SEG_IGNORE_INDEX):
        self.data_keys = list(in_domains)
        self.return_all_layers, self.ignore_index = return_all_layers, ignore_index

    def model_inputs(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {('semseg' if k == PSEUDO_SEMSEG else k): x[k] for k in self.data_keys}

    def predict(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return {'semseg': model(self.model_inputs(x), return_all_layers=self.return_all_layers)['semseg']}

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.predict(model, batch)['semseg']
        loss = self.loss(logits, batch[0]['semseg'])
        return loss, {'loss': loss.detach()}


class SemSegEvaluator:
    """``evaluate(model, loader)``: cross-entropy and mIoU / mean accuracy / pixel accuracy of the whole
    split from one confusion matrix, summed across processes (exact)."""

    def __init__(self, step: SemSegStep, num_classes: int, device: torch.device, amp: str = 'none'):
        self.step, self.num_classes, self.device, self.amp = step, num_classes, device, amp

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader) -> dict[str, float]:
        metrics = SegmentationMetrics(self.num_classes, self.step.ignore_index, device=self.device)
        losses = MeanAccumulator()
        losses.update(n=0, loss=0.0)  # every process reduces the same names, even with an empty shard
        for batch in loader:
            batch = move_to_device(batch, self.device)
            target = batch[0]['semseg']
            with autocast(self.device, self.amp):
                logits = self.step.predict(model, batch)['semseg']
            losses.update(n=target.shape[0], loss=self.step.loss(logits, target))
            metrics.update(logits.float(), target)
        seg = metrics.reduce_across_processes().compute()
        return {'loss': losses.reduce_across_processes().compute()['loss'],
                **{k: seg[k] for k in ('pixel_accuracy', 'mean_accuracy', 'mean_iou')}}


def build_semseg_model(args: argparse.Namespace) -> nn.Module:
    """MultiViT over the model inputs with the ``semseg`` head (``num_classes`` + void channel)."""
    domains = semseg_model_domains(split_list(args.in_domains))
    num_out = args.num_classes + (1 if args.seg_use_void_label else 0)
    head = build_dense_head(args.output_adapter, num_out, split_list(args.decoder_main_tasks), args.patch_size,
                            encoder_info(args.model), decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                            preds_per_patch=args.decoder_preds_per_patch,
                            interpolate_mode=args.decoder_interpolate_mode,
                            drop_path_decoder=args.drop_path_decoder, head_type='semseg')
    # pseudo labels use the COCO classes plus one padding class
    pad = {'semseg': {'emb_padding_idx': COCO_SEMSEG_NUM_CLASSES}} if 'semseg' in domains else None
    return build_multivit(args.model, domains, {'semseg': head}, args.patch_size, args.input_size,
                          learnable_pos_emb=args.learnable_pos_emb, input_adapter_kwargs=pad,
                          num_global_tokens=args.num_global_tokens, drop_path_rate=args.drop_path_encoder)


def semseg_task(args: argparse.Namespace, device: torch.device) -> FinetuneTask:
    """The semantic-segmentation :class:`FinetuneTask` (best checkpoint on max validation mIoU)."""
    step = SemSegStep(split_list(args.in_domains), return_all_layers=args.output_adapter == 'dpt')
    evaluator = SemSegEvaluator(step, args.num_classes, device, args.amp)
    return FinetuneTask(dataset=build_semseg_dataset, model=build_semseg_model, step_fn=step, evaluate=evaluator,
                        best_metric='val/mean_iou', best_mode='max', eval_batch_size=args.batch_size,
                        predict=step.predict, render=_SemSegRender(args.num_classes))


# ----------------------------------------------------------------------------------------------
# dense regression (NYUv2 depth, Taskonomy)

def validate_regression_args(args: argparse.Namespace) -> list[str]:
    """Cross-argument checks of run_finetuning_depth.py (one line per problem)."""
    inputs = [m for m, v in MODALITIES.items() if v.input_adapter is not None]
    targets = [m for m, v in MODALITIES.items() if v.kind == 'dense']
    errors = check_list_arg(args, 'in_domains', inputs) + check_list_arg(args, 'out_domains', targets)
    errors += check_list_arg(args, 'decoder_main_tasks', split_list(args.in_domains))
    ins, outs = split_list(args.in_domains), split_list(args.out_domains)
    if not ins or not outs or not split_list(args.decoder_main_tasks):
        errors.append("--in_domains, --out_domains and --decoder_main_tasks must not be empty")
    if set(ins) & set(outs):
        errors.append(f"--out_domains {sorted(set(ins) & set(outs))} are also inputs")
    if args.output_adapter not in ('dpt', 'convnext'):
        errors.append(f"--output_adapter {args.output_adapter!r}: dense regression uses 'dpt' or 'convnext'")
    if args.aug_name == 'nyu-augs' and outs != ['depth']:
        errors.append(f"--aug_name nyu-augs predicts NYU depth (--out_domains depth), got {args.out_domains!r}; "
                      "use --aug_name taskonomy for other targets")
    return errors + _head_errors(args)


def build_regression_dataset(args: argparse.Namespace, split: str):
    """MultiModalImageFolder over inputs, targets (and ``mask_valid``) with the NYU augmentation and depth
    standardisation (``nyu-augs``) or the Taskonomy resize + per-task scaling (``taskonomy``)."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.finetune_transforms import DenseRegressionTransform, DepthTarget, NYUDepthAugment

    root = {'train': args.data_path, 'val': args.eval_data_path, 'test': args.test_data_path}[split]
    extra = split_list(args.out_domains) + (['mask_valid'] if args.use_mask_valid else [])
    domains = ordered_domains(split_list(args.in_domains), extra)
    if args.aug_name == 'nyu-augs':
        transform = v2.Compose([NYUDepthAugment(split == 'train', args.input_size, args.color_augs),
                                DepthTarget(mean=args.depth_mean, std=args.depth_std)])
    else:
        transform = DenseRegressionTransform(image_size=args.input_size)
    max_images = {'train': args.max_train_images, 'val': args.max_val_images, 'test': args.max_test_images}[split]
    if is_shard_source(root):  # tar shards, streamed (utils/data/shards.py)
        return train_split_stream(root, split, domains, transform, args.batch_size, args.seed, None, max_images,
                                  bad_sample_policy(args))
    return MultiModalImageFolder(root, domains, transform=transform, max_images=max_images)


class RegressionStep:
    """Trainer step for dense regression: masked loss per target (valid pixels of ``mask_valid``), summed.

    Non-rgb inputs are robust-standardised (``standardize_depth``, depth-like inputs) and zeroed where
    ``mask_valid`` is False, as published. Logs ``<task>_loss`` and, for a NYU ``depth`` target, the batch δ1.
    """

    def __init__(self, in_domains: Sequence[str], losses: Mapping[str, nn.Module], standardize_depth: bool = False,
                 return_all_layers: bool = False, depth_metrics: DepthMetrics | None = None):
        self.in_domains, self.losses = list(in_domains), dict(losses)
        self.standardize_depth, self.return_all_layers = standardize_depth, return_all_layers
        self.depth_metrics = depth_metrics

    def model_inputs(self, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        valid = x.get('mask_valid')
        out = {}
        for d in self.in_domains:
            v = x[d]
            if d != 'rgb':
                if self.standardize_depth and d.startswith('depth'):
                    v = robust_standardize(v, valid)
                if valid is not None:
                    v = torch.where(valid, v, torch.zeros((), dtype=v.dtype, device=v.device))
            out[d] = v
        return out

    def predict(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return model(self.model_inputs(x), return_all_layers=self.return_all_layers)

    def task_losses(self, preds: Mapping[str, Tensor], x: Mapping[str, Tensor]) -> dict[str, Tensor]:
        valid = x.get('mask_valid')
        return {t: fn(preds[t].float(), x[t], valid) for t, fn in self.losses.items()}

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x = batch[0]
        preds = self.predict(model, batch)
        losses = self.task_losses(preds, x)
        loss = sum(losses.values())
        logs = {'loss': loss.detach(), **{f'{t}_loss': v.detach() for t, v in losses.items()}}
        if self.depth_metrics is not None and 'depth' in preds:
            s = self.depth_metrics.batch_sums(preds['depth'].detach(), x['depth'], x.get('mask_valid'))
            logs['delta1'] = s[5] / s[0].clamp_min(1)
        return loss, logs


class RegressionEvaluator:
    """``evaluate(model, loader)``: loss per target (weighted by batch size) and, for a NYU ``depth``
    target, δ1/δ2/δ3, abs_rel, sq_rel, rmse, rmse_log per valid pixel over the split (in the units of
    ``depth_mean``/``depth_std``), reduced across processes."""

    def __init__(self, step: RegressionStep, device: torch.device, amp: str = 'none',
                 depth_mean: float | None = None, depth_std: float | None = None, with_depth_metrics: bool = False):
        self.step, self.device, self.amp = step, device, amp
        self.depth_mean, self.depth_std, self.with_depth_metrics = depth_mean, depth_std, with_depth_metrics

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader) -> dict[str, float]:
        depth = DepthMetrics(self.depth_mean, self.depth_std, device=self.device) if self.with_depth_metrics else None
        losses = MeanAccumulator()
        names = ['loss'] + [f'{t}_loss' for t in self.step.losses]
        losses.update(n=0, **{k: 0.0 for k in names})  # same names on every process, even an empty shard
        for batch in loader:
            batch = move_to_device(batch, self.device)
            x = batch[0]
            with autocast(self.device, self.amp):
                preds = self.step.predict(model, batch)
            task_losses = self.step.task_losses(preds, x)
            losses.update(n=next(iter(x.values())).shape[0], loss=sum(task_losses.values()),
                          **{f'{t}_loss': v for t, v in task_losses.items()})
            if depth is not None:
                depth.update(preds['depth'].float(), x['depth'], x.get('mask_valid'))
        out = losses.reduce_across_processes().compute()
        if depth is not None:
            out.update(depth.reduce_across_processes().compute())
        return out


def build_regression_model(args: argparse.Namespace) -> nn.Module:
    """MultiViT over ``in_domains`` with one DPT / ConvNeXt regression head per target."""
    enc = encoder_info(args.model)
    heads = {t: build_dense_head(args.output_adapter, get_modality(t).num_channels, split_list(args.decoder_main_tasks),
                                 args.patch_size, enc, decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth,
                                 preds_per_patch=args.decoder_preds_per_patch, head_type='regression')
             for t in split_list(args.out_domains)}
    model = build_multivit(args.model, split_list(args.in_domains), heads, args.patch_size, args.input_size,
                           num_global_tokens=args.num_global_tokens, drop_path_rate=args.drop_path_encoder)
    if args.freeze_transformer:
        for name, p in model.named_parameters():
            if name.startswith('encoder.'):
                p.requires_grad_(False)
    return model


def regression_task(args: argparse.Namespace, device: torch.device) -> FinetuneTask:
    """The dense-regression :class:`FinetuneTask` (best checkpoint on min validation loss, as published)."""
    from utils.finetune.losses import build_regression_loss

    nyu = args.aug_name == 'nyu-augs'
    metrics = DepthMetrics(args.depth_mean, args.depth_std) if nyu else None
    step = RegressionStep(split_list(args.in_domains), {t: build_regression_loss(args.loss)
                                                        for t in split_list(args.out_domains)},
                          args.standardize_depth, return_all_layers=args.output_adapter == 'dpt', depth_metrics=metrics)
    evaluator = RegressionEvaluator(step, device, args.amp, args.depth_mean, args.depth_std, with_depth_metrics=nyu)
    return FinetuneTask(dataset=build_regression_dataset, model=build_regression_model, step_fn=step,
                        evaluate=evaluator, best_metric='val/loss', best_mode='min',
                        eval_batch_size=max(1, int(1.5 * args.batch_size)), predict=step.predict,
                        render=_RegressionRender(split_list(args.out_domains)))


# ----------------------------------------------------------------------------------------------
# pictures

def render_grid(rows: Sequence[Sequence[np.ndarray]], tile: int, gap: int = 2) -> np.ndarray:
    """Lay out (h, w, 3) uint8 tiles in a grid, each resized (nearest) to ``tile`` x ``tile``."""
    from PIL import Image

    n_cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (tile + gap), n_cols * (tile + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = np.asarray(Image.fromarray(img).resize((tile, tile), Image.NEAREST))
            canvas[i * (tile + gap):i * (tile + gap) + tile, j * (tile + gap):j * (tile + gap) + tile] = img
    return canvas


def _input_tiles(x: Mapping[str, Tensor], i: int, skip: Sequence[str]) -> list[np.ndarray]:
    from utils.vis import colorize_semseg, denormalize_rgb

    tiles = []
    for k, v in x.items():
        if k in skip or k == 'mask_valid':
            continue
        if k == 'rgb':
            tiles.append(denormalize_rgb(v[i]))
        elif not v.is_floating_point():
            tiles.append(colorize_semseg(v[i]))
        else:
            tiles.append(_dense_tile(v[i], x['mask_valid'][i] if 'mask_valid' in x else None))
    return tiles


def _dense_tile(v: Tensor, valid: Tensor | None, ref: Tensor | None = None) -> np.ndarray:
    """1 channel: depth colour map (range from ``ref``, e.g. the ground truth); 2-3 channels: image in [0, 1]."""
    from utils.vis import colorize_depth

    if v.shape[0] == 1:
        r = (ref if ref is not None else v)[0]
        ok = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.reshape(r.shape)
        vals = r[ok] if ok.any() else r.reshape(-1)
        lo, hi = torch.quantile(vals.float(), torch.tensor([0.02, 0.98])).tolist()
        return colorize_depth(v[0], valid, vmin=lo, vmax=hi)
    if v.shape[0] == 2:
        v = torch.cat([v, torch.zeros_like(v[:1])])
    img = (v[:3].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    if valid is not None:
        img[~valid.reshape(img.shape[:2]).numpy()] = 0
    return img


class _SemSegRender:
    """Rows: inputs, prediction, ground truth (ignore and void black)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, x: Mapping[str, Tensor], preds: Mapping[str, Tensor]) -> np.ndarray:
        from utils.vis import colorize_semseg

        pred = preds['semseg'][:, :self.num_classes].argmax(1)
        gt = x['semseg'].clone()
        gt[gt == self.num_classes] = SEG_IGNORE_INDEX
        rows = [_input_tiles(x, i, skip=['semseg']) + [colorize_semseg(pred[i]), colorize_semseg(gt[i])]
                for i in range(pred.shape[0])]
        return render_grid(rows, tile=max(128, int(pred.shape[-1])))


class _RegressionRender:
    """Rows: inputs, then prediction and ground truth of each target (invalid pixels black)."""

    def __init__(self, out_domains: Sequence[str]):
        self.out_domains = list(out_domains)

    def __call__(self, x: Mapping[str, Tensor], preds: Mapping[str, Tensor]) -> np.ndarray:
        rows = []
        n = next(iter(preds.values())).shape[0]
        for i in range(n):
            valid = x['mask_valid'][i] if 'mask_valid' in x else None
            row = _input_tiles(x, i, skip=self.out_domains)
            for t in self.out_domains:
                row += [_dense_tile(preds[t][i], valid, ref=x[t][i]), _dense_tile(x[t][i], valid, ref=x[t][i])]
            rows.append(row)
        return render_grid(rows, tile=max(128, int(next(iter(preds.values())).shape[-1])))
