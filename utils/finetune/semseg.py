"""Semantic-segmentation fine-tuning (``run_finetuning_semseg.py``): the data set, the model (MultiViT +
ConvNeXt / DPT / Segmenter head), the Trainer step, the split-level evaluation and the prediction pictures,
registered as the ``('finetune', 'semseg')`` job (best checkpoint on max validation mIoU).

``semseg`` is the ground truth ``(B, H, W)`` int64 (255 = ignore); a pseudo-labelled semseg *input* is read
from the ``pseudo_semseg`` folder and fed to the model's ``semseg`` input adapter.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import check_list_arg, split_list
from utils.config.checks import check_split_folders
from utils.data.constants import COCO_SEMSEG_NUM_CLASSES, SEG_IGNORE_INDEX
from utils.data.modalities import MODALITIES, ordered_domains
from utils.data.shards import bad_sample_policy, is_shard_source, train_split_stream
from utils.dist import DistContext
from utils.engine.trainer import autocast, move_to_device
from utils.finetune.config import SemSegConfig
from utils.finetune.dense import (PSEUDO_SEMSEG, DenseJob, DenseTask, head_errors, input_tiles,
                                   input_titles, render_grid)
from utils.finetune.metrics import MeanAccumulator, SegmentationMetrics
from utils.finetune.models import build_dense_head, build_multivit, encoder_info
from utils.jobs import register_job

__all__ = ["semseg_model_domains", "validate_semseg_args", "build_semseg_dataset", "SemSegStep", "SemSegEvaluator",
           "build_semseg_model", "SemSegJob"]


def semseg_model_domains(in_domains: Sequence[str]) -> list[str]:
    """Model input names: a pseudo-labelled semseg input feeds the ``semseg`` input adapter."""
    return ['semseg' if d == PSEUDO_SEMSEG else d for d in in_domains]


def validate_semseg_args(cfg: SemSegConfig) -> list[str]:
    """Cross-argument checks of run_finetuning_semseg.py (one line per problem)."""
    inputs = [m for m, v in MODALITIES.items() if v.input_adapter is not None and m != 'semseg'] + [PSEUDO_SEMSEG]
    errors = check_list_arg(cfg, 'in_domains', inputs)
    errors += check_list_arg(cfg, 'decoder_main_tasks', semseg_model_domains(split_list(cfg.in_domains)))
    if not split_list(cfg.in_domains) or not split_list(cfg.decoder_main_tasks):
        errors.append("--in_domains and --decoder_main_tasks must not be empty")
    if cfg.num_classes < 1:
        errors.append(f"--num_classes must be >= 1, got {cfg.num_classes}")
    if cfg.aug_name != 'simple':
        errors.append(f"--aug_name {cfg.aug_name!r}: only 'simple' exists")
    if cfg.batch_size < 1:
        errors.append(f"--batch_size must be >= 1, got {cfg.batch_size}")
    return errors + head_errors(cfg) + check_split_folders(cfg, ('data_path', 'eval_data_path', 'test_data_path'))


def build_semseg_dataset(cfg: SemSegConfig, split: str):
    """MultiModalImageFolder over rgb, the inputs, the ground truth ``semseg`` (and ``mask_valid``) of the
    split folder, with the `simple` augmentation (train) or resize + pad (val/test)."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.finetune_transforms import build_semseg_transform

    root = {'train': cfg.data_path, 'val': cfg.eval_data_path, 'test': cfg.test_data_path}[split]
    extra = ['semseg'] + (['mask_valid'] if cfg.use_mask_valid else [])
    domains = ordered_domains(['rgb'] + split_list(cfg.in_domains), extra)
    transform = build_semseg_transform(split == 'train', cfg.input_size, cfg.num_classes, cfg.aug_name,
                                       standardize_depth=cfg.standardize_depth,
                                       reduce_zero_label=cfg.seg_reduce_zero_label,
                                       use_void_label=cfg.seg_use_void_label,
                                       depth_stats_valid_only=cfg.depth_stats_valid_only,
                                       dense_scales={d: MODALITIES[d].value_scale for d in domains
                                                     if d != 'depth' and d in MODALITIES
                                                     and MODALITIES[d].kind == 'dense'})
    prefixes = {'depth': 'pseudo_'} if cfg.load_pseudo_depth else None
    max_images = cfg.max_train_images if split == 'train' else cfg.max_val_images
    # ground-truth ids beyond the classes would crash the loss or vanish from the metrics: name the file instead
    ranges = {'semseg': (cfg.num_classes + int(cfg.seg_reduce_zero_label), (SEG_IGNORE_INDEX,))}
    if is_shard_source(root):  # tar shards, streamed (utils/data/shards.py)
        return train_split_stream(root, split, domains, transform, cfg.batch_size, cfg.seed, ranges, max_images,
                                  bad_sample_policy(cfg))
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


def build_semseg_model(cfg: SemSegConfig) -> nn.Module:
    """MultiViT over the model inputs with the ``semseg`` head (``num_classes`` + void channel)."""
    domains = semseg_model_domains(split_list(cfg.in_domains))
    num_out = cfg.num_classes + (1 if cfg.seg_use_void_label else 0)
    head = build_dense_head(cfg.output_adapter, num_out, split_list(cfg.decoder_main_tasks), cfg.patch_size,
                            encoder_info(cfg.model), decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                            preds_per_patch=cfg.decoder_preds_per_patch,
                            interpolate_mode=cfg.decoder_interpolate_mode,
                            drop_path_decoder=cfg.drop_path_decoder, head_type='semseg')
    # pseudo labels use the COCO classes plus one padding class
    pad = {'semseg': {'emb_padding_idx': COCO_SEMSEG_NUM_CLASSES}} if 'semseg' in domains else None
    return build_multivit(cfg.model, domains, {'semseg': head}, cfg.patch_size, cfg.input_size,
                          learnable_pos_emb=cfg.learnable_pos_emb, input_adapter_kwargs=pad,
                          num_global_tokens=cfg.num_global_tokens, drop_path_rate=cfg.drop_path_encoder)



@register_job('finetune', 'semseg')
class SemSegJob(DenseJob):
    """Semantic segmentation: best checkpoint on max validation mIoU; evaluation batch = training batch."""
    config_class = SemSegConfig

    def task(self, cfg: SemSegConfig, ctx: DistContext) -> DenseTask:
        step = SemSegStep(split_list(cfg.in_domains), return_all_layers=cfg.output_adapter == 'dpt')
        evaluator = SemSegEvaluator(step, cfg.num_classes, ctx.device, ctx.amp)
        return DenseTask(step_fn=step, evaluate=evaluator, best_metric='val/mean_iou', best_mode='max',
                         eval_batch_size=cfg.batch_size, predict=step.predict, render=_SemSegRender(cfg.num_classes))

    def model(self, cfg: SemSegConfig) -> nn.Module:
        return build_semseg_model(cfg)

    def dataset(self, cfg: SemSegConfig, split: str):
        return build_semseg_dataset(cfg, split)


class _SemSegRender:
    """Rows: inputs, prediction, ground truth (ignore and void black)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, x: Mapping[str, Tensor], preds: Mapping[str, Tensor]) -> np.ndarray:
        from utils.vis import colorize_semseg

        pred = preds['semseg'][:, :self.num_classes].argmax(1)
        gt = x['semseg'].clone()
        gt[gt == self.num_classes] = SEG_IGNORE_INDEX
        rows = [input_tiles(x, i, skip=['semseg']) + [colorize_semseg(pred[i]), colorize_semseg(gt[i])]
                for i in range(pred.shape[0])]
        titles = input_titles(x, ['semseg']) + ['semseg pred', 'semseg target']
        return render_grid(rows, tile=max(128, int(pred.shape[-1])), titles=titles)
