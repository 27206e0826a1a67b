"""Two-stage RGB-D pre-training on the MultiMAE building blocks: model wrappers, masking and losses.

Re-implements, from the paper's description (no code was released), Jamal & Mohareri, "Multi-Modal
Contrastive Masked Autoencoders: A Two-Stage Progressive Pre-training Approach for RGBD Datasets"
(CVPR 2025). PRETRAINING.md says which choices are the paper's and which are ours.
The losses and metrics live in :mod:`multimae.rgbd_losses` (re-exported here).

* Stage 1 (:class:`RGBDContrastStage1`): RGB and depth are encoded as two separate token streams, without
  masking, by one encoder per modality (or the shared MultiMAE encoder). Patch tokens go through a small
  MLP head per modality and are L2-normalised; a symmetric patch-level InfoNCE (:func:`patch_info_nce`)
  pairs every RGB patch with the depth patch at the same position, with a learnable temperature. Its
  negatives can be the depth patches at the same position in the other images of the batch, which the
  position embedding cannot tell apart: only the content can.
* Stage 2 (:class:`RGBDMaskedStage2`): every stream keeps a random subset of its patches
  (:func:`random_keep`), the depth input carries Gaussian noise ``sigma * e`` and an embedding of ``sigma``
  (:class:`SigmaEmbedding`) is added to the depth tokens before the encoder. One depth decoder (a MultiMAE
  ``SpatialOutputAdapter`` reading the visible tokens of both streams) predicts the clean depth on hidden
  patches (:func:`masked_pixel_mse`); a per-patch MLP (:class:`DenoiseHead`) reads each visible depth token
  with its noisy pixels and predicts the noise. Each stream's features, max-pooled over its visible tokens,
  are distilled from the layer-normed features of the frozen stage-1 model for the same tokens
  (:func:`max_pool_distill_loss`).

In stage 1 the streams never mix inside the encoder, so the RGB stream sees exactly what RGB-only
fine-tuning sees, and it may encode a random subset of the patches (the same positions in every image and
both modalities, so the same-position negatives stay at one position) to make it cheaper. In stage 2 they
either stay two streams that meet in the decoder, or (``joint``) form one sequence through one encoder,
as in MultiMAE. The encoder part keeps MultiMAE's
state-dict keys (``encoder.*``, ``global_tokens``, ``input_adapters.{rgb,depth}.*``), so checkpoints load
with ``--finetune`` in the fine-tuning scripts; the other keys (``depth_encoder.*``,
``depth_global_tokens``, ``proj_heads.*``, ``logit_scale``, ``sigma_embed.*``, ``output_adapters.*``) are
ignored there.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from multimae import MultiMAE, SpatialOutputAdapter
from multimae.rgbd_losses import (NEGATIVES, masked_patch_mse, masked_pixel_mse, max_pool_distill_loss,
                                  max_pool_features, patch_info_nce, patch_retrieval_accuracy, stream_valid)

__all__ = [
    "MODALITIES", "RGBDEncoder", "RGBDContrastStage1", "RGBDMaskedStage2", "ProjectionHead", "SigmaEmbedding",
    "ResidualXattnSpatialOutputAdapter", "DenoiseHead", "NEGATIVES", "patchify", "masked_patch_mse",
    "sinusoidal_embedding", "num_visible_patches", "dirichlet_visible_split", "random_keep", "keep_to_mask",
    "patch_valid_fraction", "decoder_inputs", "patch_info_nce", "gather_tokens", "patch_retrieval_accuracy",
    "masked_pixel_mse",
    "max_pool_features", "max_pool_distill_loss", "stream_valid",
]

MODALITIES = ("rgb", "depth")


def _init_linear(m: nn.Module) -> None:
    # the same Xavier / zero-bias init MultiMAE gives its own Linear layers
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _run_blocks(blocks: nn.Sequential, x: Tensor, grad_checkpointing: bool) -> Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if grad_checkpointing and torch.is_grad_enabled() else block(x)
    return x


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """``tokens (B, N, D)``, ``ids (B, k)`` -> ``(B, k, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# ---------------------------------------------------------------------------------------------- modules
class RGBDEncoder(nn.Module):
    """RGB and depth as two token streams through the shared encoder of ``backbone`` (a MultiMAE whose
    input adapters include 'rgb' and 'depth'), or the depth stream through ``depth_backbone``'s encoder.

    The backbone's modules are taken over under their MultiMAE names, so the state dict has MultiMAE keys.
    ``encode`` returns per stream ``(B, n + G, D)`` tokens, the ``G`` global tokens last as in MultiMAE.
    """

    def __init__(self, backbone: MultiMAE, depth_backbone: Optional[MultiMAE] = None):
        super().__init__()
        missing = [m for m in MODALITIES if m not in backbone.input_adapters]
        if missing:
            raise ValueError(f"RGBDEncoder needs input adapters for {list(MODALITIES)}; the backbone has "
                             f"{list(backbone.input_adapters)} (missing {missing})")
        self.input_adapters = backbone.input_adapters
        self.encoder = backbone.encoder
        self.global_tokens = backbone.global_tokens
        self.num_global_tokens, self.dim_tokens = backbone.num_global_tokens, backbone.dim_tokens
        self.separate_encoders = depth_backbone is not None
        if depth_backbone is not None:
            if (depth_backbone.dim_tokens, depth_backbone.num_global_tokens) != (self.dim_tokens,
                                                                               self.num_global_tokens):
                raise ValueError("the depth encoder must have the width and global tokens of the rgb encoder")
            self.depth_encoder = depth_backbone.encoder
            self.depth_global_tokens = depth_backbone.global_tokens
        self.grad_checkpointing = False

    # timm conventions ---------------------------------------------------------------------------
    def get_num_layers(self) -> int:
        return len(self.encoder)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = {"global_tokens", "depth_global_tokens", "logit_scale"}
        for prefix in ("input_adapters", "output_adapters"):
            for task, adapter in (getattr(self, prefix, None) or {}).items():
                if hasattr(adapter, "no_weight_decay"):
                    names |= {f"{prefix}.{task}.{n}" for n in adapter.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^global_tokens|^depth_global_tokens|^input_adapters",
                    blocks=r"^(?:depth_)?encoder\.(\d+)" if coarse else [(r"^(?:depth_)?encoder\.(\d+)", None)])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for adapter in (getattr(self, "output_adapters", None) or {}).values():
            if hasattr(adapter, "set_grad_checkpointing"):
                adapter.set_grad_checkpointing(enable)

    # streams -------------------------------------------------------------------------------------
    def _stream(self, modality: str) -> Tuple[nn.Sequential, Tensor]:
        if modality == "depth" and self.separate_encoders:
            return self.depth_encoder, self.depth_global_tokens
        return self.encoder, self.global_tokens

    def tokenize(self, x: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """``{'rgb': (B, 3, H, W), 'depth': (B, 1, H, W)}`` -> ``{m: (B, N, D)}`` (modalities present in ``x``)."""
        return {m: self.input_adapters[m](x[m]) for m in MODALITIES if m in x}

    def encode(self, tokens: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """``{m: (B, n_m, D)}`` -> ``{m: (B, n_m + G, D)}``: each stream on its own; with a shared encoder and
        equal lengths both streams run as one batch of ``2B`` sequences."""
        seqs = {m: torch.cat([t, self._stream(m)[1].expand(t.shape[0], -1, -1)], dim=1) for m, t in tokens.items()}
        shapes = {tuple(s.shape) for s in seqs.values()}
        if not self.separate_encoders and len(seqs) > 1 and len(shapes) == 1:
            out = _run_blocks(self.encoder, torch.cat(list(seqs.values()), dim=0), self.grad_checkpointing)
            return dict(zip(seqs, out.chunk(len(seqs), dim=0)))
        return {m: _run_blocks(self._stream(m)[0], s, self.grad_checkpointing) for m, s in seqs.items()}

    def encode_joint(self, tokens: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """``{m: (B, n_m, D)}`` -> ``{m: (B, n_m + G, D)}`` with both modalities in ONE sequence through the
        (shared) encoder, so every token attends to the other modality's visible tokens as in MultiMAE; each
        stream gets the patch tokens of its modality and the shared global tokens."""
        names = list(tokens)
        lengths = [tokens[m].shape[1] for m in names]
        B = tokens[names[0]].shape[0]
        seq = torch.cat([tokens[m] for m in names] + [self.global_tokens.expand(B, -1, -1)], dim=1)
        out = _run_blocks(self.encoder, seq, self.grad_checkpointing)
        glob = out[:, sum(lengths):]
        return {m: torch.cat([t, glob], dim=1) for m, t in zip(names, out[:, :sum(lengths)].split(lengths, dim=1))}

    def encode_visible(self, x: Mapping[str, Tensor], keep: Optional[Mapping[str, Tensor]] = None
                       ) -> Dict[str, Tensor]:
        """Tokenise, keep the patches ``keep[m] (B, k_m)`` of each stream (all if absent) and encode."""
        tokens = self.tokenize(x)
        if keep:
            tokens = {m: gather_tokens(t, keep[m]) if m in keep else t for m, t in tokens.items()}
        return self.encode(tokens)

    def patch_tokens(self, encoded: Tensor) -> Tensor:
        """``(B, n + G, D) -> (B, n, D)``: drop the global tokens."""
        return encoded[:, :encoded.shape[1] - self.num_global_tokens]


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear: ``(..., dim_in) -> (..., dim_out)``."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim_in, dim_hidden), nn.GELU(), nn.Linear(dim_hidden, dim_out)
        self.apply(_init_linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RGBDContrastStage1(RGBDEncoder):
    """Stage 1: full RGB and full depth, one stream each, projected per patch for the InfoNCE.

    ``forward({'rgb': (B, 3, H, W), 'depth': (B, 1, H, W)})`` -> ``{'z': {m: (B, N, proj_dim)} L2-normalised,
    'features': {m: (B, N + G, D)}, 'logit_scale': ()}``; ``logit_scale = 1 / temperature`` (at most 100).
    """

    def __init__(self, backbone: MultiMAE, depth_backbone: Optional[MultiMAE] = None, proj_dim: int = 256,
                 proj_hidden_dim: Optional[int] = None, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__(backbone, depth_backbone)
        hidden = proj_hidden_dim or self.dim_tokens
        self.proj_heads = nn.ModuleDict({m: ProjectionHead(self.dim_tokens, hidden, proj_dim) for m in MODALITIES})
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learn_temperature)

    def forward(self, x: Mapping[str, Tensor], keep: Optional[Mapping[str, Tensor]] = None) -> Dict[str, Any]:
        """``keep {m: (B, k)}``: encode and project only these patches (``z[m]`` is then ``(B, k, P)``)."""
        feats = self.encode_visible(x, keep)
        z = {m: F.normalize(self.proj_heads[m](self.patch_tokens(f)).float(), dim=-1) for m, f in feats.items()}
        return {"z": z, "features": feats, "logit_scale": self.logit_scale.clamp(max=math.log(100.0)).exp()}


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Diffusion-time-step features of ``t (B,)``: ``(B, dim)`` = [cos(t f_i), sin(t f_i)], geometric f_i."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class SigmaEmbedding(nn.Module):
    """Noise level ``sigma (B,)`` -> ``(B, dim)``: sinusoidal features of ``sigma * scale`` (``scale=1000``
    maps sigma = 1 to the last step of a 1000-step diffusion schedule) -> Linear -> SiLU -> Linear.

    The last Linear starts at zero, so a stage-2 encoder starts out computing exactly its stage-1 features.
    """

    def __init__(self, dim: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.apply(_init_linear)
        nn.init.zeros_(self.mlp[2].weight)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(sigma * self.scale, self.freq_dim))


class DenoiseHead(nn.Module):
    """Per visible depth patch: ``[norm(token), noisy pixels, sigma embedding]`` -> MLP -> a correction ``c``
    of the patch's mean; the predicted noise is ``noisy - (mean(noisy) + c)``, i.e. the head estimates the
    clean patch and the noise is what is left. ``forward(tokens (B, k, D), noisy_patches (B, k, p*p),
    sigma_emb (B, D)) -> (B, k, p*p)``.

    A decoder that predicts per-pixel noise from a token only (a 192-wide encoder token for 256 noisy
    pixels, a 128-wide decoder) cannot: the noise does not fit through the token, and the loss stays at
    ``E[sigma^2]``, the loss of predicting no noise. With the noisy pixels at hand, the head has to tell the
    noise from the depth structure within the patch (edges, slopes: what the encoder token describes), and
    how much of the deviation from the mean is noise depends on the noise level. The last layer starts at
    zero, so the first prediction is the deviation from the patch mean.
    """

    def __init__(self, dim_tokens: int, patch_pixels: int, dim_hidden: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(dim_tokens)
        self.mlp = nn.Sequential(nn.Linear(2 * dim_tokens + patch_pixels, dim_hidden), nn.GELU(),
                                 nn.Linear(dim_hidden, dim_hidden), nn.GELU(), nn.Linear(dim_hidden, patch_pixels))
        self.apply(_init_linear)
        nn.init.zeros_(self.mlp[-1].weight)

    def forward(self, tokens: Tensor, noisy_patches: Tensor, sigma_emb: Tensor) -> Tensor:
        noisy = noisy_patches.to(tokens.dtype)
        cond = sigma_emb.unsqueeze(1).expand(-1, tokens.shape[1], -1).to(tokens.dtype)
        clean = noisy.mean(dim=-1, keepdim=True) + self.mlp(torch.cat([self.norm(tokens), noisy, cond], -1))
        return noisy - clean


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W) -> (B, (H/p) * (W/p), C * p * p)``, patches in raster order (the token order)."""
    return F.unfold(x, patch_size, stride=patch_size).transpose(1, 2)


class ResidualXattnSpatialOutputAdapter(SpatialOutputAdapter):
    """MultiMAE's pre-training decoder with a residual connection around its cross-attention:
    ``q' = norm(q); x = q' + xattn(q', norm(ctx))`` instead of ``x = xattn(q', norm(ctx))``. Same arguments,
    parameters and state-dict keys as ``SpatialOutputAdapter``.

    Without the residual a query keeps nothing of its own token except what the attention routes back, so
    the noise on the visible depth patches (per-pixel, unpredictable from any other token) is not learned:
    in a small test the denoising loss stayed at ``E[sigma^2]`` (predicting zero noise) without it and fell
    to about a quarter of that with it. The residual is the *normalised* query: the raw one carries the
    un-normalised encoder output (MultiMAE has no final encoder norm), which made the first predictions of a
    stage-2 run from a stage-1 encoder about 40 times too large.
    """

    def _cross_attend(self, queries: Tensor, context: Tensor) -> Tensor:
        q = self.query_norm(queries)
        x = q + self.decoder(q, self.context_norm(context))
        return x + self.mlp(self.out_norm(x))


class RGBDMaskedStage2(RGBDEncoder):
    """Stage 2: masked, noisy streams; a depth decoder predicts the clean depth of the hidden patches and a
    :class:`DenoiseHead` the noise of the visible ones. ``backbone.output_adapters`` must hold 'depth' (and
    'rgb' for RGB reconstruction), ``SpatialOutputAdapter``s with ``context_tasks`` rgb and depth.

    ``forward(x, sigma (B,), keep {m: (B, k_m)})`` -> ``{'preds': {task: (B, C, H, W), 'noise': (B, k_depth,
    p*p)}, 'features': {m: (B, k_m + G, D)}}``; ``x['depth']`` is the noisy depth. The sigma embedding is
    added to the depth tokens before the encoder, so every layer knows the noise level. Without a denoise
    head (``denoise_hidden_dim=0``) the depth decoder's output on the visible patches is the noise prediction.
    ``joint=True``: the visible tokens of both modalities form one sequence through the shared encoder
    (:meth:`RGBDEncoder.encode_joint`, cross-modal attention as in MultiMAE) instead of two streams.
    """

    def __init__(self, backbone: MultiMAE, depth_backbone: Optional[MultiMAE] = None, sigma_freq_dim: int = 256,
                 sigma_scale: float = 1000.0, denoise_hidden_dim: int = 512, joint: bool = False):
        super().__init__(backbone, depth_backbone)
        if joint and depth_backbone is not None:
            raise ValueError("joint encoding runs both modalities through one encoder: pass no depth_backbone")
        self.joint = joint
        if backbone.output_adapters is None or "depth" not in backbone.output_adapters:
            raise ValueError("RGBDMaskedStage2 needs a 'depth' output adapter in the backbone")
        self.output_adapters = backbone.output_adapters
        self.sigma_embed = SigmaEmbedding(self.dim_tokens, sigma_freq_dim, sigma_scale)
        p = self.input_adapters["depth"].P_H * self.input_adapters["depth"].P_W
        self.denoise_head = DenoiseHead(self.dim_tokens, p, denoise_hidden_dim) if denoise_hidden_dim else None

    def forward(self, x: Mapping[str, Tensor], sigma: Tensor, keep: Mapping[str, Tensor]) -> Dict[str, Any]:
        tokens = self.tokenize(x)
        num_patches = next(iter(tokens.values())).shape[1]
        sigma_emb = self.sigma_embed(sigma)
        tokens["depth"] = tokens["depth"] + sigma_emb.unsqueeze(1).to(tokens["depth"].dtype)
        visible = {m: gather_tokens(t, keep[m]) for m, t in tokens.items()}
        feats = self.encode_joint(visible) if self.joint else self.encode(visible)
        image_size = tuple(x["rgb"].shape[-2:])
        context, info, ids_keep, ids_restore = decoder_inputs(feats, keep, num_patches, self.num_global_tokens,
                                                              image_size)
        preds = {task: adapter(encoder_tokens=context, input_info=info, ids_keep=ids_keep, ids_restore=ids_restore)
                 for task, adapter in self.output_adapters.items()}
        if self.denoise_head is not None:
            noisy = gather_tokens(patchify(x["depth"], self.input_adapters["depth"].P_H), keep["depth"])
            preds["noise"] = self.denoise_head(self.patch_tokens(feats["depth"]), noisy, sigma_emb)
        return {"preds": preds, "features": feats}


# ---------------------------------------------------------------------------------------------- masking
def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per stream: ``round(num_patches * (1 - mask_ratio))``, at least 1 (196, 0.8 -> 39)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def dirichlet_visible_split(total: int, num_patches: int, alpha: float = 1.0) -> Tuple[int, int]:
    """Split a budget of ``total`` visible patches between rgb and depth with one ``Dirichlet(alpha, alpha)``
    draw (on the CPU, so no device synchronisation); each stream gets 1..num_patches patches.

    One split per batch: the streams are encoded separately, so per-sample lengths would need padding.
    """
    share = float(torch.distributions.Dirichlet(torch.full((2,), float(alpha))).sample()[0])
    lo, hi = max(1, total - num_patches), min(num_patches, total - 1)
    k_rgb = min(max(int(round(share * total)), lo), hi)
    return k_rgb, total - k_rgb


def random_keep(batch_size: int, num_patches: int, num_keep: int, device: torch.device | str = "cpu") -> Tensor:
    """A uniformly random subset of ``num_keep`` patch indices per sample, ascending: ``(B, num_keep)``."""
    noise = torch.rand(batch_size, num_patches, device=device)
    return torch.argsort(noise, dim=1)[:, :num_keep].sort(dim=1).values


def keep_to_mask(keep: Tensor, num_patches: int) -> Tensor:
    """``keep (B, k)`` indices -> int64 mask ``(B, num_patches)``, 1 = hidden (MultiMAE's convention)."""
    mask = torch.ones(keep.shape[0], num_patches, dtype=torch.long, device=keep.device)
    return mask.scatter(1, keep, 0)


def patch_valid_fraction(valid: Tensor, patch_size: int) -> Tensor:
    """Fraction of valid pixels per patch: ``valid (B, 1, H, W)`` bool -> ``(B, (H/p) * (W/p))`` float."""
    return F.avg_pool2d(valid.float(), patch_size).flatten(1)


def decoder_inputs(feats: Mapping[str, Tensor], keep: Mapping[str, Tensor], num_patches: int, num_global: int,
                   image_size: Tuple[int, int]) -> Tuple[Tensor, dict, Tensor, Tensor]:
    """Arguments of a MultiMAE ``SpatialOutputAdapter`` for separately encoded streams.

    ``feats[m] (B, k_m + G, D)`` and ``keep[m] (B, k_m)`` for ``m`` in rgb, depth -> ``(context (B, Σk + 2G, D)``
    (visible tokens of both streams, then the global tokens of both), ``input_info`` (rgb tokens 0..N-1, depth
    N..2N-1), ``ids_keep (B, Σk)``, ``ids_restore (B, 2N))``, as the adapter receives them from ``MultiMAE``.
    """
    visible, glob, kept, hidden, tasks = [], [], [], [], {}
    for i, m in enumerate(MODALITIES):
        k = keep[m].shape[1]
        visible.append(feats[m][:, :k])
        glob.append(feats[m][:, k:])
        order = torch.argsort(keep_to_mask(keep[m], num_patches), dim=1, stable=True) + i * num_patches
        kept.append(order[:, :k])
        hidden.append(order[:, k:])
        tasks[m] = {"num_tokens": num_patches, "has_2d_posemb": True, "start_idx": i * num_patches,
                    "end_idx": (i + 1) * num_patches}
    ids_shuffle = torch.cat(kept + hidden, dim=1)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(
        1, ids_shuffle, torch.arange(ids_shuffle.shape[1], device=ids_shuffle.device).expand_as(ids_shuffle))
    info = {"tasks": tasks, "image_size": tuple(image_size), "num_task_tokens": len(MODALITIES) * num_patches,
            "num_global_tokens": len(MODALITIES) * num_global}
    return torch.cat(visible + glob, dim=1), info, torch.cat(kept, dim=1), ids_restore
