#!/usr/bin/env python
"""Dense-regression fine-tuning of a (Multi)MAE encoder: NYUv2 depth (DPT or ConvNeXt head, BerHu/L1 with
mask_valid, NYU augmentations, depth metrics) and the Taskonomy targets (``--out_domains normal``,
``principal_curvature``, ``depth_zbuffer``, ... with ``--aug_name taskonomy --loss l1``; configs in
cfgs/finetune/taskonomy/) on the multi-modal folder layout; run_finetuning_taskonomy.py reads the published
Taskonomy layout.

    python run_finetuning_depth.py -c cfgs/finetune/depth/synthetic.yaml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 run_finetuning_depth.py \\
        -c cfgs/finetune/depth/ft_nyu_2000e_multimae-b.yaml --finetune multimae-b.pth \\
        --data_path /data/nyu/train --eval_data_path /data/nyu/test

Every published argument keeps its name and default; see FINETUNING.md for the fixes and additions.
"""
from utils.config import (OMIT, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args, add_runtime_args,
                          add_wandb_args, create_parser)
from utils.data.constants import NYU_MEAN, NYU_STD
from utils.finetune.args import add_dense_args, add_finetune_args
from utils.finetune.config import DepthConfig
from utils.finetune.depth import validate_regression_args
from utils.runner import entry_point


def get_args_parser():
    p = create_parser("MultiMAE depth / dense-regression fine-tuning")
    p.add_argument("--batch_size", type=int, default=64, help="batch size per process")
    p.add_argument("--epochs", type=int, default=2000)
    add_bool_arg(p, "tmp", False, "debug run: append '-tmp' to output_dir and prefix the W&B run name with 'tmp-'")
    add_dense_args(p, out_domains="depth", standardize_depth=False, use_mask_valid=True, output_adapter="dpt",
                   decoder_dim=6144, decoder_depth=2, decoder_preds_per_patch=64, decoder_interpolate_mode=OMIT,
                   dataset_name="nyu", amp="none")
    g = p.add_argument_group("dense regression")
    g.add_argument("--loss", type=str, default="berhu", choices=["l1", "berhu", "l2"], help="masked pixel loss")
    g.add_argument("--aug_name", type=str, default="nyu-augs", choices=["nyu-augs", "taskonomy"],
                   help="nyu-augs: NYUv2 crops/flips + depth standardisation; taskonomy: resize + per-task scaling")
    add_bool_arg(g, "color_augs", False, "colour jitter / grayscale in nyu-augs")
    add_bool_arg(g, "freeze_transformer", False, "train only the input adapters and the head")
    g.add_argument("--depth_mean", type=float, default=NYU_MEAN, help="nyu-augs: depth mean (file units)")
    g.add_argument("--depth_std", type=float, default=NYU_STD, help="nyu-augs: depth std (file units)")
    g.add_argument("--depth_metrics", type=str, default="batch", choices=["batch", "pooled"],
                   help="NYU depth metrics: 'batch' = mean of per-batch values (default, the paper's tables); "
                        "'pooled' = per valid pixel over the whole split")
    g.add_argument("--max_train_images", type=int, default=None, help="train on a fixed random subset")
    g.add_argument("--max_test_images", type=int, default=None, help="test on a fixed random subset")
    add_finetune_args(p, input_size=256, max_val_images=100)
    add_optim_args(p, opt_betas=[0.9, 0.999], lr=1e-4, weight_decay=1e-4, layer_decay=0.75, warmup_epochs=100,
                   scale_input_lr=True)
    add_checkpoint_args(p, save_ckpt=True, save_ckpt_freq=200, save_every_steps=OMIT)
    add_runtime_args(p, num_workers=16, amp=OMIT)
    add_dist_args(p)
    add_wandb_args(p, wandb_group="", log_images_wandb=False, log_images_freq=5)
    return p


def apply_tmp(args):
    """``--tmp``: the only output_dir rewrite (``-tmp`` suffix), made only when asked for."""
    if args.tmp:
        args.output_dir = f"{args.output_dir}-tmp" if args.output_dir else ""
        args.wandb_run_name = f"tmp-{args.wandb_run_name}" if args.wandb_run_name else "tmp"
    return args


parse_config, main = entry_point(get_args_parser, DepthConfig, "finetune", "depth", validate=validate_regression_args, prepare=apply_tmp)


if __name__ == "__main__":
    main(parse_config())
