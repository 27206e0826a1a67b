"""YAML config files for the argument parser: read (duplicate keys refused), check every key against the
declared arguments, convert every value through its argument's ``type``/``choices``/``nargs``.

Used by :func:`utils.config.parser.parse_args`; every problem becomes one line of a :class:`ConfigError`.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import yaml

from utils.config.names import closest

CONFIG_DEST = 'config'


class ConfigError(ValueError):
    """One or more configuration problems; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        if len(self.errors) == 1:
            msg = self.errors[0]
        else:
            msg = f'{len(self.errors)} configuration errors:\n' + '\n'.join(f'  - {e}' for e in self.errors)
        super().__init__(msg)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the silent 'last one wins' hides typos)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    out: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, 'help', CONFIG_DEST) or isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        out.setdefault(action.dest, []).append(action)
    return out


def _type_name(type_fn: Any) -> str:
    return getattr(type_fn, '__name__', repr(type_fn)) if type_fn is not None else 'str'


def _convert_scalar(value: Any, type_fn: Any) -> Any:
    """Convert one YAML scalar through an argparse ``type``; raises ValueError on mismatch."""
    if isinstance(value, (list, dict)):
        raise ValueError
    if type_fn is None or type_fn is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        # YAML booleans are never numbers or strings here (True would otherwise become 1 or 'True').
        raise ValueError
    if type_fn is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError
        return int(value)
    return type_fn(value)


def _is_bool_dest(actions: list[argparse.Action]) -> bool:
    return any(isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                              argparse.BooleanOptionalAction)) for a in actions)


def _convert_value(key: str, value: Any, actions: list[argparse.Action], source: str) -> Any:
    """Check/convert the YAML value of ``key``; raises ValueError with a one-line message."""
    where = f"config key '{key}' in {source}"
    action = actions[0]
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f'{where}: null is not allowed (default is {action.default!r})')
    if _is_bool_dest(actions):
        if not isinstance(value, bool):
            raise ValueError(f'{where}: expected true or false, got {value!r}')
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f'{where}: expected int, got {value!r}')
        return value
    if not isinstance(action, (argparse._StoreAction, argparse._AppendAction, argparse._ExtendAction)):
        return value  # store_const & custom actions: taken as written
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int) or isinstance(
        action, (argparse._AppendAction, argparse._ExtendAction))
    tname = _type_name(action.type)
    if many:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{where}: expected a list of {tname}, got {value!r}')
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ValueError(f'{where}: expected {action.nargs} values, got {len(value)}')
        if action.nargs == '+' and not value:
            raise ValueError(f'{where}: expected at least one {tname}')
        items = list(value)
    else:
        items = [value]
    converted = []
    for item in items:
        try:
            item = _convert_scalar(item, action.type)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(f'{where}: expected {tname}, got {item!r}') from None
        if action.choices is not None and item not in action.choices:
            choices = ', '.join(repr(c) for c in action.choices)
            raise ValueError(f'{where}: invalid choice {item!r} (choose from {choices})')
        converted.append(item)
    return converted if many else converted[0]


def _read_yaml(path: str) -> dict:
    try:
        with open(path, encoding='utf-8') as f:
            raw = yaml.load(f, Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError([f'config file not found: {path}']) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' (line {mark.line + 1})' if mark is not None else ''
        problem = getattr(exc, 'problem', None) or str(exc).splitlines()[0]
        raise ConfigError([f'cannot parse config file {path}{where}: {problem}']) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f'config file {path} must hold a mapping of argument names to values, '
                           f'got {type(raw).__name__}'])
    return raw


def _check_config(parser: argparse.ArgumentParser, raw: dict, source: str) -> tuple[dict, list[str]]:
    actions = _actions_by_dest(parser)
    values, errors = {}, []
    for key, value in raw.items():
        if not isinstance(key, str) or key not in actions:
            hint = closest(str(key), actions)
            errors.append(f"unknown config key '{key}' in {source}"
                          + (f"; did you mean '{hint}'?" if hint else ''))
            continue
        try:
            values[key] = _convert_value(key, value, actions[key], source)
        except ValueError as exc:
            errors.append(str(exc))
    return values, errors


def load_yaml_config(parser: argparse.ArgumentParser, path: str | os.PathLike) -> dict:
    """Read a YAML config and return its values checked and converted for ``parser``.

    Raises ConfigError listing every unknown key / wrong value of the file.
    """
    values, errors = _check_config(parser, _read_yaml(str(path)), str(path))
    if errors:
        raise ConfigError(errors)
    return values
