#!/usr/bin/env python
"""Image classification with a MultiViT: fine-tuning (spec 5.5) or linear probing (``--linear_probe``).

    python run_finetuning_cls.py -c cfgs/finetune/cls/synthetic.yaml            # from output/demo (make demo)
    python run_finetuning_cls.py -c cfgs/finetune/cls/synthetic_linprobe.yaml   # linear probe
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=8 run_finetuning_cls.py \
        -c cfgs/finetune/cls/ft_in1k_100e_multimae-b.yaml --finetune multimae-b_..._multivit-afff3f8c.pth \
        --data_path /data/imagenet/train --eval_data_path /data/imagenet/val
    python run_finetuning_cls.py -c <config> --eval --resume <output_dir>/checkpoint-best.pth

Every published argument keeps its name and default; see FINETUNING.md (Classification) for the additions.
"""
import warnings

from utils.config import (OMIT, add_bool_arg, add_checkpoint_args, add_dist_args, add_optim_args,
                          add_runtime_args, add_wandb_args, create_parser, parse_args, save_config)
from utils.finetune.runner import add_finetune_args
from utils.finetune.cls import apply_linprobe_defaults, validate_cls_args


def get_args_parser():
    p = create_parser("MultiMAE image classification fine-tuning / linear probing")
    p.add_argument("--batch_size", type=int, default=128, help="batch size per process")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--update_freq", type=int, default=1, help="gradient accumulation steps")
    add_bool_arg(p, "linear_probe", False, "frozen encoder, BatchNorm + linear head (MAE protocol); switches "
                 "the defaults to batch 512, 90 epochs (10 warm-up), lars, blr 0.1, wd 0, min_lr 0, no "
                 "mixup/cutmix/smoothing/reprob/drop path, RandomResizedCrop + flip only")
    add_finetune_args(p, data_path="data/synthetic/train", eval_data_path="data/synthetic/val",
                      test_data_path=OMIT, test=OMIT, max_val_images=OMIT)
    g = p.add_argument_group("classification model")
    g.add_argument("--encoder_depth", type=int, default=None, help="override the model's number of blocks")
    g.add_argument("--encoder_dim", type=int, default=None, help="override the model's token width")
    g.add_argument("--encoder_num_heads", type=int, default=None, help="override the model's attention heads")
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--attn_drop_rate", type=float, default=0.0)
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth rate")
    add_bool_arg(g, "use_mean_pooling", True, "mean over all tokens (else the last global token)",
                 no_name="no_mean_pooling")
    g.add_argument("--init_scale", type=float, default=0.001, help="scale of the fine-tuning head's initial weights")
    add_bool_arg(g, "disable_eval_during_finetuning", False, "no evaluation after each epoch")
    add_bool_arg(g, "model_ema", False, "keep an exponential moving average of the weights (evaluated too)")
    g.add_argument("--model_ema_decay", type=float, default=0.9999)
    add_bool_arg(g, "model_ema_force_cpu", False, "keep the EMA on the CPU")
    add_optim_args(p, blr=5e-4, lr=None, layer_decay=0.65, min_lr=1e-6, warmup_epochs=5)
    g = p.add_argument_group("augmentation")
    g.add_argument("--color_jitter", type=float, default=0.4, help="colour jitter (used only without --aa)")
    g.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1",
                   help="timm auto-augment policy ('': off, colour jitter instead)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--train_interpolation", type=str, default="bicubic", help="bicubic, bilinear or random")
    g.add_argument("--crop_pct", type=float, default=None,
                   help="eval centre-crop fraction (None: 224/256 below 384 px)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erasing mode")
    g.add_argument("--recount", type=int, default=1, help="random erasing count")
    add_bool_arg(g, "resplit", False, "published, unused")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha (0: off)")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", default=None,
                   help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup_mode", type=str, default="batch", choices=["batch", "pair", "elem"])
    g = p.add_argument_group("classification data")
    g.add_argument("--model_key", type=str, default="model|module", help="published, unused (found automatically)")
    g.add_argument("--model_prefix", type=str, default="", help="published, unused")
    g.add_argument("--nb_classes", type=int, default=1000, help="number of classes of the head")
    add_bool_arg(g, "imagenet_default_mean_and_std", True, "ImageNet mean/std (else 0.5/0.5)")
    g.add_argument("--data_set", type=str, default="IMNET", choices=["CIFAR", "IMNET", "image_folder"])
    add_checkpoint_args(p, save_ckpt=True, save_every_steps=OMIT)
    add_runtime_args(p, amp=OMIT)
    p.add_argument("--amp", type=str, default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision; auto = fp16 on CUDA (published), none on CPU")
    add_dist_args(p, find_unused_params=False)
    add_wandb_args(p, log_images_wandb=False, log_images_freq=10)
    return p


def main(args):
    from utils.checkpoint import resolve_resume
    from utils.dist import destroy_distributed, get_rank, init_distributed_mode, seed_everything, set_deterministic
    from utils.engine.trainer import resolve_amp
    from utils.finetune.runner import build_eval_loader, build_train_loader
    from utils.finetune.cls import (ClsEvalCallback, build_cls_dataset, build_cls_model, build_cls_pictures,
                                    build_cls_trainer, build_model_ema, check_same_classes, evaluate_checkpoint,
                                    freeze_for_linear_probe, load_cls_pretrained)
    from utils.logger import WandbLogger

    if not args.show_user_warnings:
        warnings.filterwarnings("ignore", category=UserWarning)
    device = init_distributed_mode(args)
    seed_everything(args.seed, get_rank())
    set_deterministic(args.deterministic)
    args.amp = resolve_amp(args.amp, device)
    val_ds = build_cls_dataset(args, is_train=False) if args.eval or not args.disable_eval_during_finetuning else None
    model = build_cls_model(args)
    if args.finetune:
        load_cls_pretrained(model, args.finetune, keep_head=not args.linear_probe)
    if args.linear_probe:
        print(f"Linear probe: training only {freeze_for_linear_probe(model)}")
    model.to(device)
    eval_loader = build_eval_loader(val_ds, int(1.5 * args.batch_size), args) if val_ds is not None else None
    if args.eval:
        results = evaluate_checkpoint(args, model, eval_loader, resolve_resume(args))
        destroy_distributed()
        return results

    if args.output_dir and get_rank() == 0:
        save_config(args, args.output_dir)
    train_ds = build_cls_dataset(args, is_train=True)
    check_same_classes(train_ds, val_ds)
    loader = build_train_loader(train_ds, args)
    print(f"Data: {len(train_ds)} train images from {train_ds.root}"
          + (f", {len(val_ds)} eval images from {val_ds.root}" if val_ds is not None else ""))
    wandb = WandbLogger(args) if args.log_wandb else None
    trainer = build_cls_trainer(args, model, loader, device, wandb, build_model_ema(args, model))
    trainer.start_epoch = args.start_epoch
    trainer.resume(resolve_resume(args))
    callbacks = []
    if val_ds is not None:
        callbacks.append(ClsEvalCallback(eval_loader, args.amp, args.eval_freq, args.epochs))
        pictures = build_cls_pictures(args, val_ds, device, wandb)
        callbacks += [pictures] if pictures is not None else []
    print(f"Training epochs {trainer.start_epoch}..{args.epochs - 1} on {device} (amp: {args.amp})")
    record = trainer.fit(loader, callbacks=callbacks)
    if wandb is not None:
        wandb.finish()
    destroy_distributed()
    return record


def cli(argv=None):
    parser = get_args_parser()
    apply_linprobe_defaults(parser, argv)
    return main(parse_args(parser, argv, validate=validate_cls_args))


if __name__ == "__main__":
    cli()
