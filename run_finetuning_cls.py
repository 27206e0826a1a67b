#!/usr/bin/env python
"""Image classification with a MultiViT: fine-tuning or linear probing (``--linear_probe``).

    python run_finetuning_cls.py -c cfgs/finetune/cls/synthetic.yaml            # from output/demo (make demo)
    python run_finetuning_cls.py -c cfgs/finetune/cls/synthetic_linprobe.yaml   # linear probe
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=8 run_finetuning_cls.py \
        -c cfgs/finetune/cls/ft_in1k_100e_multimae-b.yaml --finetune multimae-b_..._multivit-afff3f8c.pth \
        --data_path /data/imagenet/train --eval_data_path /data/imagenet/val
    python run_finetuning_cls.py -c <config> --eval --resume <output_dir>/checkpoint-best.pth

Every published argument keeps its name and default; see FINETUNING.md (Classification) for the additions.
"""
from utils.config import create_parser, parse_args
from utils.finetune.args import add_cls_args
from utils.finetune.cls import apply_linprobe_defaults, validate_cls_args
from utils.finetune.config import ClsConfig
from utils.jobs import get_job
from utils.runner import run


def get_args_parser():
    p = create_parser("MultiMAE image classification fine-tuning / linear probing")
    p.add_argument("--batch_size", type=int, default=128, help="batch size per process")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation steps")
    add_cls_args(p)
    return p


def parse_config(argv=None, exit_on_error=True) -> ClsConfig:
    """Command line + YAML (``--linear_probe`` switching the defaults first), frozen and validated."""
    parser = get_args_parser()
    apply_linprobe_defaults(parser, argv)
    return parse_args(parser, argv, validate=validate_cls_args, config_class=ClsConfig, exit_on_error=exit_on_error)


def main(cfg: ClsConfig):
    return run(cfg, get_job("finetune", "cls"))


def cli(argv=None):
    return main(parse_config(argv))


if __name__ == "__main__":
    cli()
