#!/usr/bin/env python
"""MultiMAE pre-training (masked multi-modal multi-task autoencoding).

    python run_pretraining_multimae.py -c cfgs/pretrain/demo.yaml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=8 run_pretraining_multimae.py \
        -c cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml --data_path /data/imagenet_multitask/train

Every published argument keeps its name and default; see PRETRAINING.md for the few additions.
``--method rgbd_stage1|rgbd_stage2`` runs the two-stage RGB-D method instead (cfgs/pretrain/rgbd_contrastive_*.yaml).
"""
from utils.config import (OMIT, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args,
                          add_runtime_args, add_wandb_args, create_parser, parse_args)
from utils.config.checks import check_pretrain_args
from utils.jobs import get_job
from utils.pretrain.config import PretrainConfig
from utils.pretrain.rgbd import add_rgbd_args, validate_method_args
from utils.runner import run


def get_args_parser():
    p = create_parser("MultiMAE pre-training")
    p.add_argument("--batch_size", type=int, default=256, help="batch size per process")
    p.add_argument("--epochs", type=int, default=1600)
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation: batches per optimizer step")
    p.add_argument("--max_steps_per_epoch", type=int, default=None,
                   help="debugging: cap the optimizer steps per epoch (schedules follow the cap)")
    p.add_argument("--save_vis_freq", type=int, default=20, help="reconstruction pictures every N epochs (0: off)")
    p.add_argument("--num_vis", type=int, default=8, help="number of held-out images in the pictures")
    g = p.add_argument_group("task")
    g.add_argument("--in_domains", type=str, default="rgb-depth-semseg", help="hyphen-separated input modalities")
    g.add_argument("--out_domains", type=str, default="rgb-depth-semseg", help="hyphen-separated outputs")
    add_bool_arg(g, "standardize_depth", False, "truncated per-image depth standardisation")
    add_bool_arg(g, "extra_norm_pix_loss", True, "extra decoder predicting patch-normalised rgb")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="pretrain_multimae_base")
    g.add_argument("--num_encoded_tokens", type=int, default=98, help="visible tokens per sample")
    g.add_argument("--num_global_tokens", type=int, default=1)
    g.add_argument("--patch_size", type=int, default=16)
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--alphas", type=float, default=1.0, help="Dirichlet concentration of the token split")
    add_bool_arg(g, "sample_tasks_uniformly", False, "first draw a non-empty subset of input tasks uniformly")
    add_bool_arg(g, "decoder_use_task_queries", True, "decoder queries carry a task embedding")
    add_bool_arg(g, "decoder_use_xattn", True, "decoder cross-attends to the encoder tokens")
    g.add_argument("--decoder_dim", type=int, default=256)
    g.add_argument("--decoder_depth", type=int, default=2)
    g.add_argument("--decoder_num_heads", type=int, default=8)
    g.add_argument("--drop_path", type=float, default=0.0, help="encoder stochastic depth")
    g.add_argument("--encoder_depth", type=int, default=None, help="override the model's number of blocks")
    g.add_argument("--encoder_dim", type=int, default=None, help="override the model's token width")
    g.add_argument("--encoder_num_heads", type=int, default=None, help="override the model's attention heads")
    add_bool_arg(g, "loss_on_unmasked", False, "loss over all pixels, not only the hidden ones")
    add_optim_args(p, opt_betas=[0.9, 0.95], blr=1e-4, warmup_epochs=40, weight_decay=0.05)
    g = p.add_argument_group("pre-training optimisation")
    add_bool_arg(g, "decay_filter", False, "no weight decay on biases/norms/tokens (default: decay everything)")
    g.add_argument("--task_balancer", type=str, default="none", choices=["none", "uncertainty"])
    g.add_argument("--balancer_lr_scale", type=float, default=1.0)
    g.add_argument("--fp32_output_adapters", type=str, default="", help="hyphen list of decoders run in fp32")
    g = p.add_argument_group("data")
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--train_interpolation", type=str, default="bicubic", choices=["bilinear", "bicubic"])
    g.add_argument("--data_path", type=str, default="",
                   help="split root holding rgb/, depth/, semseg/ (<modality>/<class>/<image>); required "
                        "(the demo: data/synthetic/train)")
    add_bool_arg(g, "imagenet_default_mean_and_std", True, "ImageNet mean/std (else 0.5/0.5)")
    add_checkpoint_args(p)
    add_runtime_args(p, amp=OMIT)
    p.add_argument("--amp", type=str, default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision; auto = fp16 on CUDA (published), none on CPU")
    add_dist_args(p)
    add_wandb_args(p)
    add_rgbd_args(p)
    return p


def main(cfg):
    """Run the pre-training method ``cfg.method`` (a PretrainConfig, or parsed arguments); returns the trainer."""
    if not isinstance(cfg, PretrainConfig):
        cfg = PretrainConfig.from_namespace(cfg)
    return run(cfg, get_job("pretrain", cfg.method))


def parse_config(argv=None, exit_on_error=True) -> PretrainConfig:
    """Command line + YAML, frozen and validated."""
    return parse_args(get_args_parser(), argv, validate=[validate_method_args, check_pretrain_args], exit_on_error=exit_on_error,
                      config_class=PretrainConfig)


if __name__ == "__main__":
    main(parse_config())
