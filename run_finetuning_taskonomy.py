#!/usr/bin/env python
"""Taskonomy fine-tuning of a (Multi)MAE encoder in the published data layout: one ``--data_path`` with a
folder per task (``<task>/<building>/point_<p>_view_<v>_domain_<task>.png``) and the split files
``tiny_{train,val,test}.csv`` (columns building, point, view) in ``--split_dir`` (default: the data root).
Takes the published configs in cfgs/finetune/taskonomy/ unchanged:

    python run_finetuning_taskonomy.py -c cfgs/finetune/taskonomy/rgb2normal-1k/ft_rgb2normal_multimae-b.yaml \\
        --finetune multimae-b.pth --data_path /data/taskonomy --split_dir /data/taskonomy/splits
    python tools/make_synthetic_dataset.py --layout taskonomy --output_dir data/synthetic_taskonomy  # no real data

Defaults are the published script's (masked L1, weight decay 0.05, fp16 on CUDA, a checkpoint every 20
epochs, the best checkpoint tested on the test split). run_finetuning_depth.py trains the same targets on the
multi-modal folder layout (``--aug_name taskonomy``).
"""
from utils.config import (OMIT, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args, add_runtime_args,
                          add_wandb_args, create_parser)
from utils.finetune.args import add_dense_args, add_finetune_args
from utils.finetune.config import TaskonomyConfig
from utils.finetune.taskonomy import validate_taskonomy_args
from utils.runner import entry_point


def get_args_parser():
    p = create_parser("MultiMAE Taskonomy fine-tuning (published data layout)")
    p.add_argument("--batch_size", type=int, default=32, help="batch size per process")
    p.add_argument("--epochs", type=int, default=100)
    add_dense_args(p, out_domains="normal", standardize_depth=True, use_mask_valid=True, drop_path_encoder=0.1,
                   output_adapter="dpt", decoder_dim=768, decoder_depth=2, decoder_preds_per_patch=OMIT,
                   decoder_interpolate_mode=OMIT, dataset_name="taskonomy", amp="auto")
    g = p.add_argument_group("Taskonomy")
    g.add_argument("--data_path", type=str, default="", help="Taskonomy root: one folder per task")
    g.add_argument("--split_dir", type=str, default=None,
                   help="folder of tiny_{train,val,test}.csv (columns building, point, view); default: data_path")
    g.add_argument("--loss", type=str, default="l1", choices=["l1", "berhu", "l2"], help="masked pixel loss")
    g.add_argument("--aug_name", type=str, default="taskonomy", choices=["taskonomy"],
                   help="resize + the Taskonomy per-task scaling (no augmentation)")
    add_bool_arg(g, "freeze_transformer", False, "train only the input adapters and the heads")
    g.add_argument("--max_train_images", type=int, default=1000, help="first N rows of the train split")
    g.add_argument("--max_test_images", type=int, default=54514, help="first N rows of the test split")
    add_finetune_args(p, input_size=384, max_val_images=100, data_path=OMIT, eval_data_path=OMIT,
                      test_data_path=OMIT)
    add_optim_args(p, opt_betas=[0.9, 0.999], lr=3e-4, weight_decay=0.05, layer_decay=0.75, warmup_epochs=1,
                   scale_input_lr=True)
    add_checkpoint_args(p, save_ckpt=True, save_ckpt_freq=20, save_every_steps=OMIT)
    add_runtime_args(p, num_workers=16, amp=OMIT)
    add_dist_args(p, find_unused_params=True)
    add_wandb_args(p, wandb_group="", log_images_wandb=False, log_images_freq=5)
    return p


parse_config, main = entry_point(get_args_parser, TaskonomyConfig, "finetune", "taskonomy", validate=validate_taskonomy_args)


if __name__ == "__main__":
    main(parse_config())
