"""Pre-training pieces used by ``run_pretraining_multimae.py``: model/data/optimizer construction from the
modality registry, the masked multi-task step function and the reconstruction-picture callback.

The loop itself is the shared :class:`utils.engine.trainer.Trainer`.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from utils.config import split_list
from utils.data.datasets import MultiModalImageFolder
from utils.data.depth import robust_standardize
from utils.data.seeding import PerSampleSeed
from utils.data.shards import bad_sample_policy, build_shard_loader, is_shard_source, shard_samples
from utils.dist import DistContext, get_rank, get_world_size, is_main_process
from utils.engine.factory import TrainingPlan, ddp_wrap, peak_lr
from utils.engine.trainer import Trainer, unwrap_model
from utils.jobs import Job, Parts, register_job
from utils.data.modalities import (build_input_adapters, build_pretrain_losses, build_pretrain_output_adapters,
                              get_modality, ordered_domains, parse_domains)
from utils.engine.optim import pretrain_param_groups
from utils.pretrain.config import PretrainConfig
from utils.pretrain.task_balancing import build_task_balancer
from utils.data.transforms import PretrainTransform

__all__ = ["PretrainStep", "PerSampleSeed", "ReconstructionVis", "validate_pretrain_args", "build_pretrain_model",
           "build_pretrain_loader", "build_pretrain_step", "MultiMAEPretraining", "vis_dataset_root"]


class PretrainStep:
    """The masked multi-modal step: ``step(model, (x, label)) -> (loss, logs)``.

    ``x`` holds every domain at full resolution (semseg at 1/4): the inputs are ``in_domains``, the
    targets every output (``norm_rgb`` is scored against ``rgb`` with the rgb mask). Depth is standardised
    per image on the device first when ``standardize_depth`` (it is then input and target). Losses are
    computed on ``pred.float()`` with the token masks (no mask when ``loss_on_unmasked`` or when the task
    is not an input), weighted by the task balancer and summed; the logged ``loss`` is the unweighted sum,
    comparable across task balancers.
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


# ----------------------------------------------------------------------------------------------
# configuration checks and construction

def _num_tokens(domains: Sequence[str], input_size: int, patch_size: int) -> int:
    # every input adapter tokenises its modality into (input_size / patch_size)^2 patches
    return len(domains) * (input_size // patch_size) ** 2


def validate_pretrain_args(cfg: PretrainConfig) -> list[str]:
    """Cross-argument checks run before anything is built (one line per problem)."""
    errors = []
    try:
        in_domains, out_domains = parse_domains(cfg.in_domains), parse_domains(cfg.out_domains)
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
    if cfg.input_size % cfg.patch_size:
        errors.append(f"--input_size {cfg.input_size} is not a multiple of --patch_size {cfg.patch_size}")
    n_tokens = _num_tokens(in_domains, cfg.input_size, cfg.patch_size)
    if not 0 < cfg.num_encoded_tokens <= n_tokens:
        errors.append(f"--num_encoded_tokens {cfg.num_encoded_tokens} must be in 1..{n_tokens} ({len(in_domains)} "
                      f"input domains x ({cfg.input_size}/{cfg.patch_size})^2 patches)")
    outputs = out_domains + (["norm_rgb"] if cfg.extra_norm_pix_loss else [])
    for t in split_list(cfg.fp32_output_adapters):
        if t not in outputs:
            errors.append(f"--fp32_output_adapters: '{t}' is not an output adapter (outputs: {outputs})")
    if cfg.extra_norm_pix_loss and "rgb" not in in_domains:
        errors.append("--extra_norm_pix_loss needs 'rgb' in --in_domains (or pass --no_extra_norm_pix_loss)")
    if min(cfg.batch_size, cfg.epochs, cfg.update_freq) < 1:
        errors.append(f"--batch_size ({cfg.batch_size}), --epochs ({cfg.epochs}) and --update_freq "
                      f"({cfg.update_freq}) must be >= 1")
    return errors


def build_pretrain_model(cfg: PretrainConfig) -> nn.Module:
    """MultiMAE with input adapters for ``in_domains`` and decoders for ``out_domains`` (+ norm_rgb),
    adapters built for ``input_size``, in the deterministic domain order.
    ``encoder_depth/encoder_dim/encoder_num_heads`` (when set) override the size preset of ``model``."""
    from multimae import create_model

    in_domains, out_domains = parse_domains(cfg.in_domains), parse_domains(cfg.out_domains)
    inputs = build_input_adapters(in_domains, cfg.patch_size, cfg.input_size)
    outputs = build_pretrain_output_adapters(
        out_domains, context_tasks=in_domains, patch_size=cfg.patch_size, image_size=cfg.input_size,
        dim_tokens=cfg.decoder_dim, depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads,
        use_task_queries=cfg.decoder_use_task_queries, use_xattn=cfg.decoder_use_xattn,
        extra_norm_pix_loss=cfg.extra_norm_pix_loss)
    overrides = {k: v for k, v in (("depth", cfg.encoder_depth), ("dim_tokens", cfg.encoder_dim),
                                   ("num_heads", cfg.encoder_num_heads)) if v is not None}
    return create_model(cfg.model, input_adapters=inputs, output_adapters=outputs,
                        num_global_tokens=cfg.num_global_tokens, drop_path_rate=cfg.drop_path, **overrides)


def _transform(cfg: PretrainConfig, train: bool = True) -> PretrainTransform:
    if train:
        # compact: uint8 rgb and label maps leave the loader workers; Trainer.batch_transform (finish)
        # completes them on the device (4x less rgb through worker shared memory and host-to-device copies)
        return PretrainTransform(cfg.input_size, hflip=cfg.hflip, interpolation=cfg.train_interpolation,
                                 imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std, compact=True)
    # whole image, no flip: the same pixels every time
    return PretrainTransform(cfg.input_size, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std)


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


def build_pretrain_loader(cfg: PretrainConfig) -> tuple[PerSampleSeed, DataLoader]:
    """Dataset over every domain under ``cfg.data_path`` (augmentation seeded per sample and epoch) and a
    loader with a (drop-last, shuffling) ``DistributedSampler`` over the processes. Batches are compact
    (uint8 rgb, label maps in their file dtype): the trainer finishes them on the device."""
    in_domains = parse_domains(cfg.in_domains)
    domains = ordered_domains(in_domains, parse_domains(cfg.out_domains))
    if is_shard_source(cfg.data_path):  # tar shards, streamed (utils/data/shards.py)
        loader = build_shard_loader(cfg.data_path, domains, _transform(cfg), cfg.batch_size, cfg.seed, get_rank(),
                                    get_world_size(), cfg.num_workers, cfg.pin_mem and torch.cuda.is_available(),
                                    _label_ranges(domains, in_domains), bad_sample_policy(cfg))
        return loader.dataset, loader
    folder = MultiModalImageFolder(cfg.data_path, domains, transform=_transform(cfg),
                                   label_ranges=_label_ranges(domains, in_domains))
    dataset = PerSampleSeed(folder, cfg.seed)
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                 drop_last=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=cfg.pin_mem and torch.cuda.is_available(), drop_last=True)
    return dataset, loader


def vis_dataset_root(data_path: str) -> str:
    """``<data_path>/../val`` when it exists (held-out pictures), else ``data_path``."""
    val = os.path.join(os.path.dirname(os.path.normpath(data_path)), "val")
    return val if os.path.isdir(val) and os.path.normpath(val) != os.path.normpath(data_path) else data_path


def build_pretrain_step(cfg: PretrainConfig, losses: dict[str, nn.Module], balancer: nn.Module) -> PretrainStep:
    """The masked multi-task step of ``cfg``'s domains with the given losses and task balancer."""
    return PretrainStep(parse_domains(cfg.in_domains), losses, balancer, cfg.num_encoded_tokens, cfg.alphas,
                        cfg.sample_tasks_uniformly, split_list(cfg.fp32_output_adapters), cfg.standardize_depth,
                        cfg.loss_on_unmasked, log_weighted=cfg.task_balancer != "none")


@register_job("pretrain", "multimae")
class MultiMAEPretraining(Job):
    """Masked multi-modal multi-task pre-training: data over every domain, MultiMAE, the pre-training optimizer
    grouping (``lr = blr * batch * update_freq * world / 256``), reconstruction pictures."""
    config_class = PretrainConfig

    def build(self, cfg: PretrainConfig, ctx: DistContext) -> Parts:
        dataset, loader = build_pretrain_loader(cfg)
        model = build_pretrain_model(cfg).to(ctx.device)
        print(f"Data: {len(dataset)} samples of {dataset.modalities} from {cfg.data_path}")
        return Parts(model, loader, {"dataset": dataset})

    def plan(self, cfg: PretrainConfig, ctx: DistContext, parts: Parts) -> TrainingPlan:
        losses = build_pretrain_losses(parse_domains(cfg.out_domains), cfg.patch_size,
                                       extra_norm_pix_loss=cfg.extra_norm_pix_loss)
        balancer = build_task_balancer(cfg.task_balancer, list(losses)).to(ctx.device)
        lr, _ = peak_lr(cfg.optim, cfg.batch_size, cfg.update_freq, ctx.world_size)
        groups = pretrain_param_groups(parts.model, balancer, cfg.weight_decay, cfg.balancer_lr_scale,
                                       cfg.decay_filter)
        balancer = ddp_wrap(balancer, ctx, fsdp=cfg.dist.fsdp)

        def describe(steps: int, optimizer: Any, n_parameters: int) -> str:
            return (f"lr: {lr:.3e} (blr {cfg.blr} x batch {cfg.batch_size} x update_freq {cfg.update_freq} x "
                    f"{ctx.world_size} processes / 256), {steps} steps per epoch, "
                    f"{n_parameters / 1e6:.2f}M trainable parameters")

        return TrainingPlan(build_pretrain_step(cfg, losses, balancer), groups, lr,
                            modules={"loss_balancer": balancer}, batch_transform=_transform(cfg).finish,
                            epoch_start_hooks=[_set_data_epoch(parts.train_loader)], describe=describe)

    def callbacks(self, cfg: PretrainConfig, ctx: DistContext, parts: Parts, trainer: Any, wandb: Any) -> list:
        if trainer.sharded and cfg.save_vis_freq:  # rank 0 alone would run the sharded model: a collective hang
            print("--fsdp: reconstruction pictures are off (save_vis_freq 0)")
            return []
        return [ReconstructionVis(cfg, trainer.step_fn, ctx.device, wandb, seed=cfg.seed)]

    def finish(self, cfg: PretrainConfig, ctx: DistContext, parts: Parts, trainer: Any, record: dict,
               wandb: Any) -> Any:
        return trainer


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

    def __init__(self, cfg: PretrainConfig, step: PretrainStep, device: torch.device, wandb: Any = None,
                 seed: int = 0):
        self.freq, self.epochs, self.step, self.device = cfg.save_vis_freq, cfg.epochs, step, device
        self.out_dir = os.path.join(cfg.output_dir, "vis") if cfg.output_dir else ""
        self.wandb, self.seed, self.batch = wandb, seed, None
        self.mean_std = _transform(cfg, train=False)
        if cfg.num_vis > 0 and self.freq > 0 and self.out_dir and is_main_process():
            domains = ordered_domains(parse_domains(cfg.in_domains), parse_domains(cfg.out_domains))
            root = vis_dataset_root(cfg.data_path)
            if is_shard_source(root):  # the first samples of the first shard (shards are in random order)
                samples = shard_samples(root, domains, _transform(cfg, train=False), cfg.num_vis)
            else:
                ds = MultiModalImageFolder(root, domains, transform=_transform(cfg, train=False))
                n = min(cfg.num_vis, len(ds))
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
