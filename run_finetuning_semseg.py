#!/usr/bin/env python
"""Semantic-segmentation fine-tuning of a (Multi)MAE encoder: ADE20K, Hypersim, NYUv2 or any folder data
set; RGB, depth, RGB-D or pseudo-labelled semseg inputs; ConvNeXt (default), DPT or Segmenter head.

    python run_finetuning_semseg.py -c cfgs/finetune/semseg/synthetic_rgb.yaml
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 run_finetuning_semseg.py \\
        -c cfgs/finetune/semseg/ade/ft_ade_64e_multimae-b_rgb.yaml --finetune multimae-b.pth \\
        --data_path /data/ade20k/train --eval_data_path /data/ade20k/val

Every published argument keeps its name and default; see FINETUNING.md for the fixes and additions.
"""
from utils.config import (OMIT, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args, add_runtime_args,
                          add_wandb_args, create_parser)
from utils.finetune.args import add_dense_args, add_finetune_args
from utils.finetune.config import SemSegConfig
from utils.finetune.semseg import validate_semseg_args
from utils.runner import entry_point


def get_args_parser():
    p = create_parser("MultiMAE semantic-segmentation fine-tuning")
    p.add_argument("--batch_size", type=int, default=4, help="batch size per process")
    p.add_argument("--epochs", type=int, default=64)
    add_dense_args(p, load_pseudo_depth=False, learnable_pos_emb=False, fp16=True, drop_path_encoder=0.1)
    g = p.add_argument_group("semantic segmentation")
    g.add_argument("--num_classes", type=int, default=150, help="classes of the ground truth (without void)")
    g.add_argument("--aug_name", type=str, default="simple", help="augmentation ('simple' only)")
    add_bool_arg(g, "seg_reduce_zero_label", False, "label 0 is 'unlabelled': ignore it and shift 1..K to 0..K-1")
    add_bool_arg(g, "seg_use_void_label", False, "train padded pixels as an extra void class")
    add_bool_arg(g, "depth_stats_valid_only", False, "with --use_mask_valid: leave invalid depth pixels out of the "
                 "standardisation statistics too (default: only padding is left out)")
    g.add_argument("--max_train_images", type=int, default=None, help="train on a fixed random subset (new)")
    add_finetune_args(p, input_size=512)
    add_optim_args(p, opt_betas=[0.9, 0.999], lr=1e-4, weight_decay=0.05, layer_decay=0.75, warmup_epochs=1,
                   no_lr_scale_list="")
    add_checkpoint_args(p, save_ckpt=True, save_every_steps=OMIT)
    add_runtime_args(p, num_workers=16, amp=OMIT)
    add_dist_args(p)
    add_wandb_args(p, log_images_wandb=False, log_images_freq=5)
    return p


parse_config, main = entry_point(get_args_parser, SemSegConfig, "finetune", "semseg", validate=validate_semseg_args)


if __name__ == "__main__":
    main(parse_config())
