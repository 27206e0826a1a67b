"""Typed, frozen run configurations: what the entry layer hands to the library.

An entry script parses command line + YAML once (:func:`utils.config.parse_args`) and freezes the result
into its job's config class (a frozen dataclass whose fields are exactly the script's arguments, declared
next to the method or task that reads them)::

    cfg = parse_config(get_args_parser(), PretrainConfig, validate=...)
    cfg.batch_size            # the job's own fields, typed
    cfg.optim.blr             # shared sections, built from the same fields (absent ones: section defaults)

Shared infrastructure takes the sections it needs (:class:`OptimConfig`, :class:`CheckpointConfig`,
:class:`RuntimeConfig`, :class:`DistConfig`, :class:`WandbConfig`); runtime facts (rank, world size,
device, the resolved precision) live in :class:`utils.dist.DistContext`, never in the config.
``cfg.to_dict()`` is the flat plain dict stored in checkpoints and ``config.yaml`` (the same keys as the
command line), so checkpoints written before and after this layer read the same.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, TypeVar

__all__ = ["OptimConfig", "CheckpointConfig", "RuntimeConfig", "DistConfig", "WandbConfig", "JobConfig"]

T = TypeVar("T", bound="JobConfig")
S = TypeVar("S")


def _section(cls: type[S], values: Mapping[str, Any]) -> S:
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule. ``lr``/``blr``: absolute or base learning rate (``lr = blr * batch / 256``);
    ``layer_decay``/``no_lr_scale_list``/``scale_input_lr`` only where the script declares them."""
    opt: str = "adamw"
    opt_eps: float | None = 1e-8
    opt_betas: tuple[float, ...] | None = None
    clip_grad: float | None = None
    skip_grad: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    decoder_decay: float | None = None
    lr: float | None = None
    blr: float | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    layer_decay: float | None = None
    no_lr_scale_list: str | None = None
    scale_input_lr: bool = True  # scripts without the flag (semseg) decay the input adapters too
    warmup_epochs: int = 5
    warmup_steps: int = -1


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go and when they are written; ``keep_last=None`` keeps every numbered one."""
    output_dir: str = ""
    resume: str = ""
    auto_resume: bool = True
    start_epoch: int = 0
    save_ckpt_freq: int = 20
    save_ckpt: bool = True
    keep_last: int | None = None
    save_every_steps: int = 0
    allow_config_change: bool = False


@dataclass(frozen=True)
class RuntimeConfig:
    """Device and execution; fault policies (``on_bad_sample``, ``skip_nonfinite``)."""
    device: str = "cuda"
    seed: int = 0
    num_workers: int = 10
    pin_mem: bool = True
    amp: str = "fp16"
    compile: bool = False
    grad_ckpt: bool = False
    tf32: bool = True
    print_freq: int = 10
    deterministic: bool = False
    show_user_warnings: bool = False
    on_bad_sample: str = "error"
    skip_nonfinite: int = 0


@dataclass(frozen=True)
class DistConfig:
    """How to join a process group (the launcher's environment decides rank and world size)."""
    world_size: int = 1
    local_rank: int = -1
    dist_on_itp: bool = False
    dist_url: str = "env://"
    dist_backend: str | None = None
    dist_timeout: float = 30.0  # minutes before a collective gives up (a stopped or hung rank)
    find_unused_params: bool = False
    fsdp: bool = False  # FSDP2 sharding instead of DDP (utils.engine.fsdp); DCP checkpoints (utils.engine.dcp)


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""
    log_wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    log_images_wandb: bool = False
    log_images_freq: int = 10


class _Section:
    """``cfg.<name>``: the fields of one section (a frozen dataclass ``cls``) of the job config, built on
    first access and kept in the instance (like ``functools.cached_property``, which frozen dataclasses allow)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__.get(self.name)
        if value is None:
            value = obj.__dict__[self.name] = _section(self.cls, obj.__dict__)
        return value


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class JobConfig(WandbConfig, DistConfig, RuntimeConfig, CheckpointConfig, OptimConfig):
    """Base of every job's config: the fields of every shared section, plus the YAML files it was read
    from. A job's class adds its own arguments; ``omitted`` names the shared fields its script does not
    declare (they keep their section defaults and are left out of :meth:`to_dict`)."""
    omitted: ClassVar[frozenset[str]] = frozenset()
    config: tuple[str, ...] = ()

    @classmethod
    def from_namespace(cls: type[T], ns: argparse.Namespace | Mapping[str, Any]) -> T:
        """Freeze parsed arguments; every declared field must be present and nothing else (a mismatch
        between the parser and this class is a programming error, reported with the names)."""
        values = dict(vars(ns) if isinstance(ns, argparse.Namespace) else ns)
        names = {f.name for f in fields(cls)} - cls.omitted
        missing, extra = sorted(names - set(values)), sorted(set(values) - names)
        if missing or extra:
            raise TypeError(f"{cls.__name__} does not match the parser: fields without an argument {missing}, "
                            f"arguments without a field {extra}")
        return cls(**{k: _freeze(v) for k, v in values.items()})

    @classmethod
    def defaults(cls: type[T], **overrides: Any) -> T:
        """The config with every default, for programmatic use and tests."""
        return dataclasses.replace(cls(), **overrides) if overrides else cls()

    def replace(self: T, **changes: Any) -> T:
        """A copy with ``changes`` (the config itself never changes)."""
        return dataclasses.replace(self, **{k: _freeze(v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        """Flat plain dict with the command-line keys (lists, not tuples): checkpoints, config.yaml, W&B."""
        return {f.name: _thaw(getattr(self, f.name)) for f in fields(self) if f.name not in self.omitted}

    def get(self, key: str, default: Any = None) -> Any:
        """A field that only some jobs declare (``cfg.get('fp16')``)."""
        return getattr(self, key, default)

    # The shared sections as their own frozen objects, made once per config: cfg.optim, cfg.checkpoint, ...
    optim = _Section(OptimConfig)
    checkpoint = _Section(CheckpointConfig)
    runtime = _Section(RuntimeConfig)
    dist = _Section(DistConfig)
    wandb = _Section(WandbConfig)
