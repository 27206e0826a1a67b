"""Taskonomy fine-tuning in the published data layout (``run_finetuning_taskonomy.py``): the dense-regression
job of :mod:`utils.finetune.depth` (model, masked-loss step, evaluation, pictures) reading one ``data_path``
with split CSVs (:class:`utils.data.taskonomy.TaskonomyDataset`), the Taskonomy per-task scaling and eroded
valid mask (:class:`utils.data.finetune_transforms.DenseRegressionTransform`), and a final
test of the best checkpoint on the ``test`` split after training. Registered as ``('finetune', 'taskonomy')``.
"""
from __future__ import annotations

from typing import Any

from utils.config import split_list
from utils.data.constants import TASKONOMY_TASKS
from utils.data.modalities import ordered_domains
from utils.dist import DistContext
from utils.finetune.common import build_eval_loader, evaluate_best_checkpoint
from utils.finetune.config import TaskonomyConfig
from utils.finetune.depth import DepthJob, validate_regression_args
from utils.jobs import Parts, register_job

__all__ = ["validate_taskonomy_args", "build_taskonomy_dataset", "TaskonomyJob"]


def validate_taskonomy_args(cfg: TaskonomyConfig) -> list[str]:
    """Cross-argument checks of run_finetuning_taskonomy.py (one line per problem)."""
    errors = [e for e in validate_regression_args(cfg) if not e.startswith("--test needs")]  # test = a split here
    unknown = [t for t in split_list(cfg.out_domains) if t not in TASKONOMY_TASKS]
    if unknown:
        errors.append(f"--out_domains {unknown}: Taskonomy targets are {sorted(TASKONOMY_TASKS)}")
    if cfg.output_adapter != 'dpt':
        errors.append(f"--output_adapter {cfg.output_adapter!r}: the Taskonomy script uses 'dpt' (as published)")
    if not cfg.data_path:
        errors.append("--data_path: the Taskonomy root (one folder per task) is required")
    return errors


def build_taskonomy_dataset(cfg: TaskonomyConfig, split: str):
    """The ``split`` rows (first ``max_<split>_images``) of the inputs, targets and ``mask_valid``."""
    from utils.data.finetune_transforms import DenseRegressionTransform
    from utils.data.taskonomy import TaskonomyDataset

    extra = split_list(cfg.out_domains) + (['mask_valid'] if cfg.use_mask_valid else [])
    domains = ordered_domains(split_list(cfg.in_domains), extra)
    max_images = {'train': cfg.max_train_images, 'val': cfg.max_val_images, 'test': cfg.max_test_images}[split]
    return TaskonomyDataset(cfg.data_path, domains, split, split_dir=cfg.split_dir,
                            transform=DenseRegressionTransform(image_size=cfg.input_size), max_images=max_images)


@register_job('finetune', 'taskonomy')
class TaskonomyJob(DepthJob):
    """Dense regression on the Taskonomy layout; after training the best checkpoint is tested on ``test``."""
    config_class = TaskonomyConfig

    def dataset(self, cfg: TaskonomyConfig, split: str):
        return build_taskonomy_dataset(cfg, split)

    def finish(self, cfg: TaskonomyConfig, ctx: DistContext, parts: Parts, trainer: Any, record: dict,
               wandb: Any) -> dict:
        task = parts.extra['task']
        loader = build_eval_loader(self.dataset(cfg, 'test'), task.eval_batch_size, cfg.runtime)
        return evaluate_best_checkpoint(trainer, task.evaluate, loader, wandb)
