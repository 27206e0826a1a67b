"""Start-up checks of the configuration: one clear line per problem, before any data is read or any
process group is created.

``utils.config.parse_args`` always runs :func:`check_shared_args` (the arguments of the shared groups:
checkpointing, runtime, optimizer, distributed); a script adds its own cross-argument checks through the
``validate`` hook, e.g. the pre-training script::

    args = parse_args(get_args_parser(), validate=[validate_pretrain_args, check_pretrain_args])

Every check only looks at arguments the parser declared (``getattr`` with a default), so the same
functions serve every script. Checks return a list of error strings; nothing here raises for a bad value.

Public API:
    check_shared_args(args) -> list[str]       counts and frequencies in range, --resume / --finetune
                                               files exist, output_dir is not a file, optimizer values
    check_pretrain_args(args) -> list[str]     data folders of every domain exist, model registered,
                                               patch size vs. modality strides, decoder heads, ...
    check_path_exists(flag, path, kind) -> str | None
    check_weights_file(flag, path) -> str | None  a local weights file exists, is readable, looks like one
    check_split_folders(args, flags) -> list[str] the data split folders that are set exist

The checks that read the disk only list folders and read a file's first bytes: a missing or unreadable
file or folder ends the start-up with exit code 2 before a process group, a model or ``output_dir``
exist, like any other configuration error.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Iterable

from utils.config.names import closest, split_list

__all__ = ['check_shared_args', 'check_pretrain_args', 'check_path_exists', 'check_weights_file',
           'check_split_folders']

_URL_PREFIXES = ('http://', 'https://')


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _at_least(args: argparse.Namespace, names: Iterable[str], minimum: float, allow_none: bool = True) -> list[str]:
    errors = []
    for name in names:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        if value is None or value < minimum:
            errors.append(f'--{name} must be >= {minimum:g}, got {value}')
    return errors


def check_path_exists(flag: str, path: str | None, kind: str = 'file') -> str | None:
    """An error line when ``path`` (a local path; URLs pass) is set but is not an existing ``kind``
    ('file' or 'folder'), else None."""
    if not path or str(path).startswith(_URL_PREFIXES):
        return None
    ok = os.path.isfile(path) if kind == 'file' else os.path.isdir(path)
    if ok:
        return None
    what = 'checkpoint file' if kind == 'file' else 'folder'
    if os.path.exists(path):
        return f"--{flag}: '{path}' is not a {'file' if kind == 'file' else 'folder'}"
    return f"--{flag}: {what} not found: '{path}'"


# First bytes of the weight files the loaders read: torch.save's zip archive, its older pickle format
# (protocol 2+), numpy's / timm's zip variants share the first; safetensors starts with an 8-byte header size.
_ZIP, _PICKLE = b'PK\x03\x04', b'\x80'


def check_weights_file(flag: str, path: str | None) -> str | None:
    """An error line when the local weights file ``--<flag>`` is missing, unreadable or clearly not a
    checkpoint (its first bytes are none of torch.save's zip or pickle formats nor a safetensors header);
    URLs and unset values pass. Reads 16 bytes: the real load happens later."""
    if path and os.path.isfile(os.path.join(str(path), '.metadata')):
        return None  # a sharded (DCP) checkpoint directory of an --fsdp run
    missing = check_path_exists(flag, path, 'file')
    if missing or not path or str(path).startswith(_URL_PREFIXES):
        return missing
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
    except OSError as exc:
        return f"--{flag}: cannot read '{path}': {exc.strerror or exc}"
    if head.startswith((_ZIP, _PICKLE)):
        return None
    if len(head) >= 9 and 2 <= int.from_bytes(head[:8], 'little') < 1 << 30 and head[8:9] == b'{':
        return None  # safetensors: JSON header after its length
    size = os.path.getsize(path)
    return (f"--{flag}: '{path}' ({size} bytes) is not a checkpoint: expected a file written by torch.save "
            f"(zip or pickle) or a .safetensors file" + (' (it is empty)' if size == 0 else ''))


def check_split_folders(args: Any, flags: Iterable[str]) -> list[str]:
    """One error line per data split folder ``--<flag>`` that is set but is not an existing folder (tar
    shards, a pattern, a manifest or a URL of them, are read as a stream and pass)."""
    from utils.data.shard_format import is_shard_source

    paths = {f: _get(args, f) for f in flags}
    return [e for e in (check_path_exists(f, p, 'folder') for f, p in paths.items() if not is_shard_source(p)) if e]


def require_data_path(flag: str, path: str | None, demo: str = 'data/synthetic/train') -> str | None:
    """An error line when the split folder ``--<flag>`` is not given (no demo data is used behind a
    user's back: the demo's own configs name their folders), else None."""
    if path:
        return None
    return f"--{flag} is required: a split folder with <modality>/<class>/<image> (for the demo: {demo})"


def check_shared_args(args: argparse.Namespace) -> list[str]:
    """Checks of the arguments declared by ``utils.config``'s shared groups (absent ones are skipped)."""
    errors = []
    errors += _at_least(args, ['keep_last', 'save_ckpt_freq', 'print_freq', 'world_size'], 1)
    errors += _at_least(args, ['save_every_steps', 'skip_nonfinite', 'num_workers', 'start_epoch',
                               'warmup_epochs', 'weight_decay', 'weight_decay_end', 'min_lr', 'warmup_lr',
                               'opt_eps', 'momentum'], 0)
    for name in ('lr', 'blr', 'clip_grad', 'skip_grad'):
        value = _get(args, name)
        if value is not None and value <= 0:
            errors.append(f'--{name} must be > 0, got {value}' + (' (leave it unset to disable)'
                                                                  if name in ('clip_grad', 'skip_grad') else ''))
    timeout = _get(args, 'dist_timeout')
    if timeout is not None and timeout <= 0:
        errors.append(f'--dist_timeout is in minutes and must be > 0, got {timeout}')
    betas = _get(args, 'opt_betas')
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        errors.append(f'--opt_betas takes two values in [0, 1), got {betas}')
    layer_decay = _get(args, 'layer_decay')
    if layer_decay is not None and not 0 < layer_decay <= 1:
        errors.append(f'--layer_decay must be in (0, 1], got {layer_decay}')
    resume = _get(args, 'resume')
    sharded = bool(resume) and os.path.isfile(os.path.join(str(resume), '.metadata'))  # an --fsdp (DCP) checkpoint
    err = None if sharded else check_path_exists('resume', resume, 'file')
    if err:
        errors.append(err)
    err = check_weights_file('finetune', _get(args, 'finetune'))
    if err:
        errors.append(err)
    opt = _get(args, 'opt')
    if opt is not None:
        from utils.engine.optim import optimizer_name_error  # the engine is above the config layer

        err = optimizer_name_error(opt)
        if err:
            errors.append(err)
    out = _get(args, 'output_dir')
    if out and os.path.exists(out) and not os.path.isdir(out):
        errors.append(f"--output_dir '{out}' exists and is not a folder")
    return errors


def check_pretrain_args(args: argparse.Namespace) -> list[str]:
    """Pre-training checks beyond ``utils.pretrain.multimae.validate_pretrain_args``: the model name, the data
    folders of every domain, patch size vs. the modalities' stride levels, attention head counts and value
    ranges. Unknown modality names are left to ``validate_pretrain_args`` (one line per problem)."""
    from multimae import is_model, list_models
    from utils.data.modalities import MODALITIES, ordered_domains
    from utils.data.shard_format import is_shard_source

    errors = []
    model = _get(args, 'model')
    if model is not None and not is_model(model):
        hint = closest(model, list_models())
        errors.append(f"--model '{model}' is not a registered model" + (f"; did you mean '{hint}'?" if hint else '')
                      + f" (registered: {', '.join(m for m in list_models() if 'multimae' in m)})")
    ins, outs = split_list(_get(args, 'in_domains')), split_list(_get(args, 'out_domains'))
    domains = [d for d in ordered_domains(ins, outs) if d in MODALITIES]
    patch = _get(args, 'patch_size')
    for d in dict.fromkeys(ins):
        stride = MODALITIES[d].stride_level if d in MODALITIES else 1
        if patch and patch % stride:
            errors.append(f"--patch_size {patch} is not divisible by the stride level {stride} of '{d}' "
                          f"(its patches are {patch}/{stride} pixels wide)")
    for dim, heads in (('decoder_dim', 'decoder_num_heads'), ('encoder_dim', 'encoder_num_heads')):
        d, h = _get(args, dim), _get(args, heads)
        if d is not None and h is not None and h >= 1 and d % h:
            errors.append(f'--{dim} {d} is not divisible by --{heads} {h}')
    errors += _at_least(args, ['decoder_num_heads', 'max_steps_per_epoch'], 1)
    errors += _at_least(args, ['decoder_depth', 'num_global_tokens', 'save_vis_freq', 'num_vis',
                               'balancer_lr_scale', 'drop_path'], 0)
    hflip = _get(args, 'hflip')
    if hflip is not None and not 0 <= hflip <= 1:
        errors.append(f'--hflip is a probability in [0, 1], got {hflip}')
    alphas = _get(args, 'alphas')
    if alphas is not None and alphas <= 0:
        errors.append(f'--alphas (Dirichlet concentration) must be > 0, got {alphas}')
    data = _get(args, 'data_path')
    if is_shard_source(data):  # a manifest, .tar files, a brace pattern or pipe: command: utils/data/shards.py
        return errors
    err = require_data_path('data_path', data) or check_path_exists('data_path', data, 'folder')
    if err:
        errors.append(err if not data else err + ' (expected <data_path>/<modality>/<class>/<image>)')
    elif data:
        missing = [d for d in domains if not os.path.isdir(os.path.join(data, d))]
        if missing:
            present = sorted(e.name for e in os.scandir(data) if e.is_dir())
            errors.append(f"--data_path '{data}' has no folder for domain(s) {missing} "
                          f"(present: {present or 'nothing'})")
        elif domains:
            errors += _modality_file_errors(data, domains)
    return errors


def _modality_file_errors(data: str, domains: list[str]) -> list[str]:
    """The pairing of the domains' files under ``data`` (a folder of images, not shards), checked by the
    dataset class the job reads them with: it lists the folders and opens no file."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.shard_format import is_shard_source

    if is_shard_source(data):
        return []
    try:
        MultiModalImageFolder(data, domains)
    except (FileNotFoundError, ValueError) as exc:
        return [f'--data_path: {exc}']
    return []
