"""Which configuration changes an automatic resume accepts.

A run resumed from its own ``output_dir`` must be the run that wrote the checkpoints: re-running a finished
seed-0 command with ``--seed 1`` must not "resume" it and relabel it as seed 1. :func:`config_changes` lists
the keys whose value differs between the checkpoint's ``args`` and the new configuration, leaving out the
keys in :data:`HARMLESS_KEYS` (where files go, how fast data is read, what is logged and how often, how the
processes are launched: nothing that changes the numbers the run computes). The runner refuses the others
(exit code 2) unless ``--allow_config_change`` is given.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

__all__ = ["HARMLESS_KEYS", "config_changes", "format_changes"]

# The one allow-list: keys that may differ between the run that wrote a checkpoint and the run resuming it.
HARMLESS_KEYS: frozenset[str] = frozenset({
    # files and resuming
    "config", "output_dir", "resume", "auto_resume", "start_epoch", "allow_config_change", "save_ckpt",
    "save_ckpt_freq", "keep_last", "save_every_steps",
    # data reading and execution speed (same numbers)
    "device", "num_workers", "pin_mem", "compile", "grad_ckpt", "model_ema_force_cpu",
    # logging, pictures and evaluation frequency
    "print_freq", "show_user_warnings", "save_vis_freq", "num_vis", "eval_freq", "log_images_freq",
    "log_wandb", "log_images_wandb", "wandb_project", "wandb_entity", "wandb_run_name", "wandb_group",
    # evaluation-only modes and the final test (they do not change training)
    "eval", "test", "dist_eval", "test_data_path", "max_test_images",
    # launching and fault policies
    "world_size", "local_rank", "dist_on_itp", "dist_url", "dist_backend", "dist_timeout", "find_unused_params",
    "on_bad_sample", "skip_nonfinite", "stop_check_every",
    # resolved by the run and stored beside the config in checkpoints ('args'), not arguments
    "rank", "gpu", "distributed",
})


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for the keys of both ``old`` (a checkpoint's ``args``) and ``new``
    whose values differ, except :data:`HARMLESS_KEYS`. Keys only one side has (an older or newer code
    version) are not compared. Lists and tuples compare equal element by element."""
    changed = {}
    for key in sorted(set(old) & set(new) - HARMLESS_KEYS):
        a, b = _plain(old[key]), _plain(new[key])
        if a != b:
            changed[key] = (a, b)
    return changed


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """One ``key: old -> new`` line per change (values as JSON, so strings are quoted)."""
    return "\n".join(f"  - {k}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}"
                     for k, (a, b) in changes.items())
