"""What every fine-tuning task shares around its Trainer: precision, loaders, split-level evaluation, the
final test of the best checkpoint and the prediction pictures.

``evaluate(model, loader) -> dict of floats`` receives the unwrapped model (no DDP collectives during
evaluation, so uneven shards cannot hang) and must reduce its metrics across processes itself (the
accumulators of :mod:`utils.finetune.metrics` do)::

    train_loader = build_train_loader(train_set, cfg.batch_size, cfg.runtime, ctx)  # DistributedSampler
    val_loader = build_eval_loader(val_set, eval_batch, cfg.runtime)  # every sample exactly once overall
    evaluator = EvalCallback(evaluate, {'val': val_loader}, cfg.eval_freq, cfg.epochs)   # a Trainer callback
    evaluate_best_checkpoint(trainer, evaluate, test_loader)  # loads checkpoint-best.pth strictly
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from utils.config.job import RuntimeConfig
from utils.data.seeding import PerSampleSeed
from utils.data.shards import ShardLoader, ShardStream
from utils.dist import DistContext, get_rank, get_world_size, is_main_process
from utils.engine.preemption import ignore_stop_signals
from utils.engine.trainer import Trainer, autocast, move_to_device, unwrap_model
from utils.logger import append_log_txt

__all__ = ["resolve_finetune_amp", "EvalShardSampler", "build_train_loader", "build_eval_loader", "EvaluateFn",
           "run_evaluation", "log_record", "EvalCallback", "evaluate_best_checkpoint", "PredictionPictures"]


def resolve_finetune_amp(amp: str, fp16: bool | None, device: torch.device) -> str:
    """Mixed precision of a fine-tuning run. ``amp`` other than 'auto' wins; 'auto' follows the
    ``--fp16`` switch (fp16 on CUDA, full precision elsewhere or with ``--no_fp16``)."""
    if amp != 'auto':
        return amp
    return 'fp16' if (fp16 is None or fp16) and torch.device(device).type == 'cuda' else 'none'



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


def _worker_init(worker_id: int) -> None:
    # Persistent evaluation workers live on through the training epochs: a SIGTERM to the process group
    # must not kill them (torch would then fail the main process before it can save).
    ignore_stop_signals()


def _loader_kwargs(runtime: RuntimeConfig) -> dict:
    workers = int(runtime.num_workers)
    return dict(num_workers=workers, pin_memory=bool(runtime.pin_mem) and torch.cuda.is_available(),
                persistent_workers=workers > 0, worker_init_fn=_worker_init if workers > 0 else None)


class _SeededEpochSampler(DistributedSampler):
    """A ``DistributedSampler`` over a :class:`PerSampleSeed` dataset whose ``set_epoch`` (called by the
    Trainer every epoch) sets the augmentation epoch too."""

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)


def build_train_loader(dataset: Dataset, batch_size: int, runtime: RuntimeConfig, ctx: DistContext | None = None
                       ) -> DataLoader:
    """Shuffled, drop-last loader over a ``DistributedSampler`` (one replica without a process group; the
    Trainer calls ``set_epoch`` every epoch, so single-process runs reshuffle too), seeded by ``runtime.seed``.
    The augmentation of each sample is seeded by ``(runtime.seed, epoch, index)`` (:class:`PerSampleSeed`):
    the same with any number of workers, and a mid-epoch resume skips the batches already trained on."""
    if isinstance(dataset, ShardStream):  # tar shards: the stream splits and shuffles itself
        return ShardLoader(dataset, **_loader_kwargs(runtime))
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (get_rank(), get_world_size())
    seeded = PerSampleSeed(dataset, runtime.seed)
    sampler = _SeededEpochSampler(seeded, num_replicas=world, rank=rank, shuffle=True, drop_last=True,
                                  seed=runtime.seed)
    return DataLoader(seeded, batch_size=batch_size, sampler=sampler, drop_last=True, **_loader_kwargs(runtime))


def build_eval_loader(dataset: Dataset, batch_size: int, runtime: RuntimeConfig) -> DataLoader:
    """In-order evaluation loader over an :class:`EvalShardSampler`: with several processes each evaluates
    its shard and the metrics are reduced (exact, whatever ``--dist_eval`` says: every
    sample is evaluated once, none padded or duplicated); a single process reads the whole split."""
    return DataLoader(dataset, batch_size=max(1, int(batch_size)), sampler=EvalShardSampler(len(dataset)),
                      drop_last=False, **_loader_kwargs(runtime))


# ----------------------------------------------------------------------------------------------
# evaluation

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
    error, never a silently partial load) and evaluate ``loader``. Without a best
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


