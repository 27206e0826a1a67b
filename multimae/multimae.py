"""MultiMAE (multi-modal masked autoencoder) and MultiViT (the same encoder without masking).

Tokens of all input modalities are concatenated in input-dict order; ``num_global_tokens`` learned
global tokens are appended at the END of the sequence. There is no final encoder LayerNorm.
Masks use 1 = hidden from the encoder, 0 = visible.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .masking import ModelDeviceDefault, random_token_masks, sample_alphas, token_ids_from_masks
from .masking import make_mask as _make_mask
from .multimae_utils import transformer_blocks, trunc_normal_, xavier_uniform_fused_
from .registry import register_model, strip_timm_kwargs

__all__ = [
    "MultiMAE",
    "MultiViT",
    "sample_alphas",
    "pretrain_multimae_tiny",
    "pretrain_multimae_small",
    "pretrain_multimae_base",
    "pretrain_multimae_large",
    "pretrain_multimae_huge",
    "multivit_tiny",
    "multivit_small",
    "multivit_base",
    "multivit_large",
    "multivit_huge",
]

Tensor = torch.Tensor
InputInfo = Dict[str, Any]


class MultiMAE(nn.Module):
    """Multi-modal masked autoencoder.

    Args:
        input_adapters: ``{task: adapter}`` turning each input modality into tokens.
        output_adapters: ``{task: adapter}`` decoding the encoder tokens, or None (encoder only).
        num_global_tokens: learned tokens appended after the patch tokens.
        dim_tokens, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (drop-path grows linearly over depth).
        norm_layer: normalisation layer of the blocks.
    """

    def __init__(self, input_adapters: Dict[str, nn.Module], output_adapters: Optional[Dict[str, nn.Module]],
                 num_global_tokens: int = 1, dim_tokens: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        if not input_adapters:
            raise ValueError("MultiMAE needs at least one input adapter")
        for adapter in input_adapters.values():
            adapter.init(dim_tokens=dim_tokens)
        self.input_adapters = nn.ModuleDict(input_adapters)
        if output_adapters is not None:
            for adapter in output_adapters.values():
                adapter.init(dim_tokens_enc=dim_tokens)
            self.output_adapters = nn.ModuleDict(output_adapters)
        else:
            self.output_adapters = None

        self.num_global_tokens = num_global_tokens
        self.dim_tokens = dim_tokens
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim_tokens))
        trunc_normal_(self.global_tokens, std=0.02)

        self.encoder = nn.Sequential(*transformer_blocks(depth, dim_tokens, num_heads, mlp_ratio, qkv_bias, drop_rate,
                                                         attn_drop_rate, drop_path_rate, norm_layer))
        self.grad_checkpointing = False
        self._init_all_weights()

    # ------------------------------------------------------------------ initialisation
    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _init_all_weights(self) -> None:
        """Initialise the whole tree, adapters included: Xavier-uniform Linear weights with zero bias and
        unit LayerNorms; fused ``qkv`` / ``kv`` weights take the bound of one projection, and patch-projection
        convs get Xavier-uniform on their flattened weight."""
        self.apply(self._init_weights)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    xavier_uniform_fused_(m.weight, 3)
                elif "kv" in name:
                    xavier_uniform_fused_(m.weight, 2)
            elif isinstance(m, nn.Conv2d) and ".proj" in name:
                w = m.weight.data
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # ------------------------------------------------------------------ timm conventions
    def get_num_layers(self) -> int:
        return len(self.encoder)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """``global_tokens`` plus every adapter's ``no_weight_decay()`` names, prefixed with its path."""
        names = {"global_tokens"}
        groups = [("input_adapters", self.input_adapters)]
        if self.output_adapters is not None:
            groups.append(("output_adapters", self.output_adapters))
        for prefix, adapters in groups:
            for task, adapter in adapters.items():
                if hasattr(adapter, "no_weight_decay"):
                    names |= {f"{prefix}.{task}.{n}" for n in adapter.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise decay: input adapters and global tokens first,
        then one group per encoder block; output adapters (unmatched) come last."""
        return dict(
            stem=r"^global_tokens|^input_adapters",
            blocks=r"^encoder\.(\d+)" if coarse else [(r"^encoder\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward (``use_reentrant=False``) to save memory: every encoder block,
        and the attention blocks of output adapters that support it (the pre-training decoders)."""
        self.grad_checkpointing = enable
        for adapter in (self.output_adapters.values() if self.output_adapters is not None else ()):
            if hasattr(adapter, "set_grad_checkpointing"):
                adapter.set_grad_checkpointing(enable)

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_encoder(self, tokens: Tensor, return_all_layers: bool = False) -> Union[Tensor, List[Tensor]]:
        """Run the encoder on ``(B, N, D)`` tokens; optionally return every block's output."""
        outputs = []
        for block in self.encoder:
            tokens = self._run_block(block, tokens)
            if return_all_layers:
                outputs.append(tokens)
        return outputs if return_all_layers else tokens

    # ------------------------------------------------------------------ input processing
    make_mask = ModelDeviceDefault(_make_mask)

    def _image_size(self, x: Dict[str, Tensor]) -> Tuple[int, int]:
        """Full-resolution ``(H, W)``: from rgb, else from semseg times its stride, else the first input."""
        if "rgb" in x:
            return tuple(x["rgb"].shape[-2:])
        if "semseg" in x and "semseg" in self.input_adapters:
            stride = self.input_adapters["semseg"].stride_level
            H, W = x["semseg"].shape[-2:]
            return H * stride, W * stride
        return tuple(next(iter(x.values())).shape[-2:])

    def generate_input_info(self, input_task_tokens: Dict[str, Tensor], image_size: Tuple[int, int]) -> InputInfo:
        """Bookkeeping passed to output adapters: per-task token ranges, image size, token counts."""
        info: InputInfo = OrderedDict()
        tasks = {}
        i = 0
        for task, tokens in input_task_tokens.items():
            n = tokens.shape[1]
            tasks[task] = {"num_tokens": n, "has_2d_posemb": True, "start_idx": i, "end_idx": i + n}
            i += n
        info["tasks"] = tasks
        info["image_size"] = tuple(image_size)
        info["num_task_tokens"] = i
        info["num_global_tokens"] = self.num_global_tokens
        return info

    def tokenize(self, x: Union[Tensor, Dict[str, Tensor]]) -> Tuple[Dict[str, Tensor], InputInfo]:
        """Tokenise every input that has an adapter (others are ignored), keeping dict order."""
        x = {"rgb": x} if isinstance(x, Tensor) else x
        tokens = {task: self.input_adapters[task](t) for task, t in x.items() if task in self.input_adapters}
        if not tokens:
            raise ValueError(f"none of the inputs {list(x)} has an input adapter (adapters: "
                             f"{list(self.input_adapters)})")
        return tokens, self.generate_input_info(tokens, self._image_size(x))

    def _append_global_tokens(self, tokens: Tensor) -> Tensor:
        # no dtype cast: under autocast the concatenation promotes to float32, keeping the residual
        # stream in full precision
        return torch.cat([tokens, self.global_tokens.expand(tokens.shape[0], -1, -1)], dim=1)

    # ------------------------------------------------------------------ masking
    def generate_random_masks(self, input_tokens: Dict[str, Tensor], num_encoded_tokens: int,
                              alphas: Union[float, Sequence[float]] = 1.0, sample_tasks_uniformly: bool = False
                              ) -> Tuple[Dict[str, Tensor], Tensor, Tensor]:
        """Random masks with Dirichlet-distributed per-sample token budgets across tasks.

        Returns ``task_masks {task: (B, N_task) int64}`` (1 = hidden), ``ids_keep (B, num_encoded_tokens)``
        and ``ids_restore (B, N_total)``; see :func:`multimae.masking.random_token_masks`.
        """
        return random_token_masks(input_tokens, num_encoded_tokens, alphas=alphas,
                                  sample_tasks_uniformly=sample_tasks_uniformly)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Union[Tensor, Dict[str, Tensor]], mask_inputs: bool = True,
                task_masks: Optional[Dict[str, Tensor]] = None, num_encoded_tokens: Optional[int] = 128,
                alphas: Union[float, Sequence[float]] = 1.0, sample_tasks_uniformly: bool = False,
                fp32_output_adapters: Sequence[str] = ()
                ) -> Tuple[Union[Dict[str, Tensor], Tensor], Dict[str, Tensor]]:
        """Masked multi-modal forward pass.

        Args:
            x: ``{task: tensor}`` (a bare tensor means rgb): images ``(B, C, H, W)``, semseg ``(B, h, w)``.
            mask_inputs: if False all tokens are encoded.
            task_masks: optional ``{task: (B, N_task)}`` masks (1 = hidden); else Dirichlet sampling.
            num_encoded_tokens: visible-token budget per sample (None = all tokens).
            alphas: Dirichlet concentration, one float or one per input task.
            sample_tasks_uniformly: first pick a non-empty task subset uniformly per sample.
            fp32_output_adapters: adapters run outside autocast on float32 tokens.

        Returns:
            ``(preds {task: (B, C_task, H_task, W_task)}, task_masks {task: (B, N_task)})``, or
            ``(encoder_tokens (B, n_vis + n_global, D), task_masks)`` without output adapters.
        """
        input_task_tokens, input_info = self.tokenize(x)
        n_total = input_info["num_task_tokens"]
        if mask_inputs and num_encoded_tokens is not None:
            num_encoded_tokens = min(int(num_encoded_tokens), n_total)
        else:
            num_encoded_tokens = n_total

        if task_masks is None:
            task_masks, ids_keep, ids_restore = self.generate_random_masks(
                input_task_tokens, num_encoded_tokens, alphas=alphas, sample_tasks_uniformly=sample_tasks_uniformly)
        else:
            ids_keep, ids_restore = token_ids_from_masks(task_masks, input_task_tokens)

        tokens = torch.cat(list(input_task_tokens.values()), dim=1)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        encoder_tokens = self.forward_encoder(self._append_global_tokens(tokens))

        if self.output_adapters is None:
            return encoder_tokens, task_masks

        adapter_kwargs = dict(input_info=input_info, ids_keep=ids_keep, ids_restore=ids_restore)
        preds = {task: adapter(encoder_tokens=encoder_tokens, **adapter_kwargs)
                 for task, adapter in self.output_adapters.items() if task not in fp32_output_adapters}
        fp32 = [t for t in fp32_output_adapters if t in self.output_adapters]
        if fp32:
            with torch.autocast(device_type=encoder_tokens.device.type, enabled=False):
                for task in fp32:
                    preds[task] = self.output_adapters[task](encoder_tokens=encoder_tokens.float(), **adapter_kwargs)
        return preds, task_masks


class MultiViT(MultiMAE):
    """The MultiMAE encoder without masking, for fine-tuning and feature extraction."""

    def process_input(self, x: Union[Tensor, Dict[str, Tensor]]) -> Tuple[Tensor, InputInfo]:
        """All tokens in input order plus global tokens: ``(B, N_total + n_global, D)`` and ``input_info``."""
        input_task_tokens, input_info = self.tokenize(x)
        tokens = torch.cat(list(input_task_tokens.values()), dim=1)
        return self._append_global_tokens(tokens), input_info

    def forward(self, x: Union[Tensor, Dict[str, Tensor]], return_all_layers: bool = False, **kwargs: Any
                ) -> Union[Dict[str, Tensor], Tensor, List[Tensor]]:
        """Encode all tokens.

        Returns ``{task: adapter output}`` if there are output adapters, else the encoder output
        ``(B, N_total + n_global, D)`` (a list with one entry per block if ``return_all_layers``,
        as the DPT head needs).
        """
        tokens, input_info = self.process_input(x)
        encoder_tokens = self.forward_encoder(tokens, return_all_layers=return_all_layers)
        if self.output_adapters is None:
            return encoder_tokens
        return {task: adapter(encoder_tokens=encoder_tokens, input_info=input_info)
                for task, adapter in self.output_adapters.items()}


# ---------------------------------------------------------------------- registered constructors
_SIZES = {
    "tiny": ("Ti", dict(dim_tokens=192, depth=12, num_heads=3)),
    "small": ("S", dict(dim_tokens=384, depth=12, num_heads=6)),
    "base": ("B", dict(dim_tokens=768, depth=12, num_heads=12)),
    "large": ("L", dict(dim_tokens=1024, depth=24, num_heads=16)),
    # The patch size belongs to the input adapters: timm's ViT-H/14 is this preset with 14-pixel patches.
    "huge": ("H", dict(dim_tokens=1280, depth=32, num_heads=16)),
}


def _constructor(cls: Type[MultiMAE], name: str, size: str) -> Callable[..., MultiMAE]:
    """Registered constructor ``name`` building ``cls`` with the ``size`` preset (ViT widths, MLP ratio 4,
    qkv bias, LayerNorm eps 1e-6); keyword arguments override any preset value."""
    vit, preset = _SIZES[size]

    def build(input_adapters: Dict[str, nn.Module], output_adapters: Optional[Dict[str, nn.Module]] = None,
              **kwargs: Any) -> MultiMAE:
        args = dict(preset, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        args.update(strip_timm_kwargs(dict(kwargs), name))
        return cls(input_adapters=input_adapters, output_adapters=output_adapters, **args)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{cls.__name__} with a ViT-{vit} encoder ({preset['dim_tokens']} wide, {preset['depth']} "
                     f"blocks, {preset['num_heads']} heads).")
    return register_model(build)


pretrain_multimae_tiny = _constructor(MultiMAE, "pretrain_multimae_tiny", "tiny")
pretrain_multimae_small = _constructor(MultiMAE, "pretrain_multimae_small", "small")
pretrain_multimae_base = _constructor(MultiMAE, "pretrain_multimae_base", "base")
pretrain_multimae_large = _constructor(MultiMAE, "pretrain_multimae_large", "large")
pretrain_multimae_huge = _constructor(MultiMAE, "pretrain_multimae_huge", "huge")
multivit_tiny = _constructor(MultiViT, "multivit_tiny", "tiny")
multivit_small = _constructor(MultiViT, "multivit_small", "small")
multivit_base = _constructor(MultiViT, "multivit_base", "base")
multivit_large = _constructor(MultiViT, "multivit_large", "large")
multivit_huge = _constructor(MultiViT, "multivit_huge", "huge")
