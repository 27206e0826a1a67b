#!/usr/bin/env python
"""Pseudo-label an RGB folder with depth or semantic segmentation, so it becomes a pre-training dataset.

    python tools/pseudo_label.py -c cfgs/pseudo_label/depth_finetuned.yaml --data_path data/unlabelled/train \
        --weights output/finetune/depth/synthetic/checkpoint-best.pth
    OMP_NUM_THREADS=4 torchrun --nproc_per_node=8 tools/pseudo_label.py -c cfgs/pseudo_label/semseg_torchvision.yaml \
        --data_path /data/imagenet/train --weights deeplabv3_coco.pth --num_classes 133

Reads `data_path/<in_domain>/**/<name>.<ext>` and writes `output_path/<out_domain>/**/<name>.png` (same
relative paths; output_path defaults to data_path, so the labels become sibling modality folders):
depth as 16-bit PNG (value = round(depth * depth_scale); the scale and unit are recorded in
`<out_domain>/meta.json`), semseg as 8-bit PNG of class ids (16-bit with more than 255 classes).
Labellers and their options: tools/lib/pseudo_labelers.py. Weights are local files; nothing is downloaded.

Files are split over the processes by position in the sorted list (file i -> rank i % world_size), each
process skips files that already have a label (resumable: rerun the same command after an interruption),
every PNG is written to a temporary name and renamed (a label file is always complete), and progress is
printed with images/s and ETA. `--overwrite` relabels everything (each file still replaced atomically).
meta.json pins the labeller: resuming with a different labeller or scale is refused unless --overwrite.
"""
import json
import os
import sys


from utils.config import add_bool_arg, add_dist_args, create_parser, parse_args
from tools.lib.pseudo_labelers import LABELLERS, TASKS


def get_args_parser():
    p = create_parser("Pseudo-label an RGB folder (depth / semseg)")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", type=str, default="", help="split root holding <in_domain>/ (e.g. data/x/train)")
    g.add_argument("--in_domain", type=str, default="rgb", help="input image folder name")
    g.add_argument("--output_path", type=str, default="", help="root for <out_domain>/ (default: data_path)")
    g.add_argument("--task", type=str, default="depth", choices=list(TASKS))
    g.add_argument("--out_domain", type=str, default=None, help="output folder name (default: the task)")
    g.add_argument("--max_images", type=int, default=None, help="only the first N files (sorted)")
    add_bool_arg(g, "overwrite", False, "relabel files that already have a label")
    g = p.add_argument_group("labeller")
    g.add_argument("--labeller", type=str, default="finetuned", choices=sorted(LABELLERS))
    g.add_argument("--weights", type=str, default="", help="local weights / fine-tuning checkpoint file")
    g.add_argument("--arch", type=str, default=None, help="torchvision: segmentation architecture name")
    g.add_argument("--class_path", type=str, default=None, help="module: 'package.module:Class'")
    g.add_argument("--model_kwargs", type=str, default="{}", help="module: constructor arguments as JSON")
    g.add_argument("--output_key", type=str, default=None, help="module: key of a dict output")
    g.add_argument("--num_classes", type=int, default=None, help="torchvision/module semseg: classes")
    g.add_argument("--input_size", type=int, nargs="+", default=None, help="labeller resolution (S or H W)")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="RGB normalisation mean")
    g.add_argument("--std", type=float, nargs=3, default=None, help="RGB normalisation std")
    g.add_argument("--output_scale", type=float, default=None, help="module depth: output multiplier")
    g.add_argument("--depth_output", type=str, default=None, choices=["depth", "inverse"], help="module depth")
    g.add_argument("--depth_unit", type=str, default=None, help="module depth: unit of the output (for meta.json)")
    g.add_argument("--resize_mode", type=str, default="pad", choices=["pad", "stretch"],
                   help="pad: keep aspect ratio; stretch: resize to the square input")
    g.add_argument("--depth_scale", type=float, default=1.0, help="PNG value per unit of labeller depth")
    g = p.add_argument_group("runtime")
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--num_workers", type=int, default=4, help="image decoding processes")
    g.add_argument("--num_writers", type=int, default=4, help="PNG encoding threads")
    g.add_argument("--device", type=str, default="cuda")
    g.add_argument("--amp", type=str, default="none", choices=["none", "bf16", "fp16"])
    g.add_argument("--print_freq", type=int, default=20, help="progress line every N batches")
    add_dist_args(p)
    return p


def validate(args) -> list:
    errors = []
    if not args.data_path or not os.path.isdir(os.path.join(args.data_path, args.in_domain)):
        errors.append(f"--data_path '{args.data_path}' must contain the input folder '{args.in_domain}/'")
    if not args.weights:
        errors.append("--weights: a local weights file is required (labellers never download)")
    try:
        json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        errors.append(f"--model_kwargs is not valid JSON: {e}")
    if args.input_size is not None and len(args.input_size) not in (1, 2):
        errors.append(f"--input_size takes S or H W, got {args.input_size}")
    if args.labeller == "module" and not args.class_path:
        errors.append("--labeller module needs --class_path 'package.module:Class'")
    if args.labeller == "torchvision" and not (args.arch and args.num_classes):
        errors.append("--labeller torchvision needs --arch and --num_classes")
    return errors


def labeller_kwargs(args) -> dict:
    kw = {"input_size": args.input_size[0] if args.input_size and len(args.input_size) == 1 else args.input_size,
          "mean": args.mean, "std": args.std, "num_classes": args.num_classes}
    if args.labeller == "torchvision":
        kw["arch"] = args.arch
    if args.labeller == "module":
        kw.update(class_path=args.class_path, model_kwargs=json.loads(args.model_kwargs), output_key=args.output_key,
                  output_scale=args.output_scale, depth_output=args.depth_output, depth_unit=args.depth_unit)
    return kw if args.labeller != "finetuned" else {}


def main(args) -> dict:
    from utils.dist import destroy_distributed, get_rank, get_world_size, init_distributed
    from tools.lib.pseudo_labelers import build_labeller, label_folder

    device = init_distributed(args, args.device).device
    try:
        labeller = build_labeller(args.labeller, args.task, args.weights, **labeller_kwargs(args)).to(device)
        out_domain = args.out_domain or args.task
        return label_folder(labeller, args.data_path, args.in_domain,
                            os.path.join(args.output_path or args.data_path, out_domain), device,
                            rank=get_rank(), world_size=get_world_size(), out_domain=out_domain,
                            depth_scale=args.depth_scale, resize_mode=args.resize_mode, overwrite=args.overwrite,
                            max_images=args.max_images, batch_size=args.batch_size, num_workers=args.num_workers,
                            num_writers=args.num_writers, amp=args.amp, print_freq=args.print_freq)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(parse_args(get_args_parser(), validate=validate))
