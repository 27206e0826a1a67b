"""Pre-trained weights for fine-tuning: safe file loading, timm <-> MultiMAE conversion, checked loading.

Formats understood by `load_finetune_weights`:
- MultiMAE / MultiViT state dicts (ours or the released checkpoints), bare or under 'model' /
  'state_dict' / 'module', with or without a DDP `module.` prefix, `.pth`/`.pt` or `.safetensors`;
- timm ViT state dicts (`cls_token`, `pos_embed`, `patch_embed.*`, `blocks.*`), converted on the fly.

An encoder weight that cannot be loaded is an error, not a printed message: silently fine-tuning from a
half-random encoder is the worst failure mode.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.checkpoint import load_checkpoint
from utils.dist import is_main_process

__all__ = [
    "WeightsMismatchError", "load_weights_file", "load_weights_with_metadata", "extract_state_dict",
    "is_timm_vit_state_dict",
    "is_multimae_state_dict", "vit_to_multimae", "multimae_to_vit", "interpolate_pos_emb",
    "prepare_finetune_state_dict", "FinetuneLoadReport", "load_finetune_weights", "compress_keys",
]

StateDict = dict[str, Tensor]
_CONTAINER_KEYS = ("model", "state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP wrapper, torch.compile wrapper


class WeightsMismatchError(ValueError):
    """A pre-trained weight needed by the model is missing from, or incompatible with, the checkpoint."""


# ----------------------------------------------------------------------------------------------- file I/O
def extract_state_dict(obj: object, source: str = "<state dict>") -> StateDict:
    """Return the tensor state dict inside a loaded checkpoint object (bare dict or under 'model',
    'state_dict' or 'module'), with a common `module.` / `_orig_mod.` prefix removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
    for key in _CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise ValueError(f"{source}: no tensors found; top-level keys are {sorted(map(str, obj))[:10]} "
                         f"(expected a state dict, optionally under one of {_CONTAINER_KEYS})")
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights_file(path: str | Path) -> StateDict:
    """The model state dict of a weights file or URL (`.pth`/`.pt`/`.bin` or `.safetensors`), read by the one
    safe loader :func:`utils.checkpoint.load_checkpoint` (nothing is unpickled); tensors on the CPU."""
    source = str(path)
    return extract_state_dict(load_checkpoint(source), source)


def _holds_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensors(v) for v in obj)
    return False


def load_weights_with_metadata(path: str | os.PathLike
                               ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, list[str]]:
    """Read a weights file safely (`torch.load(weights_only=True)` or safetensors).

    Returns `(state_dict, metadata, dropped)`: the model state dict (from 'model' / 'state_dict' /
    'module' or the bare dict, DDP prefix removed), the checkpoint entries without tensors (e.g. 'args',
    'epoch'; None for a bare state dict, so `save_weights_file(..., extra=metadata)` keeps the layout) and
    the names of the other tensor-holding entries (optimizer, scaler, EMA ...), which a converted file cannot
    use.
    """
    obj = load_checkpoint(path)
    sd = extract_state_dict(obj, str(path))
    meta: dict[str, Any] | None = None
    dropped: list[str] = []
    container = next((k for k in ("model", "state_dict", "module") if isinstance(obj.get(k), Mapping)), None)
    if container is not None:
        meta = {}
        for k, v in obj.items():
            if k == container:
                continue
            if _holds_tensors(v):
                dropped.append(k)
            else:
                meta[k] = v
    return sd, meta, dropped


# ----------------------------------------------------------------------------------------------- converters
def is_timm_vit_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """True for a timm VisionTransformer state dict (patch_embed + blocks + pos_embed/cls_token)."""
    return ("patch_embed.proj.weight" in sd and any(k.startswith("blocks.") for k in sd)
            and ("pos_embed" in sd or "cls_token" in sd))


def is_multimae_state_dict(sd: Mapping[str, Tensor]) -> bool:
    """True for a MultiMAE / MultiViT state dict (encoder.* blocks and input adapters)."""
    return any(k.startswith("encoder.") for k in sd) and any(k.startswith("input_adapters.") for k in sd)


def vit_to_multimae(sd: Mapping[str, Tensor], grid_size: tuple[int, int] | None = None) -> StateDict:
    """timm ViT -> MultiMAE keys; returns a new dict, the input is not modified.

    global_tokens = cls_token + pos_embed[:, 0]; pos_embed[:, 1:] (1, h*w, D) -> input_adapters.rgb.pos_emb
    (1, D, h, w) (row-major; square unless `grid_size` is given); patch_embed.proj.* ->
    input_adapters.rgb.proj.*; blocks.* -> encoder.*; everything else (norm, fc_norm, head) is dropped.
    A pos_embed without a class-token position (timm `no_embed_class`) is handled too.
    """
    if not is_timm_vit_state_dict(sd):
        raise ValueError("vit_to_multimae: not a timm ViT state dict (needs patch_embed.proj.weight, blocks.*, "
                         "pos_embed)")
    out: StateDict = {}
    pos = sd["pos_embed"]
    n_tokens, dim = pos.shape[1], pos.shape[2]
    if grid_size is None:
        side = math.isqrt(n_tokens)
        if side * side == n_tokens:
            grid_size = (side, side)
        elif math.isqrt(n_tokens - 1) ** 2 == n_tokens - 1:
            grid_size = (math.isqrt(n_tokens - 1),) * 2
        else:
            raise ValueError(f"pos_embed of shape {tuple(pos.shape)} is not a square grid (plus a class token); "
                             "pass grid_size=(h, w)")
    h, w = grid_size
    n_prefix = n_tokens - h * w
    if n_prefix not in (0, 1):
        raise ValueError(f"pos_embed of shape {tuple(pos.shape)} does not fit grid {grid_size} plus <= 1 class token")
    if "cls_token" in sd:
        cls = sd["cls_token"]
        out["global_tokens"] = cls + pos[:, :1] if n_prefix else cls.clone()
    out["input_adapters.rgb.pos_emb"] = pos[:, n_prefix:].reshape(1, h, w, dim).permute(0, 3, 1, 2).contiguous()
    _copy_renamed(sd, out, {"patch_embed.proj.": "input_adapters.rgb.proj.", "blocks.": "encoder."})
    return out


def _copy_renamed(sd: Mapping[str, Tensor], out: StateDict, prefixes: Mapping[str, str]) -> None:
    """Copy into `out` every tensor of `sd` whose key starts with a key of `prefixes`, that prefix replaced by
    its value (the patch projection and the transformer blocks, which the two layouts share unchanged)."""
    for k, v in sd.items():
        for old, new in prefixes.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v


def multimae_to_vit(sd: Mapping[str, Tensor]) -> StateDict:
    """MultiMAE / MultiViT -> timm ViT keys; returns a new dict, the input is not modified.

    global_tokens (1, 1, D) -> cls_token; input_adapters.rgb.pos_emb (1, D, h, w) -> pos_embed (1, 1+h*w, D)
    with a zero class-token row prepended; input_adapters.rgb.proj.* -> patch_embed.proj.*; encoder.* ->
    blocks.*; everything else dropped. Loads with strict=True into
    `timm.create_model('vit_*_patch16_*', num_classes=0, final_norm=False)` (MultiMAE has no final norm).
    """
    for key in ("global_tokens", "input_adapters.rgb.pos_emb"):
        if key not in sd:
            raise ValueError(f"multimae_to_vit: key '{key}' missing (needs an rgb input adapter and global tokens)")
    g = sd["global_tokens"]
    if g.shape[1] != 1:
        raise ValueError(f"multimae_to_vit: 'global_tokens' has shape {tuple(g.shape)}; a timm ViT has exactly one "
                         "class token, so only num_global_tokens=1 converts")
    pos = sd["input_adapters.rgb.pos_emb"]
    pos = pos.flatten(2).transpose(1, 2)
    out: StateDict = {"cls_token": g.clone(), "pos_embed": torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], 1)}
    _copy_renamed(sd, out, {"input_adapters.rgb.proj.": "patch_embed.proj.", "encoder.": "blocks."})
    return out


def interpolate_pos_emb(pos_emb: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a (1, D, h, w) position embedding to `size`, bicubic with align_corners=False."""
    if tuple(pos_emb.shape[-2:]) == tuple(size):
        return pos_emb
    out = F.interpolate(pos_emb.float(), size=tuple(size), mode="bicubic", align_corners=False)
    return out.to(pos_emb.dtype)


# ----------------------------------------------------------------------------------------------- fine-tune loading
@dataclass
class FinetuneLoadReport:
    """What `load_finetune_weights` did. Shapes are (old, new)."""
    source: str
    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    interpolated: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    padded: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def _categories(self) -> list[tuple[str, list[str]]]:
        return [("loaded", self.loaded), ("missing (initialised from scratch)", self.missing),
                ("unexpected (ignored)", self.unexpected), ("dropped before loading", self.dropped)]

    def _reshaped(self) -> list[str]:
        return [f"  {title}: {k} {tuple(a)} -> {tuple(b)}"
                for title, d in (("pos_emb interpolated (bicubic)", self.interpolated),
                                 ("class_emb padded with zero rows", self.padded)) for k, (a, b) in d.items()]

    def summary(self, full_list: str | os.PathLike | None = None) -> str:
        """A few console lines: each category's count with its keys grouped by prefix (``encoder x144``),
        the reshaped embeddings, and where ``full_list`` (the file of :meth:`details`) is."""
        lines = [f"Loaded pre-trained weights from {self.source} ({self.source_format})"]
        for title, keys in self._categories():
            groups = Counter(_key_group(k) for k in keys)
            shown = ", ".join(f"{g} x{n}" for g, n in groups.most_common(4))
            lines.append(f"  {title}: {len(keys)}" + (f" ({shown}{', ...' if len(groups) > 4 else ''})"
                                                      if keys else ""))
        lines += self._reshaped()
        if full_list:
            lines.append(f"  every key: {full_list}")
        return "\n".join(lines)

    def details(self) -> str:
        """The full listing: every key of every category (numbered layers folded, see compress_keys)."""
        lines = [f"Loaded pre-trained weights from {self.source} ({self.source_format})"]
        for title, keys in self._categories():
            lines.append(f"  {title}: {len(keys)}")
            lines += [f"    {k}" for k in compress_keys(keys)]
        return "\n".join(lines + self._reshaped())

    def write(self, output_dir: str | os.PathLike, filename: str = "load_report.txt") -> Path | None:
        """:meth:`details` to ``output_dir/filename`` (atomically; main process only, '' = nowhere)."""
        if not output_dir or not is_main_process():
            return None
        from utils.io import atomic_open

        path = Path(output_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w") as f:
            f.write(self.details() + "\n")
        return path


def _key_group(key: str) -> str:
    """'output_adapters.rgb.x' -> 'output_adapters.rgb'; 'encoder.3.mlp.w' -> 'encoder'."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and not parts[1].isdigit() else parts[0]


def compress_keys(keys: Iterable[str]) -> list[str]:
    """Exact but short listing: 'encoder.0.mlp.fc1.weight' ... 'encoder.11.mlp.fc1.weight' ->
    'encoder.{0-11}.mlp.fc1.weight' (the first numeric path component is folded)."""
    groups: dict[str, list[int] | None] = {}
    for k in keys:
        parts = k.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            groups.setdefault(k, None)
            continue
        pattern = ".".join(parts[:i] + ["\0"] + parts[i + 1:])
        groups.setdefault(pattern, []).append(int(parts[i]))
    out = []
    for pattern, nums in groups.items():
        if nums is None:
            out.append(pattern)
            continue
        nums = sorted(set(nums))
        runs, start = [], nums[0]
        for a, b in zip(nums, nums[1:] + [None]):
            if b != a + 1:
                runs.append(str(start) if start == a else f"{start}-{a}")
                start = b
        label = runs[0] if len(runs) == 1 and "-" not in runs[0] else "{" + ",".join(runs) + "}"
        out.append(pattern.replace("\0", label))
    return out


def _encoder_key_pattern(model: nn.Module) -> re.Pattern:
    adapters = getattr(model, "input_adapters", None) or {}
    names = "|".join(re.escape(t) for t in adapters)
    alt = [r"encoder\.", r"global_tokens$"] + ([rf"input_adapters\.(?:{names})\."] if names else [])
    return re.compile("^(?:" + "|".join(alt) + ")")


def prepare_finetune_state_dict(model: nn.Module, sd: Mapping[str, Tensor], drop_output_adapters: bool = True,
                                source: str = "<state dict>") -> tuple[StateDict, FinetuneLoadReport]:
    """Make a checkpoint state dict fit `model` (a MultiMAE / MultiViT) for fine-tuning.

    Converts timm ViT keys, drops `output_adapters.*` (pre-training decoders) unless told not to, pads
    `input_adapters.*.class_emb.weight` with zero rows when the model has more (e.g. the padding class of
    semseg inputs), and resizes `input_adapters.*.pos_emb` bicubically to the model's grid. Shape
    mismatches that remain are errors for encoder keys and dropped (reported) otherwise.
    """
    model = getattr(model, "module", model)  # DDP
    if is_timm_vit_state_dict(sd) and not is_multimae_state_dict(sd):
        sd, fmt = vit_to_multimae(sd), "timm ViT, converted to MultiMAE"
    elif any(k.startswith(("encoder.", "input_adapters.", "global_tokens")) for k in sd):
        sd, fmt = dict(sd), "MultiMAE/MultiViT"
    else:
        raise ValueError(f"{source}: unrecognised weights layout; expected MultiMAE keys (encoder.*, input_adapters.*)"
                         f" or timm ViT keys (blocks.*, patch_embed.*), found e.g. {sorted(sd)[:5]}")
    report = FinetuneLoadReport(source=source, source_format=fmt)
    if drop_output_adapters:
        report.dropped = [k for k in sd if k.startswith("output_adapters.")]
        for k in report.dropped:
            del sd[k]
    target = model.state_dict()
    is_encoder = _encoder_key_pattern(model).match
    for k in list(sd):
        if k not in target:
            continue
        old, new = tuple(sd[k].shape), tuple(target[k].shape)
        if old == new:
            continue
        if re.fullmatch(r"input_adapters\.[^.]+\.pos_emb", k) and len(old) == 4 and old[:2] == new[:2]:
            sd[k] = interpolate_pos_emb(sd[k], new[-2:])
            report.interpolated[k] = (old, new)
        elif k.endswith(".class_emb.weight") and len(old) == 2 and old[1] == new[1] and old[0] < new[0]:
            sd[k] = torch.cat([sd[k], sd[k].new_zeros(new[0] - old[0], old[1])])
            report.padded[k] = (old, new)
        elif is_encoder(k):
            raise WeightsMismatchError(f"{source}: encoder weight '{k}' has shape {old} in the checkpoint but "
                                       f"{new} in the model (check model size, patch size and num_channels)")
        else:
            del sd[k]
            report.dropped.append(k)
    return sd, report


def load_finetune_weights(model: nn.Module, source: str | Path | Mapping[str, Tensor],
                          log: Callable[[str], None] | None = print, drop_output_adapters: bool = True,
                          allow_missing: Iterable[str] = (), output_dir: str | os.PathLike = ""
                          ) -> FinetuneLoadReport:
    """Load pre-trained weights into `model` for fine-tuning and log exactly what happened.

    source: a file path / URL (see `load_weights_file`) or an already loaded (checkpoint) dict.
    Missing heads / output adapters are expected; a missing encoder weight (`encoder.*`, `global_tokens`,
    the input adapters of the model's in-domains) raises `WeightsMismatchError` naming the keys, unless it
    matches one of the `allow_missing` glob patterns (e.g. 'input_adapters.depth.*' to fine-tune a new
    depth input from an RGB-only checkpoint). Loads with strict=False after these checks. ``log`` gets a
    short summary and the full key listing goes to ``output_dir/load_report.txt`` when ``output_dir`` is given;
    without it, ``log`` gets the full listing.
    """
    if isinstance(source, Mapping):
        name, sd = "<state dict>", extract_state_dict(source)
    else:
        name, sd = str(source), load_weights_file(source)
    model_ = getattr(model, "module", model)
    sd, report = prepare_finetune_state_dict(model_, sd, drop_output_adapters, source=name)
    is_encoder = _encoder_key_pattern(model_).match
    allow = tuple(allow_missing)
    missing_encoder = [k for k in model_.state_dict() if is_encoder(k) and k not in sd
                       and not any(fnmatch.fnmatchcase(k, p) for p in allow)]
    if missing_encoder:
        shown = ", ".join(compress_keys(missing_encoder))
        raise WeightsMismatchError(f"{name}: encoder weights missing from the checkpoint: {shown}. Wrong "
                                   "checkpoint or wrong --in_domains? Pass allow_missing patterns to initialise "
                                   "them from scratch.")
    result = model_.load_state_dict(sd, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    unexpected = set(report.unexpected)
    report.loaded = [k for k in sd if k not in unexpected]
    if log is not None:
        # Without an output folder the full listing is the only record, so it is what gets logged.
        path = report.write(output_dir)
        log(report.summary(path) if path is not None else report.details())
    return report
