"""The training steps the model modes of ``tools/benchmark.py`` time: model, synthetic batch and step function of
each mode (pre-training and the three fine-tuning tasks), and :class:`StepRunner`, one step of a variant exactly
as the engine runs it.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tools.lib.benchmark import Variant


def _pretrain_setup(args: Namespace, device: torch.device) -> Tuple[nn.Module, Callable, Any, Callable]:
    from multimae import create_model
    from utils.data.modalities import build_input_adapters, build_pretrain_losses, build_pretrain_output_adapters
    from utils.engine.optim import pretrain_param_groups
    from utils.pretrain.multimae import PretrainStep
    from utils.pretrain.task_balancing import build_task_balancer

    domains, S, B = ["rgb", "depth", "semseg"], args.input_size, args.batch_size
    outputs = build_pretrain_output_adapters(domains, domains, args.patch_size, S, dim_tokens=args.decoder_dim,
                                             depth=args.decoder_depth, num_heads=args.decoder_num_heads,
                                             extra_norm_pix_loss=True)
    kw = {"depth": args.encoder_depth} if args.encoder_depth else {}
    inputs = build_input_adapters(domains, args.patch_size, S)
    model = create_model(f"pretrain_multimae_{args.size}", input_adapters=inputs, output_adapters=outputs, **kw)
    losses = build_pretrain_losses(domains, args.patch_size, extra_norm_pix_loss=True)
    balancer = build_task_balancer("none", list(losses))
    step = PretrainStep(domains, losses, balancer, args.num_encoded_tokens, standardize_depth=True)
    g = torch.Generator().manual_seed(args.seed)
    x = {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.rand(B, 1, S, S, generator=g),
         "semseg": torch.randint(0, 133, (B, S // 4, S // 4), generator=g)}
    return model, step, (x, torch.zeros(B, dtype=torch.long)), lambda m: pretrain_param_groups(m, balancer, 0.05)


def _finetune_setup(args: Namespace, device: torch.device, task: str) -> Tuple[nn.Module, Callable, Any, Callable]:
    from multimae import LinearOutputAdapter
    from utils.finetune.models import EncoderInfo, build_dense_head, build_multivit, encoder_info
    from utils.engine.optim import finetune_param_groups

    name, S, B = f"multivit_{args.size}", args.input_size, args.batch_size
    kw = {"depth": args.encoder_depth} if args.encoder_depth else {}
    enc: EncoderInfo = encoder_info(name, **kw)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(B, 3, S, S, generator=g)
    if task == "cls":
        head, key, y = LinearOutputAdapter(1000), "cls", torch.randint(0, 1000, (B,), generator=g)
    elif task == "semseg":  # published default head: ConvNeXt, 6144 wide (--decoder_dim scales it in --quick)
        head = build_dense_head("convnext", 150, ["rgb"], args.patch_size, enc,
                                decoder_dim=6144 if args.decoder_dim >= 256 else args.decoder_dim * 4)
        key, y = "semseg", torch.randint(0, 150, (B, S, S), generator=g)
    else:
        head, key, y = build_dense_head("dpt", 1, ["rgb"], args.patch_size, enc), "depth", torch.rand(B, 1, S, S, generator=g)
    model = build_multivit(name, ["rgb"], {key: head}, args.patch_size, S, **kw)
    all_layers = task == "depth"

    def step(m: nn.Module, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        inputs, target = batch
        out = m({"rgb": inputs}, return_all_layers=all_layers)[key].float()
        if task == "depth":
            loss = F.l1_loss(out, target)
        else:
            loss = F.cross_entropy(out, target, ignore_index=255)
        return loss, {"loss": loss.detach()}

    return model, step, (x, y), lambda m: finetune_param_groups(m, 0.05, 0.75)


def build_mode(mode: str, args: Namespace, device: torch.device):
    """``(model, step_fn, batch, param_groups_fn)`` for a model mode, on ``device``."""
    torch.manual_seed(args.seed)
    if mode == "pretrain":
        model, step, batch, groups = _pretrain_setup(args, device)
    else:
        model, step, batch, groups = _finetune_setup(args, device, mode.split("-")[1])
    from utils.engine.trainer import move_to_device
    return model.to(device), step, move_to_device(batch, device), groups


def _make_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable, amp: str,
                  device: torch.device):
    from utils.engine.trainer import Trainer
    return Trainer(model, optimizer, step, lr_schedule=np.full(1, 1.5e-4), wd_schedule=np.full(1, 0.05),
                   steps_per_epoch=1, epochs=1, device=device, amp=amp)


def _to_channels_last(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, dict):
        return {k: _to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_channels_last(v) for v in batch)
    return batch


class StepRunner:
    """One training step of ``variant`` exactly as the engine runs it: hyper-parameters from the schedule,
    autocast, the task step, (scaled) backward, gradient norm, optimizer step, zero grads. Variants share
    the model and optimizer unless they need another weight layout (channels-last)."""

    def __init__(self, variant: Variant, model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable,
                 batch: Any, device: torch.device):
        from utils.engine.trainer import autocast
        self.variant, self.model, self.device, self.step = variant, model, device, step
        self.trainer = _make_trainer(model, optimizer, step, variant.amp, device)
        self.forward_model = torch.compile(model) if variant.compile else model
        self.batch = _to_channels_last(batch) if variant.channels_last else batch
        self._autocast = autocast

    def __call__(self) -> None:
        from multimae.multimae_utils import set_attention_impl
        v, t = self.variant, self.trainer
        set_attention_impl(v.attention)
        if hasattr(self.model, "set_grad_checkpointing"):  # (a reference implementation may lack it)
            self.model.set_grad_checkpointing(v.grad_ckpt)
        t.set_hparams(0)
        with self._autocast(self.device, t.amp):
            loss, _ = self.step(self.forward_model, self.batch)
        (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
        t.optimizer_step()


def _build_runners(variants: List[Variant], model: nn.Module, step: Callable, batch: Any, groups_fn: Callable,
                   device: torch.device) -> Dict[str, StepRunner]:
    """A :class:`StepRunner` per variant. Variants share the model unless the weight layout differs, and the
    optimizer unless it is fused."""
    models: Dict[bool, nn.Module] = {}
    optimizers: Dict[Tuple[bool, bool], torch.optim.Optimizer] = {}
    runners: Dict[str, StepRunner] = {}
    for v in variants:
        if v.channels_last not in models:
            m = model if not models else _clone(model)
            models[v.channels_last] = m.to(memory_format=torch.channels_last) if v.channels_last else m
        m = models[v.channels_last]
        key = (v.channels_last, v.fused_optimizer)
        if key not in optimizers:
            optimizers[key] = _make_optimizer(m, groups_fn, v.fused_optimizer)
        runners[v.name] = StepRunner(v, m, optimizers[key], step, batch, device)
    return runners


def _make_optimizer(model: nn.Module, groups_fn: Callable, fused: bool) -> torch.optim.Optimizer:
    """The project's AdamW over ``groups_fn(model)``: torch's single-kernel AdamW (``fused``, the training
    default) or the plain per-parameter loop."""
    from utils.engine.optim import create_optimizer
    opt_args = Namespace(opt="adamw", lr=1.5e-4, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95], momentum=0.9)
    return create_optimizer(opt_args, groups_fn(model), fused=fused)


def _clone(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)
