"""Pre-training pieces used by ``run_pretraining_multimae.py``: model/data/optimizer construction from the
modality registry, the masked multi-task step function and the reconstruction-picture callback.

The loop itself is the shared :class:`utils.engine.trainer.Trainer`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils.config import args_to_dict, split_list
from utils.data.datasets import MultiModalImageFolder
from utils.data.depth import robust_standardize
from utils.dist import get_rank, get_world_size, is_main_process
from utils.engine.trainer import Trainer, unwrap_model
from utils.data.modalities import (build_input_adapters, build_pretrain_losses, build_pretrain_output_adapters,
                              get_modality, ordered_domains, parse_domains)
from utils.engine.optim import create_optimizer, cosine_scheduler, pretrain_param_groups, weight_decay_scheduler
from utils.pretrain.task_balancing import build_task_balancer
from utils.data.transforms import PretrainTransform

__all__ = ["PretrainStep", "PerSampleSeed", "ReconstructionVis", "validate_pretrain_args", "build_pretrain_model",
           "build_pretrain_loader", "build_pretrain_trainer", "vis_dataset_root"]


class PretrainStep:
    """The masked multi-modal step: ``step(model, (x, label)) -> (loss, logs)``.

    ``x`` holds every domain at full resolution (semseg at 1/4): the inputs are ``in_domains``, the
    targets every output (``norm_rgb`` is scored against ``rgb`` with the rgb mask). Depth is standardised
    per image on the device first when ``standardize_depth`` (it is then input and target). Losses are
    computed on ``pred.float()`` with the token masks (no mask when ``loss_on_unmasked`` or when the task
    is not an input), weighted by the task balancer and summed; the logged ``loss`` is the unweighted sum,
    as published.
    """

    def __init__(self, in_domains: Sequence[str], losses: dict[str, nn.Module], balancer: nn.Module,
                 num_encoded_tokens: int, alphas: float = 1.0, sample_tasks_uniformly: bool = False,
                 fp32_output_adapters: Sequence[str] = (), standardize_depth: bool = False,
                 loss_on_unmasked: bool = False, log_weighted: bool = False):
        self.in_domains, self.losses, self.balancer = list(in_domains), losses, balancer
        self.num_encoded_tokens, self.alphas = num_encoded_tokens, alphas
        self.sample_tasks_uniformly = sample_tasks_uniformly
        self.fp32_output_adapters = list(fp32_output_adapters)
        self.standardize_depth, self.loss_on_unmasked = standardize_depth, loss_on_unmasked
        self.log_weighted = log_weighted

    def prepare(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        """Device-side input processing (robust depth standardisation)."""
        if self.standardize_depth and "depth" in x:
            x = {**x, "depth": robust_standardize(x["depth"])}
        return x

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.prepare(batch[0] if isinstance(batch, (tuple, list)) else batch)
        inputs = {d: x[d] for d in self.in_domains}
        preds, masks = model(inputs, num_encoded_tokens=self.num_encoded_tokens, alphas=self.alphas,
                             sample_tasks_uniformly=self.sample_tasks_uniformly,
                             fp32_output_adapters=self.fp32_output_adapters)
        task_losses = {}
        for task, criterion in self.losses.items():
            source = "rgb" if task == "norm_rgb" else task
            mask = None if self.loss_on_unmasked else masks.get(source)
            task_losses[task] = criterion(preds[task].float(), x[source], mask=mask)
        weighted = self.balancer(task_losses)
        loss = sum(weighted.values())
        logs = {"loss": sum(v.detach() for v in task_losses.values())}
        logs.update({f"{t}_loss": v.detach() for t, v in task_losses.items()})
        if self.log_weighted:
            logs.update({f"{t}_loss_weighted": v.detach() for t, v in weighted.items()})
        return loss, logs


class PerSampleSeed(Dataset):
    """Dataset wrapper: the random augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e,
    i)``, not on the process, the worker or what was drawn before. Runs with any number of data-loader
    workers or processes therefore see the same crops and flips (the per-process RNG of the published code
    does not), and the training RNG stream is left untouched. Call :meth:`set_epoch` every epoch."""

    seeded_per_sample = True  # tells the Trainer that a mid-epoch resume may skip batches without loading them

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # Only the CPU generator is seeded: the transforms draw from it alone (a data-loader worker has no
        # CUDA RNG to seed). torch.manual_seed would also (lazily) reseed the CUDA generators, which
        # fork_rng(devices=[]) does not restore, so with 0 workers on a GPU it would clobber the training
        # process's CUDA stream; its lazy-seeding bookkeeping also records a stack trace per call
        # (~0.36 ms/sample on CPU). The CPU random stream is identical.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(
                ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % (2 ** 63))
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # classes, modalities, samples_paths(), ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


# ----------------------------------------------------------------------------------------------
# configuration checks and construction

def _num_tokens(domains: Sequence[str], input_size: int, patch_size: int) -> int:
    # every input adapter tokenises its modality into (input_size / patch_size)^2 patches
    return len(domains) * (input_size // patch_size) ** 2


def validate_pretrain_args(args: argparse.Namespace) -> list[str]:
    """Cross-argument checks run before anything is built (one line per problem)."""
    errors = []
    try:
        in_domains, out_domains = parse_domains(args.in_domains), parse_domains(args.out_domains)
    except ValueError as e:
        return [f"--in_domains/--out_domains: {e}"]
    if not in_domains:
        errors.append("--in_domains is empty")
    for d in in_domains:
        if get_modality(d).input_adapter is None:
            errors.append(f"--in_domains: modality '{d}' cannot be an input (no input adapter)")
    for d in out_domains:
        if get_modality(d).output_adapter is None or get_modality(d).loss is None:
            errors.append(f"--out_domains: modality '{d}' cannot be a pre-training output (no decoder or loss)")
    if args.input_size % args.patch_size:
        errors.append(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    n_tokens = _num_tokens(in_domains, args.input_size, args.patch_size)
    if not 0 < args.num_encoded_tokens <= n_tokens:
        errors.append(f"--num_encoded_tokens {args.num_encoded_tokens} must be in 1..{n_tokens} ({len(in_domains)} "
                      f"input domains x ({args.input_size}/{args.patch_size})^2 patches)")
    outputs = out_domains + (["norm_rgb"] if args.extra_norm_pix_loss else [])
    for t in split_list(args.fp32_output_adapters):
        if t not in outputs:
            errors.append(f"--fp32_output_adapters: '{t}' is not an output adapter (outputs: {outputs})")
    if args.extra_norm_pix_loss and "rgb" not in in_domains:
        errors.append("--extra_norm_pix_loss needs 'rgb' in --in_domains (or pass --no_extra_norm_pix_loss)")
    if min(args.batch_size, args.epochs, args.update_freq) < 1:
        errors.append(f"--batch_size ({args.batch_size}), --epochs ({args.epochs}) and --update_freq "
                      f"({args.update_freq}) must be >= 1")
    return errors


def build_pretrain_model(args: argparse.Namespace) -> nn.Module:
    """MultiMAE with input adapters for ``in_domains`` and decoders for ``out_domains`` (+ norm_rgb),
    adapters built for ``input_size`` (published: always 224), in the deterministic domain order.
    ``encoder_depth/encoder_dim/encoder_num_heads`` (when set) override the size preset of ``model``."""
    from multimae import create_model

    in_domains, out_domains = parse_domains(args.in_domains), parse_domains(args.out_domains)
    inputs = build_input_adapters(in_domains, args.patch_size, args.input_size)
    outputs = build_pretrain_output_adapters(
        out_domains, context_tasks=in_domains, patch_size=args.patch_size, image_size=args.input_size,
        dim_tokens=args.decoder_dim, depth=args.decoder_depth, num_heads=args.decoder_num_heads,
        use_task_queries=args.decoder_use_task_queries, use_xattn=args.decoder_use_xattn,
        extra_norm_pix_loss=args.extra_norm_pix_loss)
    overrides = {k: v for k, v in (("depth", args.encoder_depth), ("dim_tokens", args.encoder_dim),
                                   ("num_heads", args.encoder_num_heads)) if v is not None}
    return create_model(args.model, input_adapters=inputs, output_adapters=outputs,
                        num_global_tokens=args.num_global_tokens, drop_path_rate=args.drop_path, **overrides)


def _transform(args: argparse.Namespace, train: bool = True) -> PretrainTransform:
    if train:
        # compact: uint8 rgb and label maps leave the loader workers; Trainer.batch_transform (finish)
        # completes them on the device (4x less rgb through worker shared memory and host-to-device copies)
        return PretrainTransform(args.input_size, hflip=args.hflip, interpolation=args.train_interpolation,
                                 imagenet_default_mean_and_std=args.imagenet_default_mean_and_std, compact=True)
    # whole image, no flip: the same pixels every time
    return PretrainTransform(args.input_size, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             imagenet_default_mean_and_std=args.imagenet_default_mean_and_std)


def _label_ranges(domains: Sequence[str], in_domains: Sequence[str]) -> dict:
    # An input label feeds an embedding of num_classes rows (any other id is an index error, a device-side
    # assert on CUDA); a target-only label may also hold the ignore index of its loss.
    ranges = {}
    for d in domains:
        m = get_modality(d)
        if m.kind == "label" and m.num_classes:
            ignore = m.loss_kwargs.get("ignore_index")
            ranges[d] = (m.num_classes, () if d in in_domains or ignore is None else (int(ignore),))
    return ranges


def build_pretrain_loader(args: argparse.Namespace) -> tuple[PerSampleSeed, DataLoader]:
    """Dataset over every domain under ``args.data_path`` (augmentation seeded per sample and epoch) and a
    loader with a (drop-last, shuffling) ``DistributedSampler`` over the processes. Batches are compact
    (uint8 rgb, label maps in their file dtype): the trainer finishes them on the device."""
    in_domains = parse_domains(args.in_domains)
    domains = ordered_domains(in_domains, parse_domains(args.out_domains))
    folder = MultiModalImageFolder(args.data_path, domains, transform=_transform(args),
                                   label_ranges=_label_ranges(domains, in_domains))
    dataset = PerSampleSeed(folder, args.seed)
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                 drop_last=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=True)
    return dataset, loader


def vis_dataset_root(data_path: str) -> str:
    """``<data_path>/../val`` when it exists (held-out pictures), else ``data_path``."""
    val = os.path.join(os.path.dirname(os.path.normpath(data_path)), "val")
    return val if os.path.isdir(val) and os.path.normpath(val) != os.path.normpath(data_path) else data_path


def build_pretrain_trainer(args: argparse.Namespace, model: nn.Module, loader: DataLoader,
                           device: torch.device, wandb: Any = None) -> Trainer:
    """Balancer, optimizer (published grouping), schedules (``lr = blr * batch * update_freq * world / 256``),
    DDP and the :class:`Trainer`. Sets ``args.lr``."""
    in_domains, out_domains = parse_domains(args.in_domains), parse_domains(args.out_domains)
    losses = build_pretrain_losses(out_domains, args.patch_size, extra_norm_pix_loss=args.extra_norm_pix_loss)
    balancer = build_task_balancer(args.task_balancer, list(losses)).to(device)
    args.lr = args.blr * args.batch_size * args.update_freq * get_world_size() / 256
    optimizer = create_optimizer(args, pretrain_param_groups(model, balancer, args.weight_decay,
                                                             args.balancer_lr_scale, args.decay_filter))
    steps = len(loader) // args.update_freq
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
    lr_schedule = cosine_scheduler(args.lr, args.min_lr, args.epochs, steps, args.warmup_epochs,
                                   args.warmup_lr, args.warmup_steps)
    wd_schedule = weight_decay_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, steps)
    if args.grad_ckpt:
        model.set_grad_checkpointing(True)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wrapped: nn.Module = model
    if get_world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=args.find_unused_params)
        if any(True for _ in balancer.parameters()):
            balancer = DistributedDataParallel(balancer, device_ids=ids)
    if args.compile:
        wrapped = torch.compile(wrapped)
    step_fn = PretrainStep(in_domains, losses, balancer, args.num_encoded_tokens, args.alphas,
                           args.sample_tasks_uniformly, split_list(args.fp32_output_adapters),
                           args.standardize_depth, args.loss_on_unmasked,
                           log_weighted=args.task_balancer != "none")
    print(f"lr: {args.lr:.3e} (blr {args.blr} x batch {args.batch_size} x update_freq {args.update_freq} x "
          f"{get_world_size()} processes / 256), "
          f"{steps} steps per epoch, {n_parameters / 1e6:.2f}M trainable parameters")
    return Trainer(wrapped, optimizer, step_fn, lr_schedule=lr_schedule, wd_schedule=wd_schedule,
                   steps_per_epoch=steps, epochs=args.epochs, device=device, amp=args.amp,
                   clip_grad=args.clip_grad, skip_grad=args.skip_grad, update_freq=args.update_freq,
                   modules={"loss_balancer": balancer}, batch_transform=_transform(args).finish,
                   output_dir=args.output_dir, save_ckpt_freq=args.save_ckpt_freq, keep_last=args.keep_last,
                   print_freq=args.print_freq, config=args_to_dict(args), wandb=wandb,
                   batch_size=args.batch_size, extra_log={"n_parameters": n_parameters},
                   epoch_start_hooks=[_set_data_epoch(loader)])


def _set_data_epoch(loader: DataLoader):
    def hook(trainer: Trainer, epoch: int) -> None:
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
    return hook


# ----------------------------------------------------------------------------------------------
# reconstruction pictures

class ReconstructionVis:
    """Trainer callback: every ``freq`` epochs (and after the last) rank 0 reconstructs ``num_vis`` fixed
    held-out images with fixed masks and writes ``output_dir/vis/reconstruction_e<epoch>.png`` (masked
    input / prediction / target per modality), also to W&B when enabled. Uses its own RNG stream, so
    training (and resuming) is unaffected."""

    def __init__(self, args: argparse.Namespace, step: PretrainStep, device: torch.device, wandb: Any = None,
                 seed: int = 0):
        self.freq, self.epochs, self.step, self.device = args.save_vis_freq, args.epochs, step, device
        self.out_dir = os.path.join(args.output_dir, "vis") if args.output_dir else ""
        self.wandb, self.seed, self.batch = wandb, seed, None
        self.mean_std = _transform(args, train=False)
        if args.num_vis > 0 and self.freq > 0 and self.out_dir and is_main_process():
            domains = ordered_domains(parse_domains(args.in_domains), parse_domains(args.out_domains))
            root = vis_dataset_root(args.data_path)
            ds = MultiModalImageFolder(root, domains, transform=_transform(args, train=False))
            n = min(args.num_vis, len(ds))
            idx = [round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)]  # spread over the classes
            with torch.random.fork_rng(devices=[]):  # leave the training RNG stream alone
                samples = [ds[i][0] for i in idx]
            self.batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
            self.root = root

    def due(self, epoch: int) -> bool:
        return self.batch is not None and ((epoch + 1) % self.freq == 0 or epoch + 1 == self.epochs)

    @torch.no_grad()
    def render(self, model: nn.Module) -> tuple[dict, dict, dict]:
        """Fixed-seed masked forward of the stored batch: ``(inputs, preds, masks)`` on the CPU."""
        model = unwrap_model(model)
        was_training = model.training
        model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            x = self.step.prepare({k: v.to(self.device) for k, v in self.batch.items()})
            preds, masks = model({d: x[d] for d in self.step.in_domains},
                                 num_encoded_tokens=self.step.num_encoded_tokens, alphas=self.step.alphas,
                                 sample_tasks_uniformly=self.step.sample_tasks_uniformly)
        model.train(was_training)
        cpu = lambda d: {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()}  # noqa
        return cpu(x), cpu(preds), cpu(masks)

    def __call__(self, trainer: Trainer, epoch: int, stats: dict) -> dict | None:
        if not self.due(epoch):
            return None
        from utils.vis import save_reconstruction_grid

        x, preds, masks = self.render(trainer.model)
        path = os.path.join(self.out_dir, f"reconstruction_e{epoch:04d}.png")
        save_reconstruction_grid(path, x, preds, masks, max_samples=len(next(iter(x.values()))),
                                 mean=self.mean_std.mean, std=self.mean_std.std)
        print(f"Reconstructions of {len(next(iter(x.values())))} images from {self.root}: {path}")
        if self.wandb is not None:
            self.wandb.log_image("reconstructions", path, step=trainer.global_step, caption=f"epoch {epoch}")
        return None
