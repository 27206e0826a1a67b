"""Writing a resolved configuration: plain-type dicts (checkpoint-safe) and ``config.yaml`` files that can be
given back with ``-c``."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from utils.config.yaml_values import CONFIG_DEST
from utils.io import atomic_open


def _plain(value: Any) -> Any:
    """Recursively convert to str/int/float/bool/None/list/dict."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, argparse.Namespace):
        return {str(k): _plain(v) for k, v in vars(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, 'tolist'):  # numpy/torch scalars and arrays
        return _plain(value.tolist())
    if hasattr(value, 'item'):
        return _plain(value.item())
    return str(value)  # torch.device, torch.dtype, enums, ...


def args_to_dict(args: Any) -> dict:
    """Plain ``dict`` of the arguments (a Namespace, a typed config or a mapping; nested values converted to
    str/int/float/bool/None/list/dict), safe to store in checkpoints loaded with ``weights_only=True``."""
    if hasattr(args, 'to_dict'):
        return _plain(args.to_dict())
    return _plain(vars(args) if isinstance(args, argparse.Namespace) else dict(args))


def _dump_entry(key: str, value: Any) -> str:
    # One key at a time keeps short lists on one line (opt_betas: [0.9, 0.95]) and everything else block.
    if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
        return f'{key}: ' + yaml.safe_dump(value, default_flow_style=True, width=1000).strip() + '\n'
    return yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=1000)


def save_config(args: argparse.Namespace, output_dir: str | os.PathLike,
                filename: str = 'config.yaml') -> Path:
    """Write the resolved configuration to ``output_dir/filename`` (atomically) and return the path.

    The file can be given back with ``-c`` to reproduce the run. Values that are not declared
    arguments (set by the script at run time: ``lr`` computed from ``blr``, ``rank``, ``distributed``
    ...) are written as comments so that reloading does not trip over them.
    """

    data = args_to_dict(args)
    data.pop(CONFIG_DEST, None)
    declared = getattr(args, '_declared', None)
    if declared is None:
        declared_set = set(data)
    else:
        declared_set = set(declared)
    main = {k: v for k, v in data.items() if k in declared_set}
    derived = {k: v for k, v in data.items() if k not in declared_set}
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else '<script>'
    lines = [f'# Resolved configuration (command line > YAML > defaults) of {script}.',
             f'# Reproduce with: python {script} -c {filename}']
    text = '\n'.join(lines) + '\n' + ''.join(_dump_entry(k, v) for k, v in main.items())
    if derived:
        dumped = ''.join(_dump_entry(k, v) for k, v in derived.items())
        text += '# Set at run time (not arguments):\n' + ''.join(f'# {line}\n' for line in dumped.splitlines())
    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, 'w') as f:
        f.write(text)
    return path
