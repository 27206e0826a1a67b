"""Shared machinery of the entry scripts: config, distributed, data, transforms, optimisation,
checkpoints, metrics and logging. The model library itself lives in :mod:`multimae`.

``utils.create_model(name, **kwargs)`` is kept for compatibility with the published code.
"""
from typing import Any

__all__ = ["create_model"]


def __getattr__(name: str) -> Any:
    # Lazy so that importing a small utility (e.g. utils.config) does not build the model registry.
    if name == "create_model":
        from multimae import create_model

        return create_model
    raise AttributeError(f"module 'utils' has no attribute {name!r}")
