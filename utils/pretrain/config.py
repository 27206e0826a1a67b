"""The typed configuration of pre-training (every method of run_pretraining_multimae.py).

The fields equal the entry script's arguments and defaults (``tests/test_config_typed.py`` checks it): the
shared sections' fields come from :class:`utils.config.job.JobConfig`, so a class lists only its own
arguments and the defaults its script changes; ``omitted`` names inherited fields the script does not declare.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from utils.config.job import JobConfig

__all__ = ["PretrainConfig"]


@dataclass(frozen=True)
class PretrainConfig(JobConfig):
    """Every argument of run_pretraining_multimae.py (MultiMAE and the two-stage RGB-D method)."""
    omitted: ClassVar[frozenset[str]] = frozenset({
        'layer_decay', 'log_images_freq', 'log_images_wandb', 'lr', 'no_lr_scale_list', 'save_ckpt',
        'scale_input_lr'})
    batch_size: int = 256
    epochs: int = 1600
    update_freq: int = 1
    max_steps_per_epoch: int | None = None
    save_vis_freq: int = 20
    num_vis: int = 8
    in_domains: str = 'rgb-depth-semseg'
    out_domains: str = 'rgb-depth-semseg'
    standardize_depth: bool = False
    extra_norm_pix_loss: bool = True
    model: str = 'pretrain_multimae_base'
    num_encoded_tokens: int = 98
    num_global_tokens: int = 1
    patch_size: int = 16
    input_size: int = 224
    alphas: float = 1.0
    sample_tasks_uniformly: bool = False
    decoder_use_task_queries: bool = True
    decoder_use_xattn: bool = True
    decoder_dim: int = 256
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    drop_path: float = 0.0
    encoder_depth: int | None = None
    encoder_dim: int | None = None
    encoder_num_heads: int | None = None
    loss_on_unmasked: bool = False
    opt_betas: tuple[float, ...] = (0.9, 0.95)
    blr: float = 0.0001
    warmup_epochs: int = 40
    decay_filter: bool = False
    task_balancer: str = 'none'
    balancer_lr_scale: float = 1.0
    fp32_output_adapters: str = ''
    hflip: float = 0.5
    train_interpolation: str = 'bicubic'
    data_path: str = ''
    imagenet_default_mean_and_std: bool = True
    amp: str = 'auto'
    method: str = 'multimae'
    separate_encoders: bool = False
    use_mask_valid: bool = False
    min_valid_fraction: float = 0.5
    temperature: float = 0.07
    learn_temperature: bool = True
    contrast_negatives: str = 'position'
    contrast_patch_fraction: float = 1.0
    proj_dim: int = 256
    proj_hidden_dim: int | None = None
    mask_ratio: float = 0.8
    mask_sampler: str = 'independent'
    sigma_max: float = 1.0
    joint_encoder: bool = False
    rgb_reconstruction: bool = False
    decoder_xattn_residual: bool = True
    denoise_hidden_dim: int = 512
    distill_tokens: str = 'matched'
    distill_norm: str = 'target'
    distill_beta: float = 1.0
    recon_weight: float = 1.0
    denoise_weight: float = 1.0
    distill_weight: float = 1.0
    teacher_checkpoint: str = ''
    teacher_input: str = 'full'
    init_from_teacher: bool = True
