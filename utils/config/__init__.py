"""Configuration: command line + YAML parsed once at the entry (CLI > YAML > defaults), checked, saved.

The argument surface and its parsing live in :mod:`utils.config.parser`, reading and checking YAML files in
:mod:`utils.config.yaml_values`, writing the resolved config in :mod:`utils.config.saving`, start-up checks in
:mod:`utils.config.checks`; this package re-exports the public API.
"""
from utils.config.names import closest, split_list
from utils.config.parser import *  # noqa: F401,F403
from utils.config.parser import __all__ as _parser_all

__all__ = list(_parser_all)
