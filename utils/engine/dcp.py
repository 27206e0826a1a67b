"""Checkpoints of sharded (``--fsdp``) runs: ``torch.distributed.checkpoint`` directories.

A sharded checkpoint is a directory named like the single-file ones (``checkpoint-<epoch>.pth/``,
``checkpoint-best.pth/``), so auto-resume finds it the same way::

    checkpoint-3.pth/            DCP files: every rank writes its shards of the model, the extra modules
        .metadata, __0_0.distcp    (task balancer) and the optimizer state, keyed by parameter name
        trainer_state.pth        the rest (epoch, step, scaler, RNG of every rank, config, data position),
                                 a plain torch.save file that ``load_checkpoint`` reads safely
    checkpoint-step120.pth/      a mid-epoch save (SIGTERM, --save_every_steps)
    checkpoint-last.pth -> checkpoint-step120.pth   (relative symlink, swapped atomically)

Writes are atomic: all ranks write into ``.checkpoint-<tag>.pth.tmp/``, rank 0 adds the trainer state
after a barrier and renames the directory into place; an interrupted save leaves the previous checkpoint
untouched. Loading reshards: a checkpoint written by N ranks loads on M ranks, with or without FSDP
(a plain single-process model too). :func:`export_checkpoint` turns one into the usual single file
(``tools/export_checkpoint.py``). Only load sharded checkpoints you wrote: the DCP metadata is pickled.

Public API: TRAINER_STATE, is_sharded_checkpoint, save_sharded, load_sharded, export_checkpoint.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from utils.checkpoint import LAST_NAME, CheckpointError, atomic_save, load_checkpoint, point_last_at
from utils.dist import barrier, is_main_process
from utils.io import fsync_dir

__all__ = ["TRAINER_STATE", "is_sharded_checkpoint", "save_sharded", "load_sharded", "export_checkpoint"]

TRAINER_STATE = "trainer_state.pth"
_NUMBERED = re.compile(r"^checkpoint-(\d+)\.pth$")
_STEP = re.compile(r"^checkpoint-step(\d+)\.pth$")


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a DCP checkpoint directory (or a link to one)."""
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


def _unwrap(m: nn.Module) -> nn.Module:
    m = getattr(m, "_orig_mod", m)
    return getattr(m, "module", m) if isinstance(m, nn.parallel.DistributedDataParallel) else m


def _container(model: nn.Module, modules: Mapping[str, nn.Module]) -> nn.ModuleDict:
    """One module holding everything the optimizer updates, so parameter names are unique:
    ``model.<name>`` and ``<module key>.<name>``."""
    return nn.ModuleDict({"model": _unwrap(model), **{k: _unwrap(m) for k, m in modules.items()}})


def _tensor_keys(modules: Mapping[str, nn.Module]) -> set[str]:
    return {"model", "optimizer", "model_ema", *modules}


# ----------------------------------------------------------------------------------------------
# writing

def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing what is there."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    if dst.is_dir():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    fsync_dir(dst.parent)


def _copy_dir_as_last(target: Path, last: Path) -> None:
    """Where links fail: a full copy of the checkpoint folder, swapped in as ``checkpoint-last.pth``."""
    copy = last.with_name(f".{last.name}.copy")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(target, copy)
    _replace_dir(copy, last)


def _prune(output_dir: Path, keep: Path, keep_last: int | None) -> None:
    """Drop mid-epoch directories that ``checkpoint-last.pth`` no longer points at, and numbered ones
    beyond the ``keep_last`` newest."""
    last = (output_dir / LAST_NAME).resolve()
    protected = {keep.resolve(), last}
    numbered = sorted((int(m.group(1)), p) for p in output_dir.iterdir()
                      if (m := _NUMBERED.match(p.name)) and p.is_dir() and not p.is_symlink())
    old = [p for _, p in numbered[:-keep_last]] if keep_last else []
    old += [p for p in output_dir.iterdir() if _STEP.match(p.name)]
    for p in old:
        if p.resolve() not in protected:
            shutil.rmtree(p, ignore_errors=True)


def save_sharded(output_dir: str | os.PathLike, tag: int | str, state: Mapping[str, Any], model: nn.Module,
                 optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module] | None = None,
                 keep_last: int | None = None) -> Path | None:
    """Write the trainer ``state`` (see ``Trainer.checkpoint_state``) as a sharded checkpoint. Collective.

    ``tag``: epoch number, ``'best'`` or ``'last'`` (a mid-epoch save: ``checkpoint-step<global_step>.pth``
    that ``checkpoint-last.pth`` then points at). Model, ``modules`` and optimizer tensors come from
    ``get_state_dict`` (each rank its shards); ``state``'s other entries go to ``trainer_state.pth``.
    Returns the directory on rank 0, None elsewhere.
    """
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    modules = dict(modules or {})
    if state.get("model_ema") is not None:
        raise CheckpointError("sharded checkpoints do not hold an EMA model; run --fsdp without --model_ema")
    out = Path(output_dir)
    name = f"checkpoint-step{int(state['global_step'])}.pth" if str(tag) == "last" else f"checkpoint-{tag}.pth"
    final, tmp = out / name, out / f".{name}.tmp"
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    barrier()
    model_sd, optim_sd = get_state_dict(_container(model, modules), optimizer)
    save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if not is_main_process():
        barrier()
        return None
    skip = _tensor_keys(modules)
    rest = {k: v for k, v in state.items() if k not in skip}
    rest["sharded_modules"] = sorted(modules)  # so that an export lists the ones without parameters too
    atomic_save(rest, tmp / TRAINER_STATE)
    _replace_dir(tmp, final)
    if str(tag) != "best":
        point_last_at(out, final, _copy_dir_as_last)
    _prune(out, final, keep_last)
    barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return final


# ----------------------------------------------------------------------------------------------
# reading

def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                 modules: Mapping[str, nn.Module] | None = None) -> dict:
    """Load a sharded checkpoint into ``model``, ``modules`` and ``optimizer`` (any number of ranks, sharded
    or not; collective when sharded). Returns the trainer state with their loaded state dicts under
    ``'model'``, ``'optimizer'`` and each module key, ready for ``Trainer.load_state``."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    modules = dict(modules or {})
    root = Path(path).resolve()
    if not is_sharded_checkpoint(root):
        raise CheckpointError(f"{path} is not a sharded checkpoint directory (no .metadata in it)")
    state = load_checkpoint(root / TRAINER_STATE)
    state.pop("sharded_modules", None)
    container = _container(model, modules)
    model_sd, optim_sd = get_state_dict(container, optimizer)
    try:
        load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(root))
    except (Exception, CheckpointException) as exc:  # the latter wraps each rank's traceback
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"{path} does not fit this model and optimizer: {lines[-1] if lines else exc}") from None
    set_state_dict(container, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state["model"] = _unwrap(model).state_dict()
    state["optimizer"] = optimizer.state_dict()
    for key, m in modules.items():
        state[key] = _unwrap(m).state_dict()
    return state


def _optimizer_by_index(optim: Mapping[str, Any]) -> dict:
    """A name-keyed optimizer state dict (``get_state_dict``) in ``torch.optim`` form: parameters numbered
    in the order of the param groups, as ``optimizer.state_dict()`` of the same optimizer numbers them."""
    order = [fqn for g in optim["param_groups"] for fqn in g["params"]]
    index = {fqn: i for i, fqn in enumerate(order)}
    return {"state": {index[fqn]: s for fqn, s in optim["state"].items()},
            "param_groups": [{**g, "params": [index[f] for f in g["params"]]} for g in optim["param_groups"]]}


def export_checkpoint(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write the single-file checkpoint (``utils.checkpoint.save_checkpoint`` format: ``model``,
    ``optimizer``, each extra module, epoch, args, ...) equivalent to the sharded checkpoint ``path``.
    Runs in one process, without a process group. Returns ``out_file``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = Path(path).resolve()
    if not is_sharded_checkpoint(root):
        raise CheckpointError(f"{path} is not a sharded checkpoint directory (no .metadata in it)")
    state = load_checkpoint(root / TRAINER_STATE)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".export-") as tmp:
        full_path = Path(tmp) / "full.pth"
        dcp_to_torch_save(str(root), str(full_path))
        full = torch.load(full_path, map_location="cpu", weights_only=True)
    for key in ["model", *state.pop("sharded_modules", [])]:
        state[key] = {}
    for fqn, tensor in full["model"].items():
        key, name = fqn.split(".", 1)
        state.setdefault(key, {})[name] = tensor
    state["optimizer"] = _optimizer_by_index(full["optimizer"])
    atomic_save(state, out_file)
    return out_file
