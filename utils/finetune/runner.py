"""Fine-tuning pieces shared by every fine-tuning script (classification, semantic segmentation, depth and
dense regression): model building, pre-trained weights, loaders, optimizer/schedules, the Trainer glue
(evaluation callback, best checkpoint, final test) and prediction pictures.

The loop itself is :class:`utils.engine.trainer.Trainer`; a script supplies a ``step_fn`` and an ``evaluate``
function and wires them with the helpers here::

    model = build_multivit(args.model, ['rgb'], {'cls': head}, args.patch_size, args.input_size,
                           drop_path_rate=args.drop_path)
    load_pretrained(model, args.finetune)                     # MultiMAE / MultiViT / timm, .pth / .safetensors
    train_loader = build_train_loader(train_set, args)        # DistributedSampler(shuffle, drop_last)
    val_loader = build_eval_loader(val_set, eval_batch, args) # every sample exactly once over the processes
    trainer = build_finetune_trainer(args, model, step_fn, train_loader, device, wandb=wandb,
                                     best_metric='val/acc1', best_mode='max')
    evaluator = EvalCallback(evaluate, {'val': val_loader}, args.eval_freq, args.epochs)
    trainer.resume(resolve_resume(args))
    trainer.fit(train_loader, callbacks=[evaluator])
    evaluate_best_checkpoint(trainer, evaluate, test_loader)  # loads checkpoint-best.pth strictly

``evaluate(model, loader) -> dict of floats`` receives the unwrapped model (no DDP collectives during
evaluation, so uneven shards cannot hang) and must reduce its metrics across processes itself (the
accumulators of :mod:`utils.finetune.metrics` do).

Dense heads for tiny encoders: :func:`dpt_hooks` / :func:`dpt_layer_dims` / :func:`dpt_feature_dim` derive
the DPT taps and widths from the encoder depth and width (ViT-B gives the published ``[2, 5, 8, 11]`` /
``[96, 192, 384, 768]`` / 256),
read from the registered model on the meta device (:func:`encoder_info`), so no size table is duplicated.
"""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.config import add_arg_group, args_to_dict, split_list
from utils.data.shards import ShardLoader, ShardStream
from utils.dist import ddp_find_unused_parameters, get_rank, get_world_size, is_main_process
from utils.engine.trainer import Trainer, autocast, move_to_device, unwrap_model
from utils.logger import append_log_txt

__all__ = [
    "add_finetune_args", "EncoderInfo", "encoder_info", "dpt_hooks", "dpt_layer_dims", "dpt_feature_dim",
    "build_dense_head",
    "build_multivit", "load_pretrained", "EvalShardSampler", "build_train_loader", "build_eval_loader",
    "build_schedules", "build_finetune_optimizer", "wrap_model", "build_finetune_trainer", "EvalCallback",
    "run_evaluation", "log_record", "evaluate_best_checkpoint", "PredictionPictures", "resolve_finetune_amp",
    "count_params", "use_channels_last",
    "FinetuneTask", "run_finetuning",
]


# ----------------------------------------------------------------------------------------------
# arguments

def add_finetune_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Arguments every fine-tuning script shares (published names). Pass a script's defaults as overrides;
    ``OMIT`` leaves an argument out.

    model, num_global_tokens, patch_size, input_size, finetune, data_path, eval_data_path,
    test_data_path, max_val_images, eval_freq, eval (bool), test (bool), dist_eval (bool),
    max_steps_per_epoch, num_vis.
    """
    specs = {
        'model': ('multivit_base', dict(type=str, help='registered MultiViT (multivit_{tiny,small,base,large})')),
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


def resolve_finetune_amp(amp: str, fp16: bool | None, device: torch.device) -> str:
    """Mixed precision of a fine-tuning run. ``amp`` other than 'auto' wins; 'auto' follows the published
    ``--fp16`` switch (fp16 on CUDA, full precision elsewhere or with ``--no_fp16``)."""
    if amp != 'auto':
        return amp
    return 'fp16' if (fp16 is None or fp16) and torch.device(device).type == 'cuda' else 'none'


# ----------------------------------------------------------------------------------------------
# model

@dataclass(frozen=True)
class EncoderInfo:
    """Width and number of blocks of an encoder."""
    dim: int
    depth: int


def encoder_info(model_name: str, **model_kwargs: Any) -> EncoderInfo:
    """Width/depth of the registered model ``model_name`` (with overrides such as ``depth=6``), read from an
    instance built on the meta device (no memory, no time)."""
    from multimae import PatchedInputAdapter, create_model

    with torch.device('meta'):
        probe = create_model(model_name, input_adapters={'rgb': PatchedInputAdapter(3, 1, 16, image_size=16)},
                             output_adapters=None, **model_kwargs)
    return EncoderInfo(dim=probe.dim_tokens, depth=probe.get_num_layers())


def dpt_hooks(depth: int) -> list[int]:
    """Encoder blocks the DPT head taps: the ends of the four quarters (12 blocks -> [2, 5, 8, 11],
    24 -> [5, 11, 17, 23])."""
    if depth < 4:
        raise ValueError(f"the DPT head taps 4 encoder blocks; the encoder has only {depth}")
    return [round(depth * (i + 1) / 4) - 1 for i in range(4)]


def dpt_layer_dims(dim: int) -> list[int]:
    """Reassemble widths of the DPT head: [dim/8, dim/4, dim/2, dim] (768 -> [96, 192, 384, 768])."""
    return [max(1, dim // 8), max(1, dim // 4), max(1, dim // 2), dim]


def dpt_feature_dim(dim: int) -> int:
    """Fusion width of the DPT head: dim/3 capped at the published 256 (768 -> 256, 192 -> 64), so a tiny
    encoder does not carry a ViT-B-sized decoder."""
    return min(256, max(32, dim // 3))


HEADS = ('convnext', 'dpt', 'segmenter')


def build_dense_head(kind: str, num_classes: int, main_tasks: Sequence[str], patch_size: int, enc: EncoderInfo,
                     *, decoder_dim: int = 6144, decoder_depth: int = 4, preds_per_patch: int = 16,
                     interpolate_mode: str = 'bilinear', drop_path_decoder: float = 0.0,
                     head_type: str = 'regression') -> nn.Module:
    """A dense output adapter predicting ``num_classes`` channels at full resolution from the tokens of
    ``main_tasks``: 'convnext' (ConvNeXtAdapter), 'dpt' (DPTOutputAdapter with hooks/widths derived from
    ``enc``; ``head_type`` 'regression' or 'semseg') or 'segmenter' (SegmenterMaskTransformerAdapter)."""
    from multimae import ConvNeXtAdapter, DPTOutputAdapter, SegmenterMaskTransformerAdapter

    main_tasks = list(main_tasks)
    if kind == 'convnext':
        return ConvNeXtAdapter(num_classes, embed_dim=decoder_dim, preds_per_patch=preds_per_patch,
                               main_tasks=main_tasks, patch_size=patch_size, depth=decoder_depth,
                               interpolate_mode=interpolate_mode)
    if kind == 'dpt':
        return DPTOutputAdapter(num_classes, stride_level=1, patch_size=patch_size, main_tasks=main_tasks,
                                hooks=dpt_hooks(enc.depth), layer_dims=dpt_layer_dims(enc.dim),
                                feature_dim=dpt_feature_dim(enc.dim), head_type=head_type)
    if kind == 'segmenter':
        return SegmenterMaskTransformerAdapter(num_classes, depth=decoder_depth, embed_dim=decoder_dim,
                                               drop_path_rate=drop_path_decoder, main_tasks=main_tasks,
                                               patch_size=patch_size)
    raise ValueError(f"unknown output adapter {kind!r}; expected one of {', '.join(HEADS)}")


def build_multivit(model_name: str, in_domains: Sequence[str], output_adapters: Mapping[str, nn.Module] | None,
                   patch_size: int, input_size: int, *, learnable_pos_emb: bool = False,
                   input_adapter_kwargs: Mapping[str, dict] | None = None, **model_kwargs: Any) -> nn.Module:
    """A MultiViT with input adapters for ``in_domains`` from the modality registry (built for
    ``input_size``) and the given output adapters. ``input_adapter_kwargs`` adds per-domain adapter
    arguments (e.g. ``{'semseg': {'emb_padding_idx': 133}}``); ``model_kwargs`` go to the constructor
    (``num_global_tokens``, ``drop_path_rate``, ``drop_rate``, ...; None values keep the defaults)."""
    from multimae import create_model
    from utils.data.modalities import build_input_adapters

    inputs = build_input_adapters(list(in_domains), patch_size, input_size,
                                  per_domain_kwargs=dict(input_adapter_kwargs or {}),
                                  learnable_pos_emb=learnable_pos_emb)
    return create_model(model_name, input_adapters=inputs,
                        output_adapters=dict(output_adapters) if output_adapters else None, **model_kwargs)


def load_pretrained(model: nn.Module, path: str, allow_missing: Sequence[str] = ()) -> Any:
    """Load ``--finetune`` weights (MultiMAE / MultiViT / timm ViT; .pth, .safetensors or URL) through
    :func:`utils.weights.load_finetune_weights`: pre-training decoders dropped, class embeddings padded,
    position embeddings interpolated, the loaded/missing/unexpected keys printed, a missing encoder weight
    an error. Returns the report (None when ``path`` is empty)."""
    if not path:
        return None
    from utils.weights import load_finetune_weights

    return load_finetune_weights(unwrap_model(model), path, log=print, allow_missing=allow_missing)


# ----------------------------------------------------------------------------------------------
# data

class EvalShardSampler(Sampler[int]):
    """Sample ``i`` goes to process ``i % world_size``: every sample exactly once over all processes, no
    padding or duplicates (unlike ``DistributedSampler``), so split-level metrics reduced across processes
    equal the single-process ones. Shards may differ in length by one."""

    def __init__(self, dataset_len: int, rank: int | None = None, world_size: int | None = None):
        self.n = int(dataset_len)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _loader_kwargs(args: argparse.Namespace) -> dict:
    workers = int(getattr(args, 'num_workers', 0))
    return dict(num_workers=workers, pin_memory=bool(getattr(args, 'pin_mem', False)) and torch.cuda.is_available(),
                persistent_workers=workers > 0)


def build_train_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    """Shuffled, drop-last loader over a ``DistributedSampler`` (one replica without a process group; the
    Trainer calls ``set_epoch`` every epoch, so single-process runs reshuffle too)."""
    if isinstance(dataset, ShardStream):  # tar shards: the stream splits and shuffles itself
        return ShardLoader(dataset, **_loader_kwargs(args))
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                 drop_last=True, seed=args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, **_loader_kwargs(args))


def build_eval_loader(dataset: Dataset, batch_size: int, args: argparse.Namespace) -> DataLoader:
    """In-order evaluation loader over an :class:`EvalShardSampler`: with several processes each evaluates
    its shard and the metrics are reduced (exact, whatever ``--dist_eval`` says: the published
    non-distributed evaluation duplicated samples); a single process reads the whole split."""
    return DataLoader(dataset, batch_size=max(1, int(batch_size)), sampler=EvalShardSampler(len(dataset)),
                      drop_last=False, **_loader_kwargs(args))


# ----------------------------------------------------------------------------------------------
# optimisation and the trainer

def build_schedules(args: argparse.Namespace, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step lr (linear warm-up from ``warmup_lr``, then cosine to ``min_lr``) and weight-decay schedules.
    A warm-up longer than the run (e.g. a published 100-epoch warm-up in a 2-epoch test) is shortened to the
    whole run with a message instead of failing."""
    from utils.engine.optim import cosine_scheduler, weight_decay_scheduler

    total = args.epochs * steps_per_epoch
    warm_epochs, warm_steps = args.warmup_epochs, args.warmup_steps
    wanted = warm_steps if warm_steps > 0 else warm_epochs * steps_per_epoch
    if wanted > total:
        print(f"warm-up of {wanted} steps is longer than the run ({total} steps): warming up over the whole run")
        warm_epochs, warm_steps = 0, total
    lr = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps_per_epoch, warm_epochs, args.warmup_lr, warm_steps)
    wd = weight_decay_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    return lr, wd


def use_channels_last(mode: str, device: torch.device) -> bool:
    """``--channels_last auto|on|off``: channels-last convolution weights pay on CUDA (tensor-core
    convolutions); on CPU it gained 1-2 % (tools/benchmark.py, ViT-S semseg and depth steps), so 'auto' means
    CUDA only."""
    if mode not in ('auto', 'on', 'off'):
        raise ValueError(f"--channels_last must be 'auto', 'on' or 'off', got {mode!r}")
    return mode == 'on' or (mode == 'auto' and torch.device(device).type == 'cuda')


def build_finetune_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """Optimizer over layer-decayed parameter groups (``args.layer_decay``; optional ``no_lr_scale_list``
    and ``scale_input_lr``); frozen parameters are left out."""
    from utils.engine.optim import create_optimizer, finetune_param_groups

    groups = finetune_param_groups(model, args.weight_decay, getattr(args, 'layer_decay', None),
                                   no_lr_scale_list=split_list(getattr(args, 'no_lr_scale_list', '')),
                                   scale_input_lr=getattr(args, 'scale_input_lr', True))
    return create_optimizer(args, groups)


def wrap_model(model: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """DDP (when several processes) and ``torch.compile`` (``--compile``) around ``model``."""
    wrapped = model
    if get_world_size() > 1:
        ids = [device.index] if device.type == 'cuda' else None
        wrapped = DistributedDataParallel(model, device_ids=ids,
                                          find_unused_parameters=ddp_find_unused_parameters(
                                              model, getattr(args, 'find_unused_params', False)))
    if getattr(args, 'compile', False):
        wrapped = torch.compile(wrapped)
    return wrapped


def build_finetune_trainer(args: argparse.Namespace, model: nn.Module, step_fn: Callable, train_loader: DataLoader,
                           device: torch.device, *, wandb: Any = None, best_metric: str | None = None,
                           best_mode: str = 'max', log_prefix: str = 'train/', **trainer_kwargs: Any) -> Trainer:
    """Optimizer, schedules, DDP/compile and the :class:`Trainer` for a fine-tuning run.

    Reads ``lr``, ``min_lr``, ``warmup_lr``, ``warmup_epochs``, ``warmup_steps``, ``weight_decay(_end)``,
    ``layer_decay``, ``epochs``, ``batch_size``, ``max_steps_per_epoch``, ``amp``, ``clip_grad``,
    ``skip_grad``, ``save_ckpt``, ``save_ckpt_freq``, ``keep_last``, ``print_freq``, ``grad_ckpt``,
    ``output_dir`` from ``args``; ``trainer_kwargs`` go to the Trainer (``update_freq``, ``model_ema``...).
    """
    steps = len(train_loader)
    cap = getattr(args, 'max_steps_per_epoch', None)
    if cap:
        steps = min(steps, cap)
    if getattr(args, 'grad_ckpt', False):
        model.set_grad_checkpointing(True)
    optimizer = build_finetune_optimizer(args, model)
    lr_schedule, wd_schedule = build_schedules(args, max(steps, 1))
    n_parameters = count_params(model)
    print(f"{n_parameters / 1e6:.2f}M trainable parameters, {steps} steps per epoch, lr {args.lr:.3g}, "
          f"{len(optimizer.param_groups)} parameter groups (layer decay {getattr(args, 'layer_decay', None)})")
    return Trainer(wrap_model(model, args, device), optimizer, step_fn, lr_schedule=lr_schedule,
                   wd_schedule=wd_schedule, steps_per_epoch=steps, epochs=args.epochs, device=device, amp=args.amp,
                   clip_grad=args.clip_grad, skip_grad=getattr(args, 'skip_grad', None), output_dir=args.output_dir,
                   save_ckpt=getattr(args, 'save_ckpt', True), save_ckpt_freq=args.save_ckpt_freq,
                   keep_last=getattr(args, 'keep_last', None), print_freq=getattr(args, 'print_freq', 20),
                   config=args_to_dict(args), wandb=wandb, batch_size=args.batch_size, log_prefix=log_prefix,
                   best_metric=best_metric, best_mode=best_mode, extra_log={'n_parameters': n_parameters},
                   **trainer_kwargs)


EvaluateFn = Callable[[nn.Module, DataLoader], Mapping[str, float]]


def run_evaluation(evaluate: EvaluateFn, model: nn.Module, loader: DataLoader, prefix: str) -> dict:
    """Run ``evaluate`` on the unwrapped model in eval mode (training mode restored afterwards), print the
    results and return them as ``{prefix/metric: value}``."""
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    try:
        stats = evaluate(net, loader)
    finally:
        net.train(was_training)
    shown = ', '.join(f'{k} {v:.4g}' for k, v in stats.items() if isinstance(v, (int, float)))
    print(f"{prefix}: {shown} ({len(loader.dataset)} images)")
    return {f'{prefix}/{k}': v for k, v in stats.items()}


def log_record(record: Mapping[str, Any], output_dir: str = '', wandb: Any = None, step: int | None = None) -> None:
    """Append ``record`` to ``output_dir/log.txt`` (rank 0) and W&B (when enabled)."""
    append_log_txt(output_dir, record)
    if wandb is not None:
        wandb.log(dict(record), step=step)


class EvalCallback:
    """Trainer callback: every ``eval_freq`` epochs and after the last one, evaluate each named loader and
    merge ``{name/metric: value}`` into the epoch record (which drives ``checkpoint-best.pth``)."""

    def __init__(self, evaluate: EvaluateFn, loaders: Mapping[str, DataLoader], eval_freq: int, epochs: int):
        self.evaluate, self.loaders = evaluate, dict(loaders)
        self.eval_freq, self.epochs = max(1, int(eval_freq)), epochs

    def due(self, epoch: int) -> bool:
        return epoch % self.eval_freq == 0 or epoch + 1 == self.epochs

    def __call__(self, trainer: Trainer, epoch: int, stats: dict) -> dict | None:
        if not self.due(epoch):
            return None
        record = {}
        for name, loader in self.loaders.items():
            record.update(run_evaluation(self.evaluate, trainer.model, loader, name))
        return record


def evaluate_best_checkpoint(trainer: Trainer, evaluate: EvaluateFn, loader: DataLoader, wandb: Any = None,
                              prefix: str = 'test') -> dict:
    """After training: load ``output_dir/checkpoint-best.pth`` strictly into the model (a mismatch is an
    error; published: silently loaded nothing unless DDP-wrapped) and evaluate ``loader``. Without a best
    checkpoint (``--no_save_ckpt``, no ``output_dir``, never validated) the final weights are tested and
    the log says so. Results go to log.txt and W&B under ``test/``."""
    from utils.checkpoint import load_checkpoint, load_model_state
    from utils.dist import barrier

    barrier()  # rank 0 may still be writing the checkpoint
    path = os.path.join(trainer.output_dir, 'checkpoint-best.pth') if trainer.output_dir else ''
    if path and os.path.isfile(path):
        ckpt = load_checkpoint(path)
        load_model_state(unwrap_model(trainer.model), ckpt['model'], strict=True, source=path)
        source = f"best checkpoint (epoch {ckpt.get('epoch')}, {path})"
    else:
        source = 'final weights (no checkpoint-best.pth was written)'
    print(f"Testing the {source}")
    record = run_evaluation(evaluate, trainer.model, loader, prefix)
    log_record({**record, f'{prefix}/weights': source}, trainer.output_dir, wandb, trainer.global_step)
    return record


# ----------------------------------------------------------------------------------------------
# prediction pictures

PredictFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
RenderFn = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], np.ndarray]


class PredictionPictures:
    """Input / prediction / ground-truth pictures of ``num_vis`` fixed images of ``dataset``.

    As a Trainer callback it writes ``output_dir/vis/predictions_e<epoch>.png`` every ``freq`` epochs and
    after the last one (rank 0, atomic write), and logs the picture to W&B only when a W&B logger is given
    and ``wandb_images`` is set. ``predict(model, batch) -> {task: prediction}`` runs the model on a batch
    shaped like the training batches; ``render(inputs, preds) -> (H, W, 3) uint8`` draws the grid.
    """

    def __init__(self, dataset: Dataset, predict: PredictFn, render: RenderFn, output_dir: str, num_vis: int,
                 freq: int, epochs: int, device: torch.device, amp: str = 'none', wandb: Any = None,
                 wandb_images: bool = False):
        self.predict, self.render, self.device, self.amp = predict, render, device, amp
        self.freq, self.epochs = max(1, int(freq)), epochs
        self.out_dir = os.path.join(output_dir, 'vis') if output_dir else ''
        self.wandb = wandb if wandb_images else None
        self.batch = None
        if num_vis > 0 and self.out_dir and is_main_process() and len(dataset) > 0:
            n = min(num_vis, len(dataset))
            idx = [round(i * (len(dataset) - 1) / max(n - 1, 1)) for i in range(n)]
            self.batch = torch.utils.data.default_collate([dataset[i] for i in idx])

    @torch.no_grad()
    def write(self, model: nn.Module, tag: str, step: int | None = None) -> str | None:
        """Predict the stored images with ``model`` and write ``predictions_<tag>.png``; returns its path."""
        if self.batch is None:
            return None
        from utils.vis import save_png_atomic

        net = unwrap_model(model)
        was_training = net.training
        net.eval()
        batch = move_to_device(self.batch, self.device)
        with autocast(self.device, self.amp):
            preds = self.predict(net, batch)
        net.train(was_training)
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        cpu = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in inputs.items()}
        image = self.render(cpu, {k: v.detach().float().cpu() for k, v in preds.items()})
        path = os.path.join(self.out_dir, f'predictions_{tag}.png')
        save_png_atomic(image, path)
        print(f"Prediction pictures: {path}")
        if self.wandb is not None:
            self.wandb.log_image('predictions', path, step=step, caption=tag)
        return path

    def __call__(self, trainer: Trainer, epoch: int, stats: dict) -> None:
        if epoch % self.freq == 0 or epoch + 1 == self.epochs:
            self.write(trainer.model, f'e{epoch:04d}', step=trainer.global_step)
        return None


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------
# the whole run

@dataclass
class FinetuneTask:
    """What a fine-tuning script contributes to :func:`run_finetuning`.

    Attributes:
        dataset: ``dataset(args, split) -> Dataset`` for split 'train', 'val' or 'test' (called only for
            the splits the run needs).
        model: ``model(args) -> nn.Module`` (on the CPU; moved to the device by the runner).
        step_fn: the Trainer step ``step_fn(model, batch) -> (loss, logs)``.
        evaluate: ``evaluate(model, loader) -> {metric: float}`` (reduces across processes itself).
        best_metric / best_mode: epoch-record key deciding ``checkpoint-best.pth`` (e.g. 'val/mean_iou', 'max').
        eval_batch_size: batch size of the evaluation loaders.
        predict / render: prediction pictures (see :class:`PredictionPictures`); None = no pictures.
        allow_missing: glob patterns of encoder keys ``--finetune`` may lack (initialised from scratch).
        trainer_kwargs: extra :class:`Trainer` arguments (``update_freq``, ``model_ema``, ...).
    """
    dataset: Callable[[argparse.Namespace, str], Dataset]
    model: Callable[[argparse.Namespace], nn.Module]
    step_fn: Callable
    evaluate: EvaluateFn
    best_metric: str
    best_mode: str = 'max'
    eval_batch_size: int = 1
    predict: PredictFn | None = None
    render: RenderFn | None = None
    allow_missing: Sequence[str] = ()
    trainer_kwargs: dict = field(default_factory=dict)


def _pictures(task: FinetuneTask, args: argparse.Namespace, dataset: Dataset, device: torch.device,
              wandb: Any) -> PredictionPictures | None:
    if task.predict is None or task.render is None:
        return None
    return PredictionPictures(dataset, task.predict, task.render, args.output_dir, getattr(args, 'num_vis', 0),
                              getattr(args, 'log_images_freq', 1), args.epochs, device, args.amp, wandb,
                              wandb_images=getattr(args, 'log_images_wandb', False))


def _evaluate_only(task: FinetuneTask, args: argparse.Namespace, model: nn.Module, device: torch.device,
                   wandb: Any) -> dict:
    """``--eval`` / ``--test``: load the weights to evaluate (``--resume``, else the newest checkpoint in
    output_dir, else the ``--finetune`` / random initialisation, with a message) and evaluate one split."""
    from utils.checkpoint import load_checkpoint, load_model_state, resolve_resume

    path = resolve_resume(args)
    if path:
        ckpt = load_checkpoint(path)
        load_model_state(model, ckpt['model'], strict=True, source=path)
        print(f"Evaluating {path} (epoch {ckpt.get('epoch')})")
    else:
        print(f"Evaluating the {'--finetune weights' if args.finetune else 'randomly initialised model'}: no "
              f"--resume given and no checkpoint in output_dir '{args.output_dir}'")
    split = 'test' if args.test else 'val'
    dataset = task.dataset(args, split)
    record = run_evaluation(task.evaluate, model, build_eval_loader(dataset, task.eval_batch_size, args), split)
    log_record({**record, 'weights': path or args.finetune or 'random'}, args.output_dir, wandb)
    pictures = _pictures(task, args, dataset, device, wandb)
    if pictures is not None:
        pictures.write(model, split)
    return record


def run_finetuning(args: argparse.Namespace, make_task: Callable[[argparse.Namespace, torch.device], FinetuneTask]
                   ) -> dict:
    """A complete fine-tuning run: process group, seeds, resolved ``args.amp``, then ``make_task(args, device)``,
    resolved config in output_dir, data, model,
    ``--finetune`` weights, then either ``--eval``/``--test`` only, or training with validation every
    ``eval_freq`` epochs, the best checkpoint, prediction pictures and a final test of the best checkpoint
    on ``test_data_path`` (when given). Returns the last record (epoch, eval or test)."""
    from utils.checkpoint import resolve_resume
    from utils.config import save_config
    from utils.dist import destroy_distributed, init_distributed_mode, seed_everything, set_deterministic
    from utils.logger import WandbLogger

    if not getattr(args, 'show_user_warnings', False):
        warnings.filterwarnings('ignore', category=UserWarning)
    device = init_distributed_mode(args)
    seed_everything(args.seed, get_rank())
    set_deterministic(getattr(args, 'deterministic', False))
    args.amp = resolve_finetune_amp(args.amp, getattr(args, 'fp16', None), device)
    task = make_task(args, device)
    if args.output_dir and is_main_process():
        save_config(args, args.output_dir)
    model = task.model(args).to(device)
    load_pretrained(model, args.finetune, task.allow_missing)
    if use_channels_last(getattr(args, 'channels_last', 'off'), device):
        model.to(memory_format=torch.channels_last)
    wandb = WandbLogger(args) if args.log_wandb else None
    try:
        if args.eval or args.test:
            return _evaluate_only(task, args, model, device, wandb)
        train_set, val_set = task.dataset(args, 'train'), task.dataset(args, 'val')
        print(f"Data: {len(train_set)} training images from {args.data_path}, {len(val_set)} validation images "
              f"from {args.eval_data_path}; amp: {args.amp}, device: {device}")
        train_loader = build_train_loader(train_set, args)
        trainer = build_finetune_trainer(args, model, task.step_fn, train_loader, device, wandb=wandb,
                                         best_metric=task.best_metric, best_mode=task.best_mode,
                                         **task.trainer_kwargs)
        trainer.start_epoch = args.start_epoch
        trainer.resume(resolve_resume(args))
        callbacks: list = [EvalCallback(task.evaluate, {'val': build_eval_loader(val_set, task.eval_batch_size, args)},
                                        args.eval_freq, args.epochs)]
        pictures = _pictures(task, args, val_set, device, wandb)
        if pictures is not None:
            callbacks.append(pictures)
        record = trainer.fit(train_loader, callbacks=callbacks)
        if args.test_data_path:
            test_loader = build_eval_loader(task.dataset(args, 'test'), task.eval_batch_size, args)
            record = evaluate_best_checkpoint(trainer, task.evaluate, test_loader, wandb)
        return record
    finally:
        if wandb is not None:
            wandb.finish()
        destroy_distributed()
