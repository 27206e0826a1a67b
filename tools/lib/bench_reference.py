"""A reference implementation for ``tools/benchmark.py --reference_impl DIR``: another ``multimae`` package
with the published API (the published code itself, or any fork), loaded from ``DIR`` under a private module
name so that it never shadows this project's ``multimae``.

The published package imports ``register_model`` from a top-level ``utils.registry`` it ships beside it; that
one import is answered by a stand-in decorator while the package loads (this project's ``utils`` stays what it
is). The reference model is built with the published constructors for the benchmark's configuration, and this
project's weights are loaded into it with ``strict=True`` (the parameter names are the same), so both
implementations start from the same weights and see the same inputs.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from argparse import Namespace
from functools import partial
from typing import Any, Callable, Dict

from torch import nn

PRIVATE_NAME = "_reference_multimae"
_NEEDED = ("MultiMAE", "PatchedInputAdapter", "SemSegInputAdapter", "SpatialOutputAdapter", "MaskedMSELoss",
           "MaskedL1Loss", "MaskedCrossEntropyLoss")


def load_reference_package(root: str) -> types.ModuleType:
    """Import ``root/multimae`` as a private module; raises ``ValueError`` naming ``root`` if it is not there
    or lacks part of the published API."""
    init = os.path.join(root, "multimae", "__init__.py")
    if not os.path.isfile(init):
        raise ValueError(f"--reference_impl {root!r}: expected a folder holding a 'multimae' package "
                         f"({init} not found)")
    name = f"{PRIVATE_NAME}_{abs(hash(os.path.abspath(root)))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    pkg = importlib.util.module_from_spec(spec)
    shim = types.ModuleType("utils.registry")
    shim.register_model = lambda fn: fn
    saved = sys.modules.get("utils.registry")
    sys.modules[name] = pkg
    sys.modules["utils.registry"] = saved if saved is not None and hasattr(saved, "register_model") else shim
    try:
        spec.loader.exec_module(pkg)
    except Exception:
        del sys.modules[name]
        raise
    finally:
        if saved is None:
            sys.modules.pop("utils.registry", None)
        else:
            sys.modules["utils.registry"] = saved
    missing = [n for n in _NEEDED if not hasattr(pkg, n)]
    if missing:
        raise ValueError(f"--reference_impl {root!r}: its multimae package lacks {missing} of the published API")
    return pkg


def build_reference_pretrain(pkg: types.ModuleType, ours: nn.Module, args: Namespace) -> nn.Module:
    """The reference implementation's pre-training model (rgb, depth, semseg in; the same plus ``norm_rgb``
    out) with the encoder size of ``ours`` and this project's weights (strict load)."""
    P, S, domains = args.patch_size, args.input_size, ["rgb", "depth", "semseg"]
    semseg_classes = ours.input_adapters["semseg"].num_classes
    inputs = {"rgb": pkg.PatchedInputAdapter(3, 1, P, image_size=S),
              "depth": pkg.PatchedInputAdapter(1, 1, P, image_size=S),
              "semseg": pkg.SemSegInputAdapter(semseg_classes, 4, P, image_size=S, dim_class_emb=64,
                                               interpolate_class_emb=False)}
    dec = partial(pkg.SpatialOutputAdapter, patch_size_full=P, image_size=S, dim_tokens=args.decoder_dim,
                  depth=args.decoder_depth, num_heads=args.decoder_num_heads, use_task_queries=True,
                  context_tasks=domains, use_xattn=True)
    outputs = {"rgb": dec(num_channels=3, stride_level=1, task="rgb"),
               "depth": dec(num_channels=1, stride_level=1, task="depth"),
               "semseg": dec(num_channels=semseg_classes, stride_level=4, task="semseg"),
               "norm_rgb": dec(num_channels=3, stride_level=1, task="rgb")}
    blocks = list(ours.encoder)
    model = pkg.MultiMAE(inputs, outputs, num_global_tokens=ours.num_global_tokens, dim_tokens=ours.global_tokens.shape[-1],
                         depth=len(blocks), num_heads=blocks[0].attn.num_heads,
                         norm_layer=partial(nn.LayerNorm, eps=1e-6))
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def reference_losses(pkg: types.ModuleType, args: Namespace) -> Dict[str, nn.Module]:
    """The reference implementation's masked losses for the same outputs."""
    P = args.patch_size
    return {"rgb": pkg.MaskedMSELoss(patch_size=P, stride=1), "depth": pkg.MaskedL1Loss(patch_size=P, stride=1),
            "semseg": pkg.MaskedCrossEntropyLoss(patch_size=P, stride=4),
            "norm_rgb": pkg.MaskedMSELoss(patch_size=P, stride=1, norm_pix=True)}


def reference_pretrain_step(pkg: types.ModuleType, step: Any, args: Namespace) -> Callable:
    """A copy of our ``PretrainStep`` with the reference losses: it calls the model with the published
    forward arguments (masking budget, Dirichlet concentration) and applies the same depth standardisation
    and loss weighting; masking itself happens inside the reference model."""
    import copy
    ref = copy.copy(step)
    ref.losses = reference_losses(pkg, args)
    return ref


def build_reference_runner(root: str, ours: nn.Module, step: Any, batch: Any, groups_fn: Callable,
                           args: Namespace, device: Any) -> Any:
    """The reference column: the reference model (our weights), its losses and torch's plain AdamW over the
    same parameter groups, run by the same :class:`StepRunner` as our variants."""
    from tools.lib.bench_steps import StepRunner, _make_optimizer
    from tools.lib.benchmark import REFERENCE

    pkg = load_reference_package(root)
    model = build_reference_pretrain(pkg, ours, args).to(device)
    optimizer = _make_optimizer(model, groups_fn, fused=False)
    return StepRunner(REFERENCE, model, optimizer, reference_pretrain_step(pkg, step, args), batch, device)
