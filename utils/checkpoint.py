"""Safe checkpoint files: atomic writes, auto-resume, loading without unpickling code, clear mismatches.

Public API:
    atomic_open(path, mode='wb')              context manager: write to a temp file in the same folder,
                                              fsync, rename over ``path``; on error ``path`` is untouched
    atomic_save(obj, path)                    torch.save through atomic_open
    save_checkpoint(output_dir, tag, state, keep_last=None, update_last=None) -> Path | None
                                              writes output_dir/checkpoint-<tag>.pth (rank 0 only) and
                                              points checkpoint-last.pth at it; keeps the K newest numbered
    find_resume_checkpoint(output_dir) -> Path | None   checkpoint-last.pth, else largest checkpoint-N.pth
    pick_resume_checkpoint(output_dir) -> Path | None   the newest *loadable* one of those (a corrupt
                                              checkpoint-last.pth falls back to the newest intact checkpoint-N.pth)
    resolve_resume(ck) -> str | None          ck.resume if set, else auto-resume (ck.auto_resume)
    peek_checkpoint(path) -> dict             the small entries (args, epoch, ...) without reading the tensors
    remove_stale_temporaries(output_dir) -> list[Path]   the temporary files of killed writes (start-up)
    load_checkpoint(path, map_location='cpu') -> dict   .pth via torch.load(weights_only=True),
                                              .safetensors via safetensors (flat state dict), https URLs
    load_model_state(model, state_dict, strict=True) -> (missing, unexpected)
                                              load_state_dict that raises CheckpointError with the report
    state_dict_mismatch_report(model, state_dict) -> str   '' when everything fits
    CheckpointError

Checkpoint contents are the caller's choice; the convention used by the engine is
``{'model', 'optimizer', 'epoch', 'scaler', 'args': args_to_dict(args), ...}`` -- only tensors and
plain containers, so ``torch.load(weights_only=True)`` can read it. Published checkpoints that
pickled an ``argparse.Namespace`` load too (that one class is allow-listed; it only holds attributes),
and their ``args`` come back as a plain dict.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from utils.dist import is_main_process
from utils.io import atomic_open, fsync_dir

__all__ = [
    'CheckpointError', 'atomic_open', 'atomic_save', 'save_checkpoint', 'find_resume_checkpoint',
    'resolve_resume', 'auto_resume', 'load_checkpoint', 'load_model_state', 'state_dict_mismatch_report',
    'LAST_NAME', 'pick_resume_checkpoint', 'peek_checkpoint', 'remove_stale_temporaries',
]

LAST_NAME = 'checkpoint-last.pth'
_NUMBERED = re.compile(r'^checkpoint-(\d+)\.pth$')


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint cannot be read, is unsafe to read, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


# ----------------------------------------------------------------------------------------------
# writing

def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` behind; a full disk raises
    :class:`utils.io.DiskFullError` naming the file, its size (at least the tensor bytes) and the free space."""
    with atomic_open(path, 'wb', size_hint=_tensor_bytes(obj)) as f:
        torch.save(obj, f)


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts/lists): a lower bound of its saved size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _numbered_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _NUMBERED.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return sorted(found)


def point_last_at(output_dir: Path, target: Path, copy: Callable[[Path, Path], None] | None = None) -> None:
    """Make checkpoint-last.pth refer to ``target`` (a file, or the folder of a sharded checkpoint) in one
    rename, without a second full write when links work; else ``copy(target, last)`` (default: a hard
    link, then an atomic copy of the file)."""
    last = output_dir / LAST_NAME
    tmp = output_dir / f'.{LAST_NAME}.{os.getpid()}.tmp'
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        # A relative symlink survives moving/copying the whole output folder.
        os.symlink(target.name, tmp, target_is_directory=target.is_dir())
    except OSError:
        (copy or _link_or_copy)(target, last)
        return
    if last.is_dir() and not last.is_symlink():
        shutil.rmtree(last)
    os.replace(tmp, last)
    fsync_dir(output_dir)


def _link_or_copy(target: Path, last: Path) -> None:
    tmp = last.with_name(f'.{last.name}.{os.getpid()}.hardlink')
    try:
        os.link(target, tmp)
        os.replace(tmp, last)
    except OSError:
        with open(target, 'rb') as src, atomic_open(last, 'wb') as dst:
            shutil.copyfileobj(src, dst)


def save_checkpoint(output_dir: str | os.PathLike, tag: int | str, state: Mapping[str, Any],
                    keep_last: int | None = None, update_last: bool | None = None) -> Path | None:
    """Atomically write ``state`` to ``output_dir/checkpoint-<tag>.pth`` on the main process.

    Args:
        tag: epoch number, ``'best'`` or ``'last'`` (``'last'`` writes checkpoint-last.pth directly,
            e.g. for mid-epoch saves).
        state: tensors and plain containers only (store args via ``utils.config.args_to_dict``).
        keep_last: keep only the ``keep_last`` newest numbered checkpoints (``best``/``last`` kept).
        update_last: make checkpoint-last.pth refer to this file (default: True unless tag == 'best').
    Returns the written path, or None on non-main ranks (which write nothing).
    """
    if not is_main_process():
        return None
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f'checkpoint-{tag}.pth'
    atomic_save(dict(state), path)
    if update_last is None:
        update_last = str(tag) != 'best'
    if update_last and str(tag) != 'last':
        point_last_at(output_dir, path)
    if keep_last is not None and keep_last > 0:
        numbered = _numbered_checkpoints(output_dir)
        protected = {path.resolve(), (output_dir / LAST_NAME).resolve()}
        for _, old in numbered[:-keep_last]:
            if old.resolve() not in protected:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
    return path


# ----------------------------------------------------------------------------------------------
# resuming

def find_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to auto-resume from: ``checkpoint-last.pth`` if it exists (and is not a broken
    link), else the largest ``checkpoint-<N>.pth``; None when ``output_dir`` has neither. ``best`` is
    never chosen: resuming from it would silently roll training back."""
    if not output_dir:
        return None
    output_dir = Path(output_dir)
    last = output_dir / LAST_NAME
    if last.exists():  # follows the symlink: False for a dangling link
        return last
    numbered = _numbered_checkpoints(output_dir)
    return numbered[-1][1] if numbered else None


def _describe(ck: Mapping[str, Any]) -> str:
    where = ck.get('data_position')
    if where:
        return f"epoch {where.get('epoch')}, step {where.get('step')}, global step {ck.get('global_step')}"
    return f"end of epoch {ck.get('epoch')}, global step {ck.get('global_step')}"


def pick_resume_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Like :func:`find_resume_checkpoint`, but the newest checkpoint that can be read: when
    ``checkpoint-last.pth`` is corrupt (a truncated copy, a bad disk), the newest intact ``checkpoint-N.pth``
    is used instead, and a warning names the corrupt file, the one used and the training that is lost.
    Raises CheckpointError listing every file when none can be read."""
    first = find_resume_checkpoint(output_dir)
    if first is None:
        return None
    tried: list[Path] = []
    failed: list[str] = []
    for path in [first, *(p for _, p in reversed(_numbered_checkpoints(Path(output_dir))))]:
        if any(path.resolve() == t.resolve() for t in tried):
            continue
        tried.append(path)
        try:
            ck = peek_checkpoint(path)
        except CheckpointError as exc:
            failed.append(str(exc))
            continue
        if failed:
            print(f"WARNING: auto-resume: {'; '.join(failed)}.\nResuming from {path} instead ({_describe(ck)}): "
                  f"the training saved after that point in the unreadable file(s) is lost and is done again.",
                  flush=True)
        return path
    raise CheckpointError(f"auto-resume: no checkpoint in {output_dir} can be read:\n  " + '\n  '.join(failed)
                          + '\nMove them away to start from scratch, or give --resume <file>')


def resolve_resume(ck: Any) -> str | None:
    """``ck.resume`` when given (path or URL), else the auto-resume checkpoint of ``ck.output_dir`` when
    ``ck.auto_resume`` (:func:`pick_resume_checkpoint`); None to start from scratch.
    ``ck``: a :class:`utils.config.job.CheckpointConfig`."""
    if getattr(ck, 'resume', ''):
        return str(ck.resume)
    if getattr(ck, 'auto_resume', False) and getattr(ck, 'output_dir', ''):
        found = pick_resume_checkpoint(ck.output_dir)
        return str(found) if found is not None else None
    return None


# Temporary names of this project's writers in an output folder (utils.io.atomic_open: ``.<name>.<random>.tmp``;
# point_last_at: ``.checkpoint-last.pth.<pid>.tmp|.hardlink``; utils.engine.dcp: ``.<name>.tmp/``, ``.<name>.old/``,
# ``.checkpoint-last.pth.copy/``), for the files a run writes there: checkpoints, log.txt, config.yaml.
_STALE = re.compile(r'^\.(checkpoint-[\w.-]+?\.pth\.(\w+\.tmp|\d+\.hardlink|tmp|old|copy)'
                    r'|(log\.txt|config\.yaml)\.\w+\.tmp)$')


def remove_stale_temporaries(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed writes left in ``output_dir`` (only the names above, nothing else) and print each
    one; returns them. Call it at start-up on the main process, before anything is written."""
    folder = Path(output_dir)
    if not output_dir or not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.iterdir()):
        if not _STALE.match(p.name):
            continue
        size = _size(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        print(f"Removed {p.name} ({size / 2**20:.1f} MiB), left in {folder} by an interrupted write")
        removed.append(p)
    return removed


def _size(p: Path) -> int:
    if p.is_symlink():
        return 0
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob('*') if f.is_file())
    return p.stat().st_size


auto_resume = resolve_resume


# ----------------------------------------------------------------------------------------------
# reading

def _download(url: str) -> Path:
    cache = Path(torch.hub.get_dir()) / 'checkpoints'
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / os.path.basename(url.split('?')[0])
    if not target.exists():
        tmp = target.with_name(f'.{target.name}.{os.getpid()}.part')
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, target)
    return target


_GLOBAL = re.compile(r'GLOBAL ([\w.]+)')


def _load_error(p: Path, exc: Exception) -> CheckpointError:
    """Our own message for a failed ``torch.load(weights_only=True)`` of ``p``. Torch's text is never passed
    on: it advises re-running with ``weights_only=False`` or allow-listing the global, i.e. executing
    whatever the file holds."""
    found = _GLOBAL.search(str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
    if found:
        return CheckpointError(
            f'refusing to load checkpoint {p}: it contains a pickled Python object ({found.group(1)}) that could '
            f'run code when loaded. Only tensors and plain containers are read (torch.load with weights_only=True); '
            f're-save the file as a plain '
            f'state dict (torch.save(model.state_dict(), ...)) or as .safetensors')
    size = p.stat().st_size if p.exists() else 0
    return CheckpointError(f'cannot read checkpoint {p} ({size} bytes): not a PyTorch checkpoint, or truncated or '
                           f'corrupted ({type(exc).__name__} while reading it); expected a file written by '
                           f'torch.save or a .safetensors file')


def peek_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path`` with its tensors memory-mapped, not read (cheap even at ViT-L): for
    its ``args``, ``epoch``, ``global_step``, ... A sharded (DCP) directory gives its trainer state. Raises
    CheckpointError like :func:`load_checkpoint` when the file cannot be read."""
    p = Path(path)
    if p.is_dir():
        return load_checkpoint(p / 'trainer_state.pth', mmap=True)
    return load_checkpoint(p, mmap=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = 'cpu', mmap: bool = False) -> dict:
    """Load a checkpoint without ever executing code from it.

    ``.safetensors`` files return their flat ``{name: tensor}`` dict; ``.pth``/``.pt`` files go through
    ``torch.load(weights_only=True)`` (a pickled ``argparse.Namespace`` under ``'args'`` is accepted
    and returned as a dict). https URLs are downloaded to the torch hub cache first.
    Raises CheckpointError naming the file when it is missing, unreadable or would need unpickling
    arbitrary objects. ``mmap``: map the tensors of a ``.pth`` file instead of reading them.
    """
    path_str = os.fspath(path)
    if path_str.startswith(('http://', 'https://')):
        path_str = str(_download(path_str))
    p = Path(path_str)
    if not p.is_file():
        raise CheckpointNotFoundError(f'checkpoint file not found: {p}')
    if p.suffix == '.safetensors':
        from safetensors.torch import load_file
        device = str(map_location) if not isinstance(map_location, str) else map_location
        try:
            return load_file(str(p), device=device)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f'cannot read safetensors checkpoint {p}: {exc}') from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 -- random bytes raise anything from KeyError to UnicodeDecodeError
        raise _load_error(p, exc) from None
    if isinstance(obj, dict) and isinstance(obj.get('args'), argparse.Namespace):
        obj['args'] = dict(vars(obj['args']))
    return obj


# ----------------------------------------------------------------------------------------------
# model fit

def _grid(shape: tuple[int, ...]) -> str:
    if len(shape) == 4:  # MultiMAE pos_emb (1, D, h, w)
        return f'{shape[2]}x{shape[3]} grid'
    if len(shape) == 3:  # timm pos_embed (1, N, D)
        return f'{shape[1]} tokens'
    return str(tuple(shape))


def _likely_cause(key: str, ckpt: tuple[int, ...], model: tuple[int, ...]) -> str:
    name = key.rsplit('.', 1)[-1]
    if name in ('pos_emb', 'pos_embed'):
        width = (ckpt[1], model[1]) if len(ckpt) == 4 else (ckpt[-1], model[-1])
        if len(ckpt) == len(model) and width[0] != width[1]:
            return f'other model width ({width[0]} vs {width[1]})'
        return (f'other image size or patch size: position embedding {_grid(ckpt)} in the checkpoint '
                f'vs {_grid(model)} in the model (interpolate it when fine-tuning)')
    if key.endswith('proj.weight') and len(ckpt) == 4 and len(model) == 4:
        if ckpt[2:] != model[2:]:
            return f'other patch size: {ckpt[2]}x{ckpt[3]} kernel in the checkpoint vs {model[2]}x{model[3]}'
        if ckpt[1] != model[1]:
            return f'other number of input channels ({ckpt[1]} vs {model[1]})'
        return f'other model width ({ckpt[0]} vs {model[0]})'
    if 'class_emb' in key or 'cls_emb' in key:
        return f'other number of classes ({ckpt[0]} vs {model[0]} rows)'
    if 'out_proj' in key:
        return (f'other number of output channels/classes or other patch size ({ckpt[0]} vs {model[0]} '
                f'outputs = channels x (patch_size / stride)^2)')
    if 'head' in key or key.startswith('output_adapters.cls') or '.cls.' in key:
        return f'other number of classes ({ckpt[0]} vs {model[0]})'
    if ckpt and model and len(ckpt) == len(model):
        return f'other model size (dimensions {tuple(ckpt)} vs {tuple(model)})'
    return 'other architecture'


def state_dict_mismatch_report(model: nn.Module | Mapping[str, torch.Tensor],
                               state_dict: Mapping[str, torch.Tensor], max_keys: int = 20) -> str:
    """Human-readable differences between a checkpoint state dict and a model ('' when it fits).

    Shape mismatches name the key, both shapes and a likely cause (image size -> pos_emb, patch
    size -> proj.weight, number of classes -> class_emb/head/out_proj); missing and unexpected keys
    are listed (at most ``max_keys`` each).
    """
    target = model.state_dict() if isinstance(model, nn.Module) else model
    lines = []
    for key, value in state_dict.items():
        if key in target and hasattr(value, 'shape') and tuple(value.shape) != tuple(target[key].shape):
            ck, md = tuple(value.shape), tuple(target[key].shape)
            lines.append(f"shape mismatch for '{key}': checkpoint {list(ck)} vs model {list(md)}; "
                         f'likely cause: {_likely_cause(key, ck, md)}')
    for label, keys in (('missing in checkpoint', [k for k in target if k not in state_dict]),
                        ('unexpected in checkpoint', [k for k in state_dict if k not in target])):
        if keys:
            shown = ', '.join(keys[:max_keys]) + (f', ... ({len(keys) - max_keys} more)' if len(keys) > max_keys else '')
            lines.append(f'{len(keys)} key(s) {label}: {shown}')
    return '\n'.join(lines)


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                     source: str = 'checkpoint') -> tuple[list[str], list[str]]:
    """``model.load_state_dict`` with a useful error: shape mismatches always raise (naming the key,
    both shapes and the likely cause); with ``strict`` missing/unexpected keys raise as well.
    Returns ``(missing_keys, unexpected_keys)``."""
    target = model.state_dict()
    bad_shape = [k for k, v in state_dict.items() if k in target and tuple(v.shape) != tuple(target[k].shape)]
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    if bad_shape or (strict and (missing or unexpected)):
        raise CheckpointError(f'{source} does not fit {type(model).__name__}:\n'
                              + state_dict_mismatch_report(target, state_dict))
    result = model.load_state_dict(state_dict, strict=strict)
    return list(result.missing_keys), list(result.unexpected_keys)
