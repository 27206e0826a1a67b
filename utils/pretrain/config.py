"""The typed configuration of pre-training (every method of run_pretraining_multimae.py).

Generated from the entry script's parser and kept equal to it by ``tests/test_config_typed.py`` (every
argument is a field with the same default); edit both together.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.config.job import JobConfig

__all__ = ["PretrainConfig"]


@dataclass(frozen=True)
class PretrainConfig(JobConfig):
    """Every argument of run_pretraining_multimae.py (MultiMAE and the two-stage RGB-D method)."""
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
    opt: str = 'adamw'
    opt_eps: float = 1e-08
    opt_betas: tuple[float, ...] = (0.9, 0.95)
    clip_grad: float | None = None
    skip_grad: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    decoder_decay: float | None = None
    blr: float = 0.0001
    warmup_lr: float = 1e-06
    min_lr: float = 0.0
    warmup_epochs: int = 40
    warmup_steps: int = -1
    decay_filter: bool = False
    task_balancer: str = 'none'
    balancer_lr_scale: float = 1.0
    fp32_output_adapters: str = ''
    hflip: float = 0.5
    train_interpolation: str = 'bicubic'
    data_path: str = 'data/synthetic/train'
    imagenet_default_mean_and_std: bool = True
    output_dir: str = ''
    resume: str = ''
    auto_resume: bool = True
    start_epoch: int = 0
    save_ckpt_freq: int = 20
    keep_last: int | None = None
    save_every_steps: int = 0
    device: str = 'cuda'
    seed: int = 0
    num_workers: int = 10
    pin_mem: bool = True
    compile: bool = False
    grad_ckpt: bool = False
    tf32: bool = True
    print_freq: int = 10
    deterministic: bool = False
    show_user_warnings: bool = False
    on_bad_sample: str = 'error'
    skip_nonfinite: int = 0
    amp: str = 'auto'
    world_size: int = 1
    local_rank: int = -1
    dist_on_itp: bool = False
    dist_url: str = 'env://'
    dist_backend: str | None = None
    find_unused_params: bool = False
    log_wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    method: str = 'multimae'
    separate_encoders: bool = False
    use_mask_valid: bool = False
    min_valid_fraction: float = 0.5
    temperature: float = 0.07
    learn_temperature: bool = True
    contrast_negatives: str = 'image'
    proj_dim: int = 256
    proj_hidden_dim: int | None = None
    mask_ratio: float = 0.8
    mask_sampler: str = 'independent'
    sigma_max: float = 1.0
    rgb_reconstruction: bool = False
    decoder_xattn_residual: bool = True
    recon_weight: float = 1.0
    denoise_weight: float = 1.0
    distill_weight: float = 1.0
    teacher_checkpoint: str = ''
    teacher_input: str = 'full'
