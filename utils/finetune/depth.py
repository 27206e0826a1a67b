"""Dense-regression fine-tuning (``run_finetuning_depth.py``): NYUv2 depth and the Taskonomy targets. The data
set (NYU augmentation and depth standardisation, or the Taskonomy resize + per-task scaling), the model
(MultiViT + one DPT / ConvNeXt head per target), the masked-loss step, the split-level evaluation (loss per
target, NYU depth metrics) and the pictures, registered as the ``('finetune', 'depth')`` job (best
checkpoint on min validation loss).

Every output task is ``(B, C, H, W)`` float, ``mask_valid`` ``(B, 1, H, W)`` bool.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from utils.config import check_list_arg, split_list
from utils.config.checks import check_split_folders
from utils.data.depth import robust_standardize
from utils.data.modalities import MODALITIES, get_modality, ordered_domains
from utils.data.shards import bad_sample_policy, is_shard_source, train_split_stream
from utils.dist import DistContext
from utils.engine.trainer import autocast, move_to_device
from utils.finetune.config import DepthConfig
from utils.finetune.dense import (DenseJob, DenseTask, dense_tile, head_errors, input_tiles, input_titles,
                                   render_grid)
from utils.finetune.metrics import DepthMetrics, MeanAccumulator
from utils.finetune.models import build_dense_head, build_multivit, encoder_info
from utils.jobs import register_job

__all__ = ["validate_regression_args", "build_regression_dataset", "RegressionStep", "RegressionEvaluator",
           "build_regression_model", "DepthJob"]


def validate_regression_args(cfg: DepthConfig) -> list[str]:
    """Cross-argument checks of run_finetuning_depth.py (one line per problem)."""
    inputs = [m for m, v in MODALITIES.items() if v.input_adapter is not None]
    targets = [m for m, v in MODALITIES.items() if v.kind == 'dense']
    errors = check_list_arg(cfg, 'in_domains', inputs) + check_list_arg(cfg, 'out_domains', targets)
    errors += check_list_arg(cfg, 'decoder_main_tasks', split_list(cfg.in_domains))
    ins, outs = split_list(cfg.in_domains), split_list(cfg.out_domains)
    if not ins or not outs or not split_list(cfg.decoder_main_tasks):
        errors.append("--in_domains, --out_domains and --decoder_main_tasks must not be empty")
    if set(ins) & set(outs):
        errors.append(f"--out_domains {sorted(set(ins) & set(outs))} are also inputs")
    if cfg.output_adapter not in ('dpt', 'convnext'):
        errors.append(f"--output_adapter {cfg.output_adapter!r}: dense regression uses 'dpt' or 'convnext'")
    if cfg.aug_name == 'nyu-augs' and outs != ['depth']:
        errors.append(f"--aug_name nyu-augs predicts NYU depth (--out_domains depth), got {cfg.out_domains!r}; "
                      "use --aug_name taskonomy for other targets")
    if cfg.batch_size < 1:
        errors.append(f"--batch_size must be >= 1, got {cfg.batch_size}")
    return errors + head_errors(cfg) + check_split_folders(cfg, ('data_path', 'eval_data_path', 'test_data_path'))


def build_regression_dataset(cfg: DepthConfig, split: str):
    """MultiModalImageFolder over inputs, targets (and ``mask_valid``) with the NYU augmentation and depth
    standardisation (``nyu-augs``) or the Taskonomy resize + per-task scaling (``taskonomy``)."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.finetune_transforms import DenseRegressionTransform, DepthTarget, NYUDepthAugment

    root = {'train': cfg.data_path, 'val': cfg.eval_data_path, 'test': cfg.test_data_path}[split]
    extra = split_list(cfg.out_domains) + (['mask_valid'] if cfg.use_mask_valid else [])
    domains = ordered_domains(split_list(cfg.in_domains), extra)
    if cfg.aug_name == 'nyu-augs':
        transform = v2.Compose([NYUDepthAugment(split == 'train', cfg.input_size, cfg.color_augs),
                                DepthTarget(mean=cfg.depth_mean, std=cfg.depth_std)])
    else:
        transform = DenseRegressionTransform(image_size=cfg.input_size)
    max_images = {'train': cfg.max_train_images, 'val': cfg.max_val_images, 'test': cfg.max_test_images}[split]
    if is_shard_source(root):  # tar shards, streamed (utils/data/shards.py)
        return train_split_stream(root, split, domains, transform, cfg.batch_size, cfg.seed, None, max_images,
                                  bad_sample_policy(cfg))
    return MultiModalImageFolder(root, domains, transform=transform, max_images=max_images)


class RegressionStep:
    """Trainer step for dense regression: masked loss per target (valid pixels of ``mask_valid``), summed.

    Non-rgb inputs are robust-standardised (``standardize_depth``, depth-like inputs) and zeroed where
    ``mask_valid`` is False. Logs ``<task>_loss`` and, for a NYU ``depth`` target, the batch δ1.
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
    target, δ1/δ2/δ3, abs_rel, sq_rel, rmse, rmse_log over the valid pixels (in the units of
    ``depth_mean``/``depth_std``): averaged per batch (``'batch'``, the default: the paper's tables) or
    pooled per pixel over the split (``'pooled'``), reduced across processes."""

    def __init__(self, step: RegressionStep, device: torch.device, amp: str = 'none',
                 depth_mean: float | None = None, depth_std: float | None = None, with_depth_metrics: bool = False,
                 depth_metrics_mode: str = 'batch'):
        self.step, self.device, self.amp, self.depth_metrics_mode = step, device, amp, depth_metrics_mode
        self.depth_mean, self.depth_std, self.with_depth_metrics = depth_mean, depth_std, with_depth_metrics

    @torch.no_grad()
    def __call__(self, model: nn.Module, loader) -> dict[str, float]:
        depth = DepthMetrics(self.depth_mean, self.depth_std, device=self.device,
                             mode=self.depth_metrics_mode) if self.with_depth_metrics else None
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


def build_regression_model(cfg: DepthConfig) -> nn.Module:
    """MultiViT over ``in_domains`` with one DPT / ConvNeXt regression head per target."""
    enc = encoder_info(cfg.model)
    heads = {t: build_dense_head(cfg.output_adapter, get_modality(t).num_channels, split_list(cfg.decoder_main_tasks),
                                 cfg.patch_size, enc, decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                                 preds_per_patch=cfg.decoder_preds_per_patch, head_type='regression')
             for t in split_list(cfg.out_domains)}
    model = build_multivit(cfg.model, split_list(cfg.in_domains), heads, cfg.patch_size, cfg.input_size,
                           num_global_tokens=cfg.num_global_tokens, drop_path_rate=cfg.drop_path_encoder)
    if cfg.freeze_transformer:
        for name, p in model.named_parameters():
            if name.startswith('encoder.'):
                p.requires_grad_(False)
    return model



@register_job('finetune', 'depth')
class DepthJob(DenseJob):
    """Dense regression: best checkpoint on min validation loss; evaluation batch 1.5 x the training batch."""
    config_class = DepthConfig

    def task(self, cfg: DepthConfig, ctx: DistContext) -> DenseTask:
        from utils.finetune.losses import build_regression_loss

        nyu = cfg.aug_name == 'nyu-augs'
        metrics = DepthMetrics(cfg.depth_mean, cfg.depth_std) if nyu else None
        outs = split_list(cfg.out_domains)
        step = RegressionStep(split_list(cfg.in_domains), {t: build_regression_loss(cfg.loss) for t in outs},
                              cfg.standardize_depth, return_all_layers=cfg.output_adapter == 'dpt',
                              depth_metrics=metrics)
        evaluator = RegressionEvaluator(step, ctx.device, ctx.amp, cfg.depth_mean, cfg.depth_std,
                                        with_depth_metrics=nyu, depth_metrics_mode=cfg.depth_metrics)
        return DenseTask(step_fn=step, evaluate=evaluator, best_metric='val/loss', best_mode='min',
                         eval_batch_size=max(1, int(1.5 * cfg.batch_size)), predict=step.predict,
                         render=_RegressionRender(outs))

    def model(self, cfg: DepthConfig) -> nn.Module:
        return build_regression_model(cfg)

    def dataset(self, cfg: DepthConfig, split: str):
        return build_regression_dataset(cfg, split)


class _RegressionRender:
    """Rows: inputs, then prediction and ground truth of each target (invalid pixels black)."""

    def __init__(self, out_domains: Sequence[str]):
        self.out_domains = list(out_domains)

    def __call__(self, x: Mapping[str, Tensor], preds: Mapping[str, Tensor]) -> np.ndarray:
        rows = []
        n = next(iter(preds.values())).shape[0]
        for i in range(n):
            valid = x['mask_valid'][i] if 'mask_valid' in x else None
            row = input_tiles(x, i, skip=self.out_domains)
            for t in self.out_domains:
                row += [dense_tile(preds[t][i], valid, ref=x[t][i]), dense_tile(x[t][i], valid, ref=x[t][i])]
            rows.append(row)
        titles = input_titles(x, self.out_domains) + [f"{t} {w}" for t in self.out_domains for w in ("pred", "target")]
        return render_grid(rows, tile=max(128, int(next(iter(preds.values())).shape[-1])), titles=titles)
