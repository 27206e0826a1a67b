"""What the dense fine-tuning tasks share: the head checks, the optimizer's
parameter groups, the prediction-picture tiles and :class:`DenseJob`, the one Job behind semantic
segmentation (:mod:`utils.finetune.semseg`) and dense regression (:mod:`utils.finetune.depth`).

A dense task describes itself in a :class:`DenseTask` (step, split-level evaluation, best-checkpoint
metric, pictures); :class:`DenseJob` runs it through :func:`utils.runner.run`: ``--finetune`` weights,
``--eval``/``--test`` only, or training with validation every ``eval_freq`` epochs, the best checkpoint,
prediction pictures and a final test of the best checkpoint on ``test_data_path`` (when given).
Batches are ``(dict modality -> tensor, class_index)`` as the folder data set yields them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from utils.config import split_list
from utils.data.constants import PSEUDO_SEMSEG, TASKONOMY_TASKS
from utils.dist import DistContext
from utils.engine.factory import TrainingPlan, peak_lr
from utils.engine.optim import finetune_param_groups
from utils.finetune.common import (EvalCallback, EvaluateFn, PredictionPictures, build_eval_loader,
                                   build_train_loader, evaluate_best_checkpoint, log_record, resolve_finetune_amp,
                                   run_evaluation)
from utils.finetune.models import encoder_info, load_pretrained, use_channels_last
from utils.jobs import Job, Parts

__all__ = ["PSEUDO_SEMSEG", "TASKONOMY_TASKS", "head_errors", "dense_param_groups",
           "DenseTask", "DenseJob", "render_grid", "input_tiles", "input_titles", "dense_tile"]

def head_errors(cfg: Any) -> list[str]:
    """Checks of the head arguments both dense scripts share (one line per problem)."""
    errors = []
    if cfg.input_size % cfg.patch_size:
        errors.append(f"--input_size {cfg.input_size} is not a multiple of --patch_size {cfg.patch_size}")
    p = cfg.decoder_preds_per_patch
    if cfg.output_adapter == 'convnext' and (round(p ** 0.5) ** 2 != p or cfg.decoder_dim % p):
        errors.append(f"--decoder_preds_per_patch {p} must be a square number dividing --decoder_dim "
                      f"{cfg.decoder_dim}")
    if cfg.output_adapter == 'segmenter' and cfg.decoder_dim % 12:
        errors.append(f"--decoder_dim {cfg.decoder_dim}: the Segmenter head has 12 heads; use a multiple of 12")
    if cfg.output_adapter == 'dpt':
        try:
            if encoder_info(cfg.model).depth < 4:
                errors.append(f"--output_adapter dpt taps 4 encoder blocks; '{cfg.model}' has fewer")
        except ValueError as e:
            errors.append(f"--model: {e}")
    if cfg.test and not cfg.test_data_path:
        errors.append("--test needs --test_data_path")
    return errors


def dense_param_groups(cfg: Any, model: nn.Module) -> list[dict]:
    """Layer-decayed parameter groups over the trainable parameters (``layer_decay``, ``no_lr_scale_list``;
    ``scale_input_lr`` where the script declares it, else on); frozen parameters are left out."""
    optim = cfg.optim
    return finetune_param_groups(model, optim.weight_decay, optim.layer_decay,
                                 no_lr_scale_list=split_list(cfg.get('no_lr_scale_list', '')),
                                 scale_input_lr=cfg.get('scale_input_lr', True))


PredictFn = Callable[[nn.Module, Any], Mapping[str, Tensor]]
RenderFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], np.ndarray]


@dataclass
class DenseTask:
    """What a dense task contributes to :class:`DenseJob`.

    ``step_fn(model, batch) -> (loss, logs)``; ``evaluate(model, loader) -> {metric: float}`` (reduces across
    processes itself); ``best_metric``/``best_mode``: the epoch-record key deciding ``checkpoint-best.pth``;
    ``predict``/``render``: prediction pictures (see :class:`PredictionPictures`); ``allow_missing``: glob
    patterns of encoder keys ``--finetune`` may lack (initialised from scratch).
    """
    step_fn: Callable
    evaluate: EvaluateFn
    best_metric: str
    best_mode: str = 'max'
    eval_batch_size: int = 1
    predict: PredictFn | None = None
    render: RenderFn | None = None
    allow_missing: Sequence[str] = ()


class DenseJob(Job):
    """The Job of a dense task: a subclass supplies :meth:`task`, :meth:`model` and :meth:`dataset`."""

    def task(self, cfg: Any, ctx: DistContext) -> DenseTask:
        raise NotImplementedError

    def model(self, cfg: Any) -> nn.Module:
        """The network, on the CPU (the job moves it to the device)."""
        raise NotImplementedError

    def dataset(self, cfg: Any, split: str) -> Dataset:
        """Split 'train', 'val' or 'test' (built only for the splits the run needs)."""
        raise NotImplementedError

    def resolve_amp(self, cfg: Any, device: torch.device) -> str:
        return resolve_finetune_amp(cfg.amp, cfg.get('fp16'), device)

    def build(self, cfg: Any, ctx: DistContext) -> Parts:
        task = self.task(cfg, ctx)
        model = self.model(cfg).to(ctx.device)
        load_pretrained(model, cfg.finetune, task.allow_missing, cfg.checkpoint.output_dir)
        if use_channels_last(cfg.channels_last, ctx.device):
            model.to(memory_format=torch.channels_last)
        if cfg.eval or cfg.test:
            return Parts(model, None, {'task': task})
        train_set, val_set = self.dataset(cfg, 'train'), self.dataset(cfg, 'val')
        print(f"Data: {len(train_set)} training images from {cfg.data_path}, {len(val_set)} validation images "
              f"from {cfg.eval_data_path or cfg.data_path}; amp: {ctx.amp}, device: {ctx.device}")
        loader = build_train_loader(train_set, cfg.batch_size, cfg.runtime, ctx)
        return Parts(model, loader, {'task': task, 'val_set': val_set})

    def evaluate_only(self, cfg: Any, ctx: DistContext, parts: Parts, wandb: Any) -> dict | None:
        """``--eval`` / ``--test``: load the weights to evaluate (``--resume``, else the newest checkpoint in
        output_dir, else the ``--finetune`` / random initialisation, with a message) and evaluate one split."""
        if not (cfg.eval or cfg.test):
            return None
        from utils.checkpoint import load_checkpoint, load_model_state, resolve_resume

        task, model = parts.extra['task'], parts.model
        path = resolve_resume(cfg.checkpoint)
        if path:
            ckpt = load_checkpoint(path)
            load_model_state(model, ckpt['model'], strict=True, source=path)
            print(f"Evaluating {path} (epoch {ckpt.get('epoch')})")
        else:
            print(f"Evaluating the {'--finetune weights' if cfg.finetune else 'randomly initialised model'}: no "
                  f"--resume given and no checkpoint in output_dir '{cfg.output_dir}'")
        split = 'test' if cfg.test else 'val'
        dataset = self.dataset(cfg, split)
        loader = build_eval_loader(dataset, task.eval_batch_size, cfg.runtime)
        record = run_evaluation(task.evaluate, model, loader, split)
        log_record({**record, 'weights': path or cfg.finetune or 'random'}, cfg.output_dir, wandb)
        pictures = self._pictures(cfg, ctx, task, dataset, wandb)
        if pictures is not None:
            pictures.write(model, split)
        return record

    def plan(self, cfg: Any, ctx: DistContext, parts: Parts) -> TrainingPlan:
        task = parts.extra['task']
        lr, _ = peak_lr(cfg.optim, cfg.batch_size, 1, ctx.world_size)

        def describe(steps: int, optimizer: torch.optim.Optimizer, n_parameters: int) -> str:
            return (f"{n_parameters / 1e6:.2f}M trainable parameters, {steps} steps per epoch, lr {lr:.3g}, "
                    f"{len(optimizer.param_groups)} parameter groups (layer decay {cfg.optim.layer_decay})")

        return TrainingPlan(task.step_fn, dense_param_groups(cfg, parts.model), lr, log_prefix='train/',
                            best_metric=task.best_metric, best_mode=task.best_mode, fit_warmup=True,
                            describe=describe)

    def callbacks(self, cfg: Any, ctx: DistContext, parts: Parts, trainer: Any, wandb: Any) -> list[Callable]:
        task, val_set = parts.extra['task'], parts.extra['val_set']
        val_loader = build_eval_loader(val_set, task.eval_batch_size, cfg.runtime)
        callbacks: list[Callable] = [EvalCallback(task.evaluate, {'val': val_loader}, cfg.eval_freq, cfg.epochs)]
        pictures = self._pictures(cfg, ctx, task, val_set, wandb)
        return callbacks + ([pictures] if pictures is not None else [])

    def finish(self, cfg: Any, ctx: DistContext, parts: Parts, trainer: Any, record: dict, wandb: Any) -> dict:
        """A final test of the best checkpoint on ``test_data_path`` when given."""
        if not cfg.test_data_path:
            return record
        task = parts.extra['task']
        loader = build_eval_loader(self.dataset(cfg, 'test'), task.eval_batch_size, cfg.runtime)
        return evaluate_best_checkpoint(trainer, task.evaluate, loader, wandb)

    @staticmethod
    def _pictures(cfg: Any, ctx: DistContext, task: DenseTask, dataset: Dataset, wandb: Any
                  ) -> PredictionPictures | None:
        if task.predict is None or task.render is None:
            return None
        return PredictionPictures(dataset, task.predict, task.render, cfg.output_dir, cfg.num_vis,
                                  cfg.log_images_freq, cfg.epochs, ctx.device, ctx.amp, wandb,
                                  wandb_images=cfg.log_images_wandb)


# ----------------------------------------------------------------------------------------------
# pictures

def render_grid(rows: Sequence[Sequence[np.ndarray]], tile: int, gap: int = 2,
                titles: Sequence[str] = ()) -> np.ndarray:
    """Lay out (h, w, 3) uint8 tiles in a grid, each resized (nearest) to ``tile`` x ``tile``, under a
    header line naming the columns (``titles``, e.g. ``['rgb', 'depth pred', 'depth target']``)."""
    from PIL import Image, ImageDraw

    n_cols = max(len(r) for r in rows)
    header = 14 if titles else 0
    canvas = np.full((header + len(rows) * (tile + gap), n_cols * (tile + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = np.asarray(Image.fromarray(img).resize((tile, tile), Image.NEAREST))
            y = header + i * (tile + gap)
            canvas[y:y + tile, j * (tile + gap):j * (tile + gap) + tile] = img
    if titles:
        picture = Image.fromarray(canvas)
        draw = ImageDraw.Draw(picture)
        for j, text in enumerate(titles):
            draw.text((j * (tile + gap) + 2, 1), text, fill=(0, 0, 0))
        canvas = np.asarray(picture)
    return canvas


def input_titles(x: Mapping[str, Tensor], skip: Sequence[str]) -> list[str]:
    """The column titles of :func:`input_tiles` (the input names, in the same order)."""
    return [k for k in x if k not in skip and k != 'mask_valid']


def input_tiles(x: Mapping[str, Tensor], i: int, skip: Sequence[str]) -> list[np.ndarray]:
    """One tile per input of sample ``i`` (rgb denormalised, labels coloured, dense maps via :func:`dense_tile`)."""
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
            tiles.append(dense_tile(v[i], x['mask_valid'][i] if 'mask_valid' in x else None))
    return tiles


def dense_tile(v: Tensor, valid: Tensor | None, ref: Tensor | None = None) -> np.ndarray:
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


