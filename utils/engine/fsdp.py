"""FSDP2 sharding (``torch.distributed.fsdp.fully_shard``) as the alternative to DDP (``--fsdp``).

Every transformer block becomes its own FSDP unit (its parameters are all-gathered just before the block
runs and freed after it), then the root module takes what is left (adapters, global tokens, heads). The
optimizer built before sharding is pointed at the new sharded parameters, so the optimizer construction
(parameter groups, layer decay) stays what it is for DDP. With activation checkpointing the recomputation
of a block all-gathers its parameters again; ``torch.compile`` goes around the sharded module.

    model = apply_fsdp(model, device=ctx.device, amp=ctx.amp, optimizer=optimizer)

On CUDA a ``MixedPrecisionPolicy`` follows ``amp``: parameters are gathered in fp16/bf16 and gradients
reduced in fp32; on the CPU (gloo tests) everything stays fp32. Checkpoints of sharded runs go through
:mod:`utils.engine.dcp`.

Public API: apply_fsdp, is_fsdp, fsdp_blocks, local_tensor, sharded_grad_scaler.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["apply_fsdp", "is_fsdp", "fsdp_blocks", "local_tensor", "sharded_grad_scaler"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_fsdp(module: nn.Module | None) -> bool:
    """True when ``module`` (or the module under a ``torch.compile`` wrapper) was sharded by fully_shard."""
    from torch.distributed.fsdp import FSDPModule

    module = getattr(module, "_orig_mod", module)
    return isinstance(module, FSDPModule)


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: the modules of ``model.encoder`` and every other module
    of the same classes (e.g. decoder blocks built from the same block); empty when there is no encoder."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Sequential) or len(encoder) == 0:
        return []
    kinds = tuple({type(b) for b in encoder})
    return [m for m in model.modules() if isinstance(m, kinds)]


def local_tensor(t: Tensor) -> Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as a plain replicated tensor."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded_grad_scaler(device: torch.device | str) -> torch.amp.GradScaler:
    """The fp16 loss scaler for sharded gradients: every rank sees only its shard, so the overflow check
    is reduced over ranks (``ShardedGradScaler``) and all ranks skip the same steps."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(torch.device(device).type)


def _remap_optimizer(optimizer: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                     new: dict[str, nn.Parameter]) -> None:
    """Replace the pre-sharding parameters in ``optimizer``'s groups by the sharded ones (same names)."""
    if optimizer.state:
        raise RuntimeError("apply_fsdp: the optimizer already holds state; shard the model before the first step")
    by_id = {id(p): name for name, p in old.items()}
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                raise RuntimeError("apply_fsdp: the optimizer holds a parameter that is not in the sharded modules "
                                   f"(shape {tuple(p.shape)}); pass its module in extra_modules")
            params.append(new[name])
        group["params"] = params


@torch.no_grad()
def _broadcast_from_rank0(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (DDP does this when it wraps; fully_shard does not, and
    each rank initialised its model from its own seed)."""
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def _named_params(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{key}.{n}": p for key, m in modules.items() for n, p in m.named_parameters()}


def apply_fsdp(model: nn.Module, *, device: torch.device, amp: str = "none",
               optimizer: torch.optim.Optimizer | None = None,
               extra_modules: Iterable[nn.Module] = (), reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` over all ranks of the default process group (in place; returns it).

    Args:
        model: on ``device``; its blocks (:func:`fsdp_blocks`) become FSDP units, then the root.
        amp: ``'bf16' | 'fp16' | 'none'``; on CUDA the parameter dtype of the all-gathers (fp32 reductions).
        optimizer: built on the unsharded parameters; re-pointed at the sharded ones.
        extra_modules: other trainable modules whose parameters are in ``optimizer`` (the task balancer);
            each is sharded as one unit in fp32 so that gradient clipping sees one kind of tensor.
        reshard_after_forward: free gathered parameters after the forward (ZeRO-3); False keeps them
            until the backward (ZeRO-2 like: more memory, fewer all-gathers).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("--fsdp needs a process group (launch with torchrun or SLURM, more than one process)")
    device = torch.device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and amp in _AMP:
        mp = MixedPrecisionPolicy(param_dtype=_AMP[amp], reduce_dtype=torch.float32)
    extras = {f"extra{i}": m for i, m in enumerate(extra_modules) if any(True for _ in m.parameters())}
    for m in (model, *extras.values()):
        _broadcast_from_rank0(m)
    old = _named_params({"model": model, **extras})
    for block in fsdp_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for m in extras.values():
        fully_shard(m, mesh=mesh)
    if optimizer is not None:
        _remap_optimizer(optimizer, old, _named_params({"model": model, **extras}))
    return model
