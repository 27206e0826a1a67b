"""The typed configurations of the fine-tuning scripts (classification, semantic segmentation, depth, Taskonomy).

The fields equal the entry script's arguments and defaults (``tests/test_config_typed.py`` checks it): the
shared sections' fields come from :class:`utils.config.job.JobConfig`, so a class lists only its own
arguments and the defaults its script changes; ``omitted`` names inherited fields the script does not declare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from utils.config.job import JobConfig

__all__ = ["FinetuneConfig", "DenseConfig", "ClsConfig", "SemSegConfig", "DepthConfig", "TaskonomyConfig"]


@dataclass(frozen=True)
class FinetuneConfig(JobConfig):
    """Arguments every fine-tuning script declares (data, model, evaluation)."""
    model: str = 'multivit_base'
    num_global_tokens: int = 1
    patch_size: int = 16
    input_size: int = 512
    finetune: str = ''
    data_path: str = ''
    eval_data_path: str = ''
    test_data_path: str | None = None
    max_val_images: int | None = None
    eval_freq: int = 1
    eval: bool = False
    test: bool = False
    dist_eval: bool = False
    max_steps_per_epoch: int | None = None
    num_vis: int = 8
    batch_size: int = 4
    epochs: int = 64


@dataclass(frozen=True)
class DenseConfig(FinetuneConfig):
    """Arguments of the dense fine-tuning scripts (semantic segmentation, depth / dense regression)."""
    in_domains: str = 'rgb'
    out_domains: str = 'depth'
    decoder_main_tasks: str = 'rgb'
    standardize_depth: bool = True
    use_mask_valid: bool = False
    load_pseudo_depth: bool = False
    drop_path_encoder: float = 0.1
    learnable_pos_emb: bool = False
    output_adapter: str = 'convnext'
    decoder_dim: int = 6144
    decoder_depth: int = 4
    drop_path_decoder: float = 0.0
    decoder_preds_per_patch: int = 16
    decoder_interpolate_mode: str = 'bilinear'
    dataset_name: str = 'ade20k'
    fp16: bool = True
    channels_last: str = 'auto'
    max_train_images: int | None = None


@dataclass(frozen=True)
class ClsConfig(FinetuneConfig):
    """Every argument of run_finetuning_cls.py (fine-tuning and linear probing)."""
    omitted: ClassVar[frozenset[str]] = frozenset({
        'max_val_images', 'no_lr_scale_list', 'save_every_steps', 'scale_input_lr', 'test', 'test_data_path'})
    batch_size: int = 128
    epochs: int = 100
    update_freq: int = 1
    linear_probe: bool = False
    input_size: int = 224
    data_path: str = ''
    eval_data_path: str = ''
    encoder_depth: int | None = None
    encoder_dim: int | None = None
    encoder_num_heads: int | None = None
    drop: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path: float = 0.1
    use_mean_pooling: bool = True
    init_scale: float = 0.001
    head_init: str = 'published'
    disable_eval_during_finetuning: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    model_ema_force_cpu: bool = False
    blr: float = 0.0005
    min_lr: float = 1e-06
    layer_decay: float = 0.65
    color_jitter: float = 0.4
    aa: str = 'rand-m9-mstd0.5-inc1'
    smoothing: float = 0.1
    train_interpolation: str = 'bicubic'
    crop_pct: float | None = None
    reprob: float = 0.0
    remode: str = 'pixel'
    recount: int = 1
    resplit: bool = False
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: tuple[float, ...] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = 'batch'
    model_key: str = 'model|module'
    model_prefix: str = ''
    nb_classes: int = 1000
    imagenet_default_mean_and_std: bool = True
    data_set: str = 'IMNET'
    amp: str = 'auto'


@dataclass(frozen=True)
class SemSegConfig(DenseConfig):
    """Every argument of run_finetuning_semseg.py."""
    omitted: ClassVar[frozenset[str]] = frozenset({'blr', 'out_domains', 'save_every_steps', 'scale_input_lr'})
    amp: str = 'auto'
    num_classes: int = 150
    aug_name: str = 'simple'
    seg_reduce_zero_label: bool = False
    seg_use_void_label: bool = False
    depth_stats_valid_only: bool = False
    opt_betas: tuple[float, ...] = (0.9, 0.999)
    lr: float = 0.0001
    layer_decay: float = 0.75
    no_lr_scale_list: str = ''
    warmup_epochs: int = 1
    num_workers: int = 16
    log_images_freq: int = 5


@dataclass(frozen=True)
class DepthConfig(DenseConfig):
    """Every argument of run_finetuning_depth.py (NYUv2 depth and Taskonomy targets)."""
    omitted: ClassVar[frozenset[str]] = frozenset({
        'blr', 'decoder_interpolate_mode', 'fp16', 'learnable_pos_emb', 'load_pseudo_depth', 'no_lr_scale_list',
        'save_every_steps'})
    batch_size: int = 64
    epochs: int = 2000
    tmp: bool = False
    standardize_depth: bool = False
    use_mask_valid: bool = True
    drop_path_encoder: float = 0.0
    output_adapter: str = 'dpt'
    decoder_depth: int = 2
    decoder_preds_per_patch: int = 64
    dataset_name: str = 'nyu'
    amp: str = 'none'
    loss: str = 'berhu'
    aug_name: str = 'nyu-augs'
    color_augs: bool = False
    freeze_transformer: bool = False
    depth_mean: float = 2070.7764
    depth_std: float = 777.5723
    depth_metrics: str = 'batch'
    max_test_images: int | None = None
    input_size: int = 256
    max_val_images: int = 100
    opt_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0001
    lr: float = 0.0001
    layer_decay: float = 0.75
    scale_input_lr: bool = True
    warmup_epochs: int = 100
    save_ckpt_freq: int = 200
    num_workers: int = 16
    wandb_group: str = ''
    log_images_freq: int = 5


@dataclass(frozen=True)
class TaskonomyConfig(DepthConfig):
    """Every argument of run_finetuning_taskonomy.py (the published Taskonomy layout: one ``data_path``, split
    CSVs in ``split_dir``); the dense-regression fields it does not declare keep the depth defaults."""
    omitted: ClassVar[frozenset[str]] = DepthConfig.omitted | frozenset({
        'tmp', 'depth_mean', 'depth_std', 'depth_metrics', 'color_augs', 'decoder_preds_per_patch',
        'eval_data_path', 'test_data_path'})
    batch_size: int = 32
    epochs: int = 100
    out_domains: str = 'normal'
    standardize_depth: bool = True
    drop_path_encoder: float = 0.1
    decoder_dim: int = 768
    dataset_name: str = 'taskonomy'
    amp: str = 'auto'
    loss: str = 'l1'
    aug_name: str = 'taskonomy'
    split_dir: str | None = None
    max_train_images: int | None = 1000
    max_test_images: int | None = 54514
    input_size: int = 384
    weight_decay: float = 0.05
    lr: float = 0.0003
    warmup_epochs: int = 1
    save_ckpt_freq: int = 20
    find_unused_params: bool = True
