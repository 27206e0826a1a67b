"""Pseudo-labelling networks and the labelling loop behind tools/pseudo_label.py.

MultiMAE needs only RGB images: depth and semantic segmentation come from networks run over the RGB
folder (a DPT depth model and a Mask2Former COCO-panoptic semseg model made the released
labels). A labeller is an ``nn.Module`` that maps normalised RGB ``(B, 3, S, S)`` to raw outputs
``(B, C, h, w)`` (logits or depth) and turns outputs resized to the original image into labels::

    labeller = build_labeller('torchvision', 'semseg', 'deeplab.pth', arch='deeplabv3_mobilenet_v3_large',
                              num_classes=133)
    raw = labeller(x)                         # (B, K, S, S) logits
    labels = labeller.finish(raw_resized)     # (B, H, W) int64 class ids   (depth: (B, H, W) float)

Kinds (all read LOCAL weights files; nothing is downloaded):
* ``finetuned``   -- a MultiViT fine-tuned by this project for semseg or depth (run_finetuning_{semseg,depth}.py
                     checkpoint; the model is rebuilt from the config stored in it). The self-training route.
* ``torchvision`` -- any ``torchvision.models.segmentation`` architecture (``arch``) with a state dict file.
* ``module``      -- any torch module given by ``class_path`` ('package.module:Class') + ``model_kwargs``
                     and a state dict file, e.g. a DPT depth network; ``output_key`` picks a dict output,
                     ``depth_output='inverse'`` converts disparity-like outputs to depth.

The loop (``label_files``) reads images with a DataLoader, resizes them to the labeller's resolution
(``pad``: keep the aspect ratio and pad, or ``stretch``), runs batched inference, resizes every output
back to its image's size and hands the labels to a thread pool that writes PNGs atomically.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from utils.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMG_EXTENSIONS

__all__ = ["Labeller", "FinetunedMultiViTLabeller", "TorchvisionSegLabeller", "ModuleLabeller", "LABELLERS",
           "build_labeller", "list_images", "shard", "label_path", "RGBFiles", "LabelWriter", "label_files",
           "labels_meta", "label_folder", "TASKS"]

TASKS = ("depth", "semseg")


def _check_weights(path: str | os.PathLike, what: str) -> str:
    if not path:
        raise ValueError(f"{what}: no weights file given (--weights); labellers never download weights")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: weights file '{path}' does not exist (pseudo-labelling never downloads "
                                "weights; pass a local file with --weights)")
    return str(path)


class Labeller(nn.Module):
    """Base class. Attributes: ``task`` ('depth' | 'semseg'), ``input_size`` (h, w) the network runs at,
    ``mean``/``std`` of its RGB normalisation, ``num_classes`` (label ids written are < num_classes; semseg),
    ``depth_unit`` (what one unit of ``finish`` output means; depth)."""

    def __init__(self, task: str, input_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, num_classes: int | None = None, depth_unit: str = ""):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"labeller task must be one of {TASKS}, got '{task}'")
        if task == "semseg" and not num_classes:
            raise ValueError("a semseg labeller needs num_classes")
        self.task = task
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes, self.depth_unit = num_classes, depth_unit

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, S_h, S_w) normalised RGB -> (B, C, h, w) logits (semseg) or depth (C = 1)."""
        raise NotImplementedError

    def finish(self, out: Tensor) -> Tensor:
        """Outputs already resized to the image, (B, C, H, W) -> (B, H, W): class ids (int64) or depth."""
        return out.argmax(1) if self.task == "semseg" else out[:, 0].float()

    def describe(self) -> dict:
        """What produced the labels (stored in meta.json; a resumed run must match it)."""
        return {"kind": type(self).__name__, "task": self.task, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "num_classes": self.num_classes,
                "depth_unit": self.depth_unit or None}


class FinetunedMultiViTLabeller(Labeller):
    """A MultiViT fine-tuned by this project (``run_finetuning_semseg.py`` / ``run_finetuning_depth.py``),
    rebuilt from the config stored in its checkpoint. RGB-only models (in_domains 'rgb'). Semseg: argmax
    over the ``num_classes`` real classes (the void channel is never chosen; with ``seg_reduce_zero_label``
    ids are shifted back by +1 to the label files' numbering). Depth: de-standardised with the fine-tuning
    ``depth_mean``/``depth_std``, i.e. in the units of the depth files it was trained on (NYUv2: mm)."""

    def __init__(self, checkpoint: str, task: str):
        from utils.checkpoint import load_checkpoint, load_model_state
        from utils.config import split_list

        ckpt = load_checkpoint(_check_weights(checkpoint, "finetuned labeller"))
        cfg = ckpt.get("args")
        if not isinstance(cfg, Mapping) or "model" not in ckpt:
            raise ValueError(f"{checkpoint}: not a fine-tuning checkpoint of this project (needs 'model' and the "
                             "'args' config to rebuild the network)")
        args = argparse.Namespace(**cfg)
        if split_list(args.in_domains) != ["rgb"]:
            raise ValueError(f"{checkpoint}: the labeller must read RGB only, but the model's in_domains are "
                             f"'{args.in_domains}'")
        shift, scale, offset, unit = 0, 1.0, 0.0, ""
        if task == "semseg":
            from utils.finetune.semseg import build_semseg_model

            net, n_cls = build_semseg_model(args), args.num_classes
            shift = 1 if getattr(args, "seg_reduce_zero_label", False) else 0
        else:
            from utils.finetune.depth import build_regression_model

            if "depth" not in split_list(args.out_domains):
                raise ValueError(f"{checkpoint}: a depth labeller must predict 'depth', the model predicts "
                                 f"'{args.out_domains}'")
            net, n_cls = build_regression_model(args), None
            if getattr(args, "aug_name", "nyu-augs") == "nyu-augs":
                scale, offset = float(args.depth_std), float(args.depth_mean)
                unit = f"depth-file units of the fine-tuning data (depth_mean {args.depth_mean}, std {args.depth_std})"
            else:
                unit = "Taskonomy-scaled depth (model output)"
        super().__init__(task, args.input_size, num_classes=n_cls + shift if n_cls else None, depth_unit=unit)
        self.shift, self.scale, self.offset = shift, scale, offset
        load_model_state(net, ckpt["model"], strict=True, source=checkpoint)
        self.net, self.n_real = net, n_cls
        self.return_all_layers = getattr(args, "output_adapter", "") == "dpt"
        self.source = str(checkpoint)

    def forward(self, x: Tensor) -> Tensor:
        return self.net({"rgb": x}, return_all_layers=self.return_all_layers)[self.task]

    def finish(self, out: Tensor) -> Tensor:
        if self.task == "semseg":
            return out[:, :self.n_real].argmax(1) + self.shift
        return out[:, 0].float() * self.scale + self.offset

    def describe(self) -> dict:
        return {**super().describe(), "weights": os.path.abspath(self.source)}


class TorchvisionSegLabeller(Labeller):
    """``torchvision.models.segmentation.<arch>(weights=None, weights_backbone=None, num_classes=K)`` with the
    state dict of ``weights`` (aux classifier kept if the file has one). Output ``['out']`` logits."""

    def __init__(self, arch: str, weights: str, num_classes: int, input_size: int | Sequence[int] = 520,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD):
        import torchvision.models.segmentation as seg

        from utils.weights import load_weights_file

        names = sorted(n for n in dir(seg) if n.islower() and not n.startswith("_") and callable(getattr(seg, n))
                       and n not in ("get_weight",))
        if arch not in names:
            raise ValueError(f"unknown torchvision segmentation architecture '{arch}'; choose from {names}")
        super().__init__("semseg", input_size, mean, std, num_classes=num_classes)
        sd = load_weights_file(_check_weights(weights, f"torchvision labeller '{arch}'"))
        aux = any(k.startswith("aux_classifier.") for k in sd)
        self.net = getattr(seg, arch)(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux)
        self.net.load_state_dict(sd, strict=True)
        self.arch, self.source = arch, weights

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)["out"]

    def describe(self) -> dict:
        return {**super().describe(), "arch": self.arch, "weights": os.path.abspath(self.source)}


def _import_class(class_path: str) -> type:
    module, sep, name = class_path.partition(":")
    if not sep:
        module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"cannot import labeller class '{class_path}' (expected 'package.module:Class'): {e}") from e


class ModuleLabeller(Labeller):
    """Any ``nn.Module`` (``class_path`` + ``model_kwargs``) with a state dict file, e.g. a DPT depth network.
    ``output_key`` selects from a dict output; a (B, H, W) output gets a channel axis. Depth outputs are
    multiplied by ``output_scale`` and, with ``depth_output='inverse'``, inverted (1 / x, for disparity)."""

    def __init__(self, class_path: str, weights: str, task: str, model_kwargs: Mapping[str, Any] | None = None,
                 input_size: int | Sequence[int] = 384, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), num_classes: int | None = None,
                 output_key: str | None = None, output_scale: float = 1.0, depth_output: str = "depth",
                 depth_unit: str = "model output"):
        if depth_output not in ("depth", "inverse"):
            raise ValueError(f"depth_output must be 'depth' or 'inverse', got '{depth_output}'")
        super().__init__(task, input_size, mean, std, num_classes=num_classes, depth_unit=depth_unit)
        from utils.weights import load_weights_file

        sd = load_weights_file(_check_weights(weights, f"labeller '{class_path}'"))
        self.net = _import_class(class_path)(**dict(model_kwargs or {}))
        self.net.load_state_dict(sd, strict=True)
        self.class_path, self.source, self.output_key = class_path, weights, output_key
        self.output_scale, self.depth_output = float(output_scale), depth_output

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        if isinstance(out, Mapping):
            if self.output_key not in out:
                raise KeyError(f"labeller output is a dict with keys {list(out)}; set output_key to one of them")
            out = out[self.output_key]
        return out.unsqueeze(1) if out.dim() == 3 else out

    def finish(self, out: Tensor) -> Tensor:
        if self.task == "semseg":
            return out.argmax(1)
        d = out[:, 0].float() * self.output_scale
        return 1.0 / d.clamp_min(1e-6) if self.depth_output == "inverse" else d

    def describe(self) -> dict:
        return {**super().describe(), "class_path": self.class_path, "weights": os.path.abspath(self.source),
                "output_scale": self.output_scale, "depth_output": self.depth_output}


LABELLERS: dict[str, Callable[..., Labeller]] = {
    "finetuned": lambda task, weights, **kw: FinetunedMultiViTLabeller(weights, task),
    "torchvision": lambda task, weights, **kw: TorchvisionSegLabeller(weights=weights, **kw),
    "module": lambda task, weights, **kw: ModuleLabeller(weights=weights, task=task, **kw),
}


def build_labeller(kind: str, task: str, weights: str, **kwargs: Any) -> Labeller:
    """``LABELLERS[kind](task, weights, **kwargs)``; None-valued kwargs keep the labeller's defaults."""
    if kind not in LABELLERS:
        raise ValueError(f"unknown labeller '{kind}'; expected one of {sorted(LABELLERS)}")
    if kind == "torchvision" and task != "semseg":
        raise ValueError("torchvision labellers are segmentation models: use --task semseg")
    labeller = LABELLERS[kind](task, weights, **{k: v for k, v in kwargs.items() if v is not None})
    if labeller.task != task:
        raise ValueError(f"the '{kind}' labeller predicts {labeller.task}, not {task}")
    return labeller.eval()


# ------------------------------------------------------------------------------------------- files
def list_images(folder: str) -> list[str]:
    """Sorted relative paths (with '/') of the images under `folder`; hidden files and folders skipped."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    out = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, folder)
        for n in names:
            if not n.startswith(".") and n.lower().endswith(IMG_EXTENSIONS):
                out.append(n if rel_root == "." else f"{rel_root.replace(os.sep, '/')}/{n}")
    return sorted(out)


def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """Items `rank, rank + world_size, ...`: every item in exactly one shard, independent of what is on disk
    (so processes that look at the output folder at different moments still agree)."""
    return list(items[rank::world_size])


def label_path(out_root: str, rel: str) -> str:
    """`out_root/<rel without extension>.png` (labels are PNG whatever the RGB format)."""
    return os.path.join(out_root, os.path.splitext(rel)[0] + ".png")


class RGBFiles(Dataset):
    """Images resized to the labeller's `size` (h, w): 'pad' keeps the aspect ratio (top-left aligned,
    padded with the mean colour, i.e. zeros after normalisation), 'stretch' resizes to exactly `size`.
    Items: (uint8 (3, h, w), int64 [H, W, content_h, content_w], index); an unreadable file gives sizes
    [0, 0, 0, 0] (reported and skipped by `label_files` instead of stopping a long run)."""

    def __init__(self, root: str, rel_paths: Sequence[str], size: Sequence[int], mean: Sequence[float],
                 resize_mode: str = "pad"):
        if resize_mode not in ("pad", "stretch"):
            raise ValueError(f"resize_mode must be 'pad' or 'stretch', got '{resize_mode}'")
        self.root, self.rel, self.size, self.mode = root, list(rel_paths), tuple(size), resize_mode
        self.fill = [int(round(m * 255)) for m in mean]

    def __len__(self) -> int:
        return len(self.rel)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        from utils.data.datasets import ImageDecodeError, decode_file

        sh, sw = self.size
        try:
            img = decode_file(os.path.join(self.root, self.rel[i]), "rgb")
        except ImageDecodeError:
            return torch.zeros(3, sh, sw, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), i
        H, W = img.shape[-2:]
        if self.mode == "stretch":
            ch, cw = sh, sw
        else:
            s = min(sh / H, sw / W)
            ch, cw = min(sh, max(1, round(H * s))), min(sw, max(1, round(W * s)))
        img = TF.resize(img, [ch, cw], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if (ch, cw) != (sh, sw):
            canvas = torch.tensor(self.fill, dtype=torch.uint8).view(3, 1, 1).expand(3, sh, sw).clone()
            canvas[:, :ch, :cw] = img
            img = canvas
        return img, torch.tensor([H, W, ch, cw]), i


class LabelWriter:
    """Encodes labels and writes PNGs atomically from a thread pool (PNG compression releases the GIL).

    semseg: class ids -> 8-bit PNG (16-bit when num_classes > 255). depth: round(depth * depth_scale)
    clipped to 0..65535 -> 16-bit PNG (0 = no depth); saturated pixels are counted (a wrong scale shows).
    """

    def __init__(self, task: str, num_classes: int | None = None, depth_scale: float = 1.0, num_threads: int = 4):
        from utils.io import label_dtype

        self.task, self.depth_scale = task, float(depth_scale)
        self.dtype = label_dtype(num_classes or 0) if task == "semseg" else np.dtype(np.uint16)
        self.pool = ThreadPoolExecutor(max(1, num_threads))
        self.pending: deque[Future] = deque()
        self.max_pending = 8 * max(1, num_threads)
        self.pixels = self.saturated = 0

    def encode(self, label: Tensor) -> np.ndarray:
        """(H, W) class ids or depth (any device) -> uint8/uint16 numpy array."""
        if self.task == "semseg":
            return label.to(torch.int32).clamp_(0, np.iinfo(self.dtype).max).cpu().numpy().astype(self.dtype)
        v = torch.nan_to_num(label.float() * self.depth_scale, nan=0.0, posinf=65535.0, neginf=0.0).round_()
        self.pixels += v.numel()
        self.saturated += int((v > 65535).sum())
        return v.clamp_(0, 65535).to(torch.int32).cpu().numpy().astype(np.uint16)

    def submit(self, path: str, array: np.ndarray) -> None:
        from utils.io import save_png

        while len(self.pending) >= self.max_pending:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(save_png, path, array))

    def close(self) -> None:
        """Wait for every write (re-raising the first error) and stop the threads."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True)


def _eta(done: int, total: int, seconds: float) -> str:
    rate = done / max(seconds, 1e-9)
    left = (total - done) / rate if rate > 0 else math.inf
    eta = timedelta(seconds=round(left)) if math.isfinite(left) else "?"
    return f"{done}/{total} images  {rate:.1f} img/s  ETA {eta}"


@torch.inference_mode()
def label_files(labeller: Labeller, dataset: RGBFiles, out_paths: Sequence[str], writer: LabelWriter,
                device: torch.device, amp: str = "none", batch_size: int = 16, num_workers: int = 4,
                print_freq: int = 10, log: Callable[[str], None] = print) -> dict[str, float]:
    """Label every image of `dataset` into `out_paths[i]`.

    Returns {'images' (labelled), 'seconds', 'saturated' (fraction of depth pixels clipped at 65535),
    'unreadable' (relative paths of files that could not be decoded; no label is written for them)}."""
    from utils.engine.trainer import autocast

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    mean = torch.tensor(labeller.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(labeller.std, device=device).view(1, 3, 1, 1)
    sh, sw = labeller.input_size
    start, done, unreadable = time.perf_counter(), 0, []
    try:
        for step, (imgs, sizes, index) in enumerate(loader):
            x = (imgs.to(device, non_blocking=True).float().div_(255) - mean) / std
            with autocast(device, amp):
                raw = labeller(x)
            raw = raw.float()
            oh, ow = raw.shape[-2:]
            for b, (H, W, ch, cw) in enumerate(sizes.tolist()):
                if H == 0:
                    unreadable.append(dataset.rel[int(index[b])])
                    log(f"cannot read {os.path.join(dataset.root, unreadable[-1])}; skipped")
                    continue
                crop = raw[b:b + 1, :, :max(1, round(ch * oh / sh)), :max(1, round(cw * ow / sw))]
                full = F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)
                writer.submit(out_paths[int(index[b])], writer.encode(labeller.finish(full)[0]))
            done += len(index)
            if print_freq and ((step + 1) % print_freq == 0 or done == len(dataset)):
                log(_eta(done, len(dataset), time.perf_counter() - start))
    finally:
        writer.close()
    return {"images": done - len(unreadable), "seconds": time.perf_counter() - start,
            "saturated": writer.saturated / max(writer.pixels, 1), "unreadable": unreadable}


# ------------------------------------------------------------------------------------------- a whole folder
def labels_meta(labeller: Labeller, out_domain: str, in_domain: str, depth_scale: float, resize_mode: str) -> dict:
    """The meta.json written beside the labels: how to read them and what made them."""
    from utils.io import label_dtype

    meta: dict[str, Any] = {"modality": out_domain, "task": labeller.task, "source_modality": in_domain,
                            "resize_mode": resize_mode, "labeller": labeller.describe()}
    if labeller.task == "depth":
        meta.update(format="16-bit PNG", depth_scale=float(depth_scale), depth_unit=labeller.depth_unit,
                    decode=f"depth [{labeller.depth_unit}] = png_value / {float(depth_scale)}; 0 = no depth")
    else:
        meta.update(format=f"{8 * label_dtype(labeller.num_classes).itemsize}-bit PNG of class ids",
                    num_classes=labeller.num_classes)
    return json.loads(json.dumps(meta))  # plain JSON types, comparable with a file read back


def _prepare_output(out_root: str, meta: dict, overwrite: bool, rank: int) -> None:
    """Refuse to mix labellers in one folder; rank 0 removes temporary files of a killed run and writes
    meta.json. Every rank checks, so a refusal stops all of them (no rank waits at a barrier alone)."""
    from utils.dist import barrier
    from utils.io import load_json, save_json

    path = os.path.join(out_root, "meta.json")
    if os.path.isfile(path) and not overwrite:
        old = load_json(path)
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"'{path}' describes labels made differently (differs in {diff}); refusing to mix "
                             "them. Use another --out_domain / --output_path, or --overwrite to relabel everything")
    if rank == 0:
        for root, _, names in os.walk(out_root):
            for n in names:
                if n.startswith(".") and n.endswith(".tmp"):  # utils.io.atomic_write temporaries
                    os.remove(os.path.join(root, n))
    barrier()
    if rank == 0:
        save_json(path, meta)
    barrier()


def label_folder(labeller: Labeller, data_path: str, in_domain: str, out_root: str, device: torch.device, *,
                 rank: int = 0, world_size: int = 1, out_domain: str | None = None, depth_scale: float = 1.0,
                 resize_mode: str = "pad", overwrite: bool = False, max_images: int | None = None,
                 batch_size: int = 16, num_workers: int = 4, num_writers: int = 4, amp: str = "none",
                 print_freq: int = 20) -> dict[str, int]:
    """Label `data_path/in_domain/**` into `out_root/**` (this process's shard, skipping finished files).

    Returns {'total', 'shard', 'skipped', 'labelled'} for this process plus 'labelled_all' / 'skipped_all'
    summed over the processes.
    """
    from utils.dist import all_reduce_sum

    in_root = os.path.join(data_path, in_domain)
    rel = list_images(in_root)[:max_images]
    meta = labels_meta(labeller, out_domain or os.path.basename(os.path.normpath(out_root)), in_domain,
                       depth_scale, resize_mode)
    _prepare_output(out_root, meta, overwrite, rank)
    mine = shard(rel, rank, world_size)
    todo = [r for r in mine if overwrite or not os.path.exists(label_path(out_root, r))]
    tag = f"[rank {rank}/{world_size}] " if world_size > 1 else ""
    _print(f"{tag}{len(rel)} images in {in_root}; {len(mine)} for this process, {len(mine) - len(todo)} already "
           f"labelled, {len(todo)} to label -> {out_root}")
    stats: dict[str, Any] = {"images": 0, "seconds": 0.0, "saturated": 0.0, "unreadable": []}
    if todo:
        dataset = RGBFiles(in_root, todo, labeller.input_size, labeller.mean, resize_mode)
        writer = LabelWriter(labeller.task, labeller.num_classes, depth_scale, num_writers)
        stats = label_files(labeller, dataset, [label_path(out_root, r) for r in todo], writer, device, amp,
                            batch_size, num_workers, print_freq, log=lambda s: _print(tag + s))
    if stats["saturated"] > 0.001:
        _print(f"{tag}warning: {100 * stats['saturated']:.2f}% of depth pixels exceed 65535 after scaling by "
               f"{depth_scale}; lower --depth_scale")
    bad = stats["unreadable"]
    counts = torch.tensor([stats["images"], len(mine) - len(todo), len(bad)], dtype=torch.int64)
    total = all_reduce_sum(counts).tolist()
    print(f"done: labelled {total[0]} images, {total[1]} already labelled, over {world_size} process(es); "
          f"labels and meta.json in {out_root}" + (f"; {total[2]} unreadable images skipped" if total[2] else ""))
    return {"total": len(rel), "shard": len(mine), "skipped": len(mine) - len(todo), "labelled": stats["images"],
            "unreadable": bad, "labelled_all": total[0], "skipped_all": total[1], "seconds": stats["seconds"]}


def _print(msg: str) -> None:
    """Printed by every rank (utils.dist silences plain prints of ranks > 0)."""
    from utils.dist import is_dist_avail_and_initialized

    if is_dist_avail_and_initialized():
        print(msg, force=True)
    else:
        print(msg)
