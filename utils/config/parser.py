"""Command-line + YAML configuration shared by every entry script.

A script declares its arguments with argparse, then calls :func:`parse_args`::

    parser = create_parser('MultiMAE pre-training')          # adds -c/--config, no abbreviations
    parser.add_argument('--batch_size', type=int, default=256)
    add_bool_arg(parser, 'standardize_depth', False, 'truncated per-image depth standardisation')
    add_optim_args(parser, opt_betas=[0.9, 0.95], blr=1e-4, warmup_epochs=40, layer_decay=OMIT)
    add_checkpoint_args(parser); add_runtime_args(parser); add_dist_args(parser); add_wandb_args(parser)
    args = parse_args(parser, validate=my_checks)             # my_checks(args) -> list[str] of errors
    save_config(args, args.output_dir)                        # output_dir/config.yaml, feed back with -c

Precedence: command line > YAML files (``-c a.yaml [b.yaml ...]``, later files win) > argparse defaults.
Every YAML key must be a declared argument (its ``dest``); values go through the argument's ``type``,
``choices`` and ``nargs`` (``'1e-4'`` becomes a float, ``opt_betas: [0.9, 0.95]`` a list of floats,
booleans must be YAML booleans, ``null`` only where the default is ``None``). All problems -- unknown
keys (with the closest valid name), wrong types, and the errors returned by ``validate`` -- are reported
together, one line each, before anything else happens.

Public API:
    create_parser(description) -> ArgumentParser
    add_bool_arg(parser, name, default, help='', no_name=None)      # --name / --no_name pair
    add_optim_args / add_checkpoint_args / add_runtime_args / add_dist_args / add_wandb_args
        (parser, **overrides): shared argument groups; an override changes a default, ``OMIT`` drops
        an argument; optional members (default OMIT) are declared only when given a default.
    parse_args(parser, argv=None, validate=None, exit_on_error=True) -> argparse.Namespace
    load_yaml_config(parser, path) -> dict                          # checked + converted values
    save_config(args, output_dir, filename='config.yaml') -> Path
    args_to_dict(args) -> dict                                      # plain types only (weights_only safe)
    split_list(value, sep='-') -> list[str]                         # 'rgb-depth' -> ['rgb', 'depth']
    check_list_arg(args, key, valid, sep='-') -> list[str]          # validator helper for list args
    closest(name, candidates) -> str | None                         # difflib suggestion
    ConfigError                                                     # raised when exit_on_error=False

Hyphen-separated list arguments (``in_domains: rgb-depth-semseg``) stay strings, as the configs write
them; use :func:`split_list` to read them. Every boolean is a ``--x/--no_x`` pair, so a flag whose
default is True (``--decoder_use_task_queries``...) can be turned off from the command line.
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Callable, Iterable, Sequence

from utils.config.checks import check_shared_args
from utils.config.names import closest, split_list
from utils.config.saving import args_to_dict, save_config
from utils.config.yaml_values import (CONFIG_DEST, ConfigError, _actions_by_dest, _check_config, _read_yaml,
                                      load_yaml_config)

__all__ = [
    'OMIT', 'ConfigError', 'create_parser', 'add_bool_arg', 'add_arg_group', 'add_optim_args', 'add_checkpoint_args',
    'add_runtime_args', 'add_dist_args', 'add_wandb_args', 'parse_args', 'load_yaml_config',
    'save_config', 'args_to_dict', 'split_list', 'check_list_arg', 'closest',
]

Validator = Callable[[argparse.Namespace], Iterable[str]]


class _Omit:
    def __repr__(self) -> str:
        return 'OMIT'


OMIT: Any = _Omit()
"""Pass as an override (``add_optim_args(p, layer_decay=OMIT)``) to leave an argument out."""


class _ResolvedArgs(argparse.Namespace):
    # The slot keeps the list of declared arguments out of vars(args), so it never shows up in
    # configs, checkpoints or W&B, while save_config can still tell arguments from derived values.
    __slots__ = ('_declared',)

    def __repr__(self) -> str:
        return 'Namespace(' + ', '.join(f'{k}={v!r}' for k, v in vars(self).items()) + ')'


# ----------------------------------------------------------------------------------------------
# declaring arguments

def create_parser(description: str = '') -> argparse.ArgumentParser:
    """An ArgumentParser with ``-c/--config`` and without prefix abbreviations (``--lr`` must not
    silently match ``--lr_scale``)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False, formatter_class=DefaultsHelpFormatter)
    _ensure_config_arg(parser)
    return parser


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` that states every default: ``(default: X)`` is appended to each option whose help does
    not already name it (booleans say it themselves; the ``--no_x`` halves and ``--help`` are left alone).
    Choices are shown by argparse itself (``{auto,bf16,fp16,none}``); ``--model`` lists the registered
    models of its kind (those sharing the default's prefix, e.g. every ``pretrain_multimae_*``)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.option_strings and not action.help and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)  # argparse prints nothing for an option without help text
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or '').strip()
        if action.dest == 'model' and isinstance(action.default, str) and 'registered:' not in text:
            from multimae import list_models
            kind = action.default.rsplit('_', 1)[0]
            text = f"{text}; registered: {', '.join(m for m in list_models() if m.startswith(kind))}".lstrip('; ')
        if ('default' in text or action.default is argparse.SUPPRESS or not action.option_strings
                or isinstance(action, (argparse._StoreFalseAction, argparse._HelpAction))):
            return text
        return f'{text} (default: %(default)s)'.strip()


def _ensure_config_arg(parser: argparse.ArgumentParser) -> None:
    if '--config' not in parser._option_string_actions:
        parser.add_argument('-c', '--config', dest=CONFIG_DEST, nargs='+', action='extend', default=[],
                            metavar='FILE', help='YAML config file(s); later files and the command line win')


def add_bool_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, default: bool,
                 help: str = '', no_name: str | None = None) -> None:
    """Declare ``--name`` (sets True) and ``--no_name`` (sets False), both writing ``args.name``.

    ``no_name`` overrides the negative flag for pairs named otherwise, such as
    ``--use_mask_valid/--no_mask_valid``.
    """
    neg = no_name or f'no_{name}'
    parser.add_argument(f'--{name}', dest=name, action='store_true', default=default,
                        help=f'{help} (default: {default})'.strip())
    parser.add_argument(f'--{neg}', dest=name, action='store_false', default=default,
                        help=f'turn off --{name}')


def add_arg_group(parser: argparse.ArgumentParser, title: str, specs: dict[str, tuple[Any, dict]],
                  overrides: dict[str, Any]) -> None:
    """Add ``specs`` (name -> (default, argparse kwargs)) as an argument group, with a script's own
    defaults from ``overrides``; an override naming no argument is an error suggesting the closest name."""
    unknown = sorted(set(overrides) - set(specs))
    if unknown:
        hint = closest(unknown[0], specs)
        raise TypeError(f"{title} arguments: unknown override '{unknown[0]}'"
                        + (f"; did you mean '{hint}'?" if hint else ''))
    group = parser.add_argument_group(title)
    for name, (default, kw) in specs.items():
        default = overrides.get(name, default)
        if default is OMIT:
            continue
        kw = dict(kw)
        if kw.pop('bool', False):
            add_bool_arg(group, name, bool(default), kw.get('help', ''), kw.get('no_name'))
            continue
        flags = [f'--{name}'] + kw.pop('aliases', [])
        group.add_argument(*flags, dest=name, default=default, **kw)


def add_optim_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Optimizer and schedule arguments. Pass each script's defaults as overrides.

    Always declared: opt, opt_eps, opt_betas, clip_grad, skip_grad, momentum, weight_decay,
    weight_decay_end, decoder_decay, warmup_lr, min_lr, warmup_epochs, warmup_steps.
    Optional (declare by giving a default): lr (absolute), blr (lr = blr * total_batch / 256),
    layer_decay, no_lr_scale_list, scale_input_lr (bool).
    """
    specs = {
        'opt': ('adamw', dict(type=str, help='optimizer (adamw, adam, sgd, momentum, nesterov, or a timm name)')),
        'opt_eps': (1e-8, dict(type=float, help='optimizer epsilon')),
        'opt_betas': (None, dict(type=float, nargs='+', metavar='BETA', help='optimizer betas (None: torch default)')),
        'clip_grad': (None, dict(type=float, help='clip the gradient norm to this value (None: no clipping)')),
        'skip_grad': (None, dict(type=float, help='skip the optimizer step when the gradient norm >= this')),
        'momentum': (0.9, dict(type=float, help='SGD momentum')),
        'weight_decay': (0.05, dict(type=float, help='weight decay (start of its cosine schedule)')),
        'weight_decay_end': (None, dict(type=float, help='final weight decay (None: constant)')),
        'decoder_decay': (None, dict(type=float, help='published, unused')),
        'lr': (OMIT, dict(type=float, help='peak learning rate (absolute)')),
        'blr': (OMIT, dict(type=float, help='base learning rate: lr = blr * total_batch_size / 256')),
        'warmup_lr': (1e-6, dict(type=float, help='learning rate at the start of warm-up')),
        'min_lr': (0.0, dict(type=float, help='final learning rate of the cosine schedule')),
        'layer_decay': (OMIT, dict(type=float, help='layer-wise learning-rate decay (1.0: none)')),
        'no_lr_scale_list': (OMIT, dict(type=str, help='hyphen list of parameter names exempt from layer decay')),
        'scale_input_lr': (OMIT, dict(bool=True, help='apply layer decay to the input adapters')),
        'warmup_epochs': (5, dict(type=int, help='linear warm-up epochs')),
        'warmup_steps': (-1, dict(type=int, help='linear warm-up iterations (overrides warmup_epochs if > 0)')),
    }
    add_arg_group(parser, 'optimizer', specs, overrides)


def add_checkpoint_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Output/checkpoint arguments: output_dir, resume, auto_resume (bool), start_epoch, save_ckpt_freq,
    keep_last (None = keep all numbered checkpoints), save_every_steps (0 = only at epoch ends),
    allow_config_change (bool: auto-resume accepts a changed configuration, see utils.config.changes); optional: save_ckpt (bool, fine-tuning)."""
    specs = {
        'output_dir': ('', dict(type=str, help='where checkpoints, logs and config.yaml go')),
        'resume': ('', dict(type=str, help='checkpoint to resume from (path or https URL)')),
        'auto_resume': (True, dict(bool=True, help='resume from the newest checkpoint in output_dir')),
        'start_epoch': (0, dict(type=int, help='first epoch (overwritten on resume)')),
        'save_ckpt_freq': (20, dict(type=int, help='save a checkpoint every N epochs (and at the end)')),
        'save_ckpt': (OMIT, dict(bool=True, help='save checkpoints')),
        'keep_last': (None, dict(type=int, help='keep only the K newest numbered checkpoints')),
        'save_every_steps': (0, dict(type=int, help='also save checkpoint-last.pth every N steps (0: off)')),
        'allow_config_change': (False, dict(bool=True, help='let auto-resume continue a run whose checkpoint was '
                                                            'written with other settings (logged)')),
    }
    add_arg_group(parser, 'checkpointing', specs, overrides)


def add_runtime_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Device and execution arguments: device, seed, num_workers, pin_mem (bool), amp
    ('bf16'|'fp16'|'none'), compile (bool), grad_ckpt (bool), print_freq, deterministic (bool),
    tf32 (bool), show_user_warnings (bool); fault handling: on_bad_sample ('error'|'skip'), skip_nonfinite (int)."""
    specs = {
        'device': ('cuda', dict(type=str, help="device ('cuda' falls back to cpu when unavailable)")),
        'seed': (0, dict(type=int, help='random seed (each rank adds its rank)')),
        'num_workers': (10, dict(type=int, help='data-loader workers per process')),
        'pin_mem': (True, dict(bool=True, help='pin host memory for faster copies to the GPU')),
        'amp': ('fp16', dict(type=str, choices=['bf16', 'fp16', 'none'],
                             help='mixed precision (GradScaler only for fp16)')),
        'compile': (False, dict(bool=True, help='torch.compile the model')),
        'grad_ckpt': (False, dict(bool=True, help='activation (gradient) checkpointing in the encoder')),
        'print_freq': (10, dict(type=int, help='console log line every N steps')),
        'deterministic': (False, dict(bool=True, help='deterministic algorithms (bit-exact resume)')),
        'tf32': (True, dict(bool=True, help='TF32 tensor cores for float32 matmuls/convolutions on CUDA')),
        'show_user_warnings': (False, dict(bool=True, help='show Python UserWarnings')),
        'on_bad_sample': ('error', dict(type=str, choices=['error', 'skip'],
                                        help='unreadable/inconsistent sample: stop naming the file, or log it, '
                                             'use the next sample instead and count it')),
        'skip_nonfinite': (0, dict(type=int, help='skip up to N optimizer steps whose loss or gradient is '
                                                  'NaN/inf (0: stop at the first one)')),
    }
    add_arg_group(parser, 'runtime', specs, overrides)


def add_dist_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Distributed arguments: world_size, local_rank (also --local-rank), dist_on_itp (bool),
    dist_url, dist_backend (None = nccl on CUDA, gloo otherwise), dist_timeout (minutes), find_unused_params
    (bool), fsdp (bool)."""
    specs = {
        'world_size': (1, dict(type=int, help='number of processes (read from the launcher environment)')),
        'local_rank': (-1, dict(type=int, aliases=['--local-rank'], help='set by torch.distributed.launch')),
        'dist_on_itp': (False, dict(bool=True, help='read rank/world size from OpenMPI variables')),
        'dist_url': ('env://', dict(type=str, help='process-group init method')),
        'dist_backend': (None, dict(type=str, choices=['nccl', 'gloo'], help='default: nccl on CUDA, else gloo')),
        'dist_timeout': (30.0, dict(type=float, help='minutes a collective waits for the other ranks before the '
                                                     'run fails naming the missing ones (torch default: 30)')),
        'find_unused_params': (False, dict(bool=True, help='DDP find_unused_parameters (forced on for heads '
                                                           'that need it: DPT)')),
        'fsdp': (False, dict(bool=True, help='shard parameters, gradients and optimizer state (FSDP2) instead '
                                             'of DDP; checkpoints become DCP directories')),
    }
    add_arg_group(parser, 'distributed', specs, overrides)


def add_wandb_args(parser: argparse.ArgumentParser, **overrides: Any) -> None:
    """Weights & Biases arguments: log_wandb (bool), wandb_project, wandb_entity, wandb_run_name,
    wandb_group; optional: log_images_wandb (bool), log_images_freq (int)."""
    specs = {
        'log_wandb': (False, dict(bool=True, help='log to Weights & Biases (rank 0)')),
        'wandb_project': (None, dict(type=str, help='W&B project')),
        'wandb_entity': (None, dict(type=str, help='W&B entity (user or team)')),
        'wandb_run_name': (None, dict(type=str, help='W&B run name')),
        'wandb_group': (None, dict(type=str, help='W&B group')),
        'log_images_wandb': (OMIT, dict(bool=True, help='log prediction images to W&B')),
        'log_images_freq': (OMIT, dict(type=int, help='log images every N epochs')),
    }
    add_arg_group(parser, 'wandb', specs, overrides)


# ----------------------------------------------------------------------------------------------
# parsing

def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               validate: Validator | Sequence[Validator] | None = None,
               exit_on_error: bool = True, config_class: type | None = None,
               prepare: Callable[[argparse.Namespace], argparse.Namespace] | None = None) -> Any:
    """Parse ``argv`` (default ``sys.argv[1:]``) with YAML configs from ``-c/--config``.

    Precedence: command line > YAML (later files win) > parser defaults. ``validate(args)`` returns a
    list of error strings (checks across arguments, e.g. ``num_encoded_tokens`` vs. token count);
    all errors are collected. With ``exit_on_error`` they are printed one per line and the process
    exits with status 2, otherwise a ConfigError is raised. ``args.config`` is the list of files.
    The arguments of the shared groups (checkpointing, runtime, ...) are always checked as well
    (:func:`utils.config.checks.check_shared_args`: counts >= 0, ``--resume`` file exists, ...).

    With ``config_class`` (a :class:`utils.config.job.JobConfig`), the parsed values are first given to
    ``prepare`` (the entry layer's own rewrites, e.g. ``--tmp``), then frozen into that class; the
    validators see and the call returns the frozen config instead of the Namespace.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _ensure_config_arg(parser)
    parser.allow_abbrev = False
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument('-c', '--config', dest=CONFIG_DEST, nargs='+', action='extend', default=[])
    files = pre.parse_known_args(argv)[0].config

    errors: list[str] = []
    values: dict[str, Any] = {}
    for path in files:
        try:
            file_values, file_errors = _check_config(parser, _read_yaml(path), path)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
        values.update(file_values)
        errors.extend(file_errors)

    args, cli_errors = _parse_with_defaults(parser, argv, values)
    errors.extend(cli_errors)
    if prepare is not None:
        args = prepare(args)
    if config_class is not None:
        args = config_class.from_namespace(args)
    validators = [] if validate is None else [validate] if callable(validate) else list(validate)
    validators.insert(0, check_shared_args)
    for check in validators:
        try:
            errors.extend(check(args) or [])
        except Exception:
            if not errors:
                raise
            # A validator tripping over a value that is already reported wrong adds nothing.
    if errors:
        exc = ConfigError(errors)
        if exit_on_error:
            parser.exit(2, f'{parser.prog}: error: {exc}\n')
        raise exc
    return args


def _parse_with_defaults(parser: argparse.ArgumentParser, argv: list[str], values: dict) -> argparse.Namespace:
    # YAML values become temporary defaults so argparse still owns CLI parsing; restored afterwards so
    # the parser can be reused (tests parse several times with one parser).
    saved_actions = [(a, a.default) for a in parser._actions]
    saved_defaults = dict(parser._defaults)
    try:
        parser.set_defaults(**values)
        args, extra = parser.parse_known_args(argv, namespace=_ResolvedArgs())
    finally:
        for action, default in saved_actions:
            action.default = default
        parser._defaults.clear()
        parser._defaults.update(saved_defaults)
    args._declared = tuple(_actions_by_dest(parser))
    return args, unknown_arg_errors(parser, extra)


def unknown_arg_errors(parser: argparse.ArgumentParser, extra: Sequence[str]) -> list[str]:
    """One line per command-line token argparse did not recognise, with the closest declared flag:
    ``unknown argument '--lr_decay'; did you mean '--layer_decay'?`` (the value after an unknown flag
    is taken as its value, not reported again)."""
    flags = [f for f in parser._option_string_actions if f.startswith('--')]
    errors, after_flag = [], False
    for token in extra:
        if token.startswith('-') and len(token) > 1 and not _is_number(token):
            name = token.split('=', 1)[0]
            hint = closest(name, flags)
            errors.append(f"unknown argument '{name}'" + (f"; did you mean '{hint}'?" if hint else ''))
            after_flag = '=' not in token
        elif not after_flag:
            errors.append(f"unexpected argument '{token}' (every setting is a --flag)")
        else:
            after_flag = False
    return errors


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# small helpers

def check_list_arg(args: argparse.Namespace, key: str, valid: Iterable[str], sep: str = '-') -> list[str]:
    """Validator helper: one error per item of the list argument ``args.<key>`` (hyphen string or list)
    that is not in ``valid``, with the closest valid name. Use inside a ``validate`` hook::

        errors += check_list_arg(args, 'in_domains', MODALITIES)
        errors += check_list_arg(args, 'decoder_main_tasks', split_list(args.in_domains))
    """
    valid = list(valid)
    errors = []
    for item in split_list(getattr(args, key), sep):
        if item not in valid:
            hint = closest(item, valid)
            errors.append(f"--{key}: unknown value '{item}' (expected one of: {', '.join(valid)})"
                          + (f"; did you mean '{hint}'?" if hint else ''))
    return errors
