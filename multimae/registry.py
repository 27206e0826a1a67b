"""Model registry: named constructors, looked up by :func:`create_model`.

Constructors registered here are also registered with timm (when timm accepts them), so
``timm.create_model('multivit_base', input_adapters=..., output_adapters=...)`` works too.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Any, Callable, Dict, List

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint", "is_model"]

_model_entrypoints: Dict[str, Callable[..., nn.Module]] = {}

# Keyword arguments timm.create_model passes to every entrypoint; meaningless for these models.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under ``fn.__name__`` (here and in timm's registry)."""
    _model_entrypoints[fn.__name__] = fn
    try:
        from timm.models import register_model as timm_register_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # re-imports (e.g. importlib.reload) would warn about overwriting
            timm_register_model(fn)
    except Exception as e:  # a timm API change must not make the library unusable
        warnings.warn(f"could not register {fn.__name__!r} with timm: {e}")
    return fn


def strip_timm_kwargs(kwargs: Dict[str, Any], model_name: str) -> Dict[str, Any]:
    """Remove the arguments timm's factory adds (``pretrained``, ``pretrained_cfg``, ...)."""
    if kwargs.pop("pretrained", False):
        raise ValueError(f"{model_name}: no weights are bundled with the library; build the model and load the "
                         f"released checkpoint (utils.weights) instead of pretrained=True")
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    return kwargs


def list_models() -> List[str]:
    """Names of all registered models, sorted."""
    return sorted(_model_entrypoints)


def is_model(model_name: str) -> bool:
    return model_name in _model_entrypoints


def model_entrypoint(model_name: str) -> Callable[..., nn.Module]:
    """Constructor registered under ``model_name``; unknown names raise with the closest suggestions."""
    if model_name not in _model_entrypoints:
        close = difflib.get_close_matches(model_name, list(_model_entrypoints), n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown model {model_name!r}{hint} (registered: {', '.join(list_models())})")
    return _model_entrypoints[model_name]


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model: ``create_model('multivit_base', input_adapters=..., output_adapters=...)``.

    Keyword arguments set to None are dropped (so that unset command-line options keep the model
    defaults) and the deprecated ``drop_connect_rate`` is mapped to ``drop_path_rate``.
    """
    drop_connect_rate = kwargs.pop("drop_connect_rate", None)
    if drop_connect_rate is not None and kwargs.get("drop_path_rate") is None:
        warnings.warn("drop_connect_rate is deprecated, use drop_path_rate", DeprecationWarning, stacklevel=2)
        kwargs["drop_path_rate"] = drop_connect_rate
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return model_entrypoint(model_name)(**kwargs)
