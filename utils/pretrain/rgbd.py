"""The two-stage RGB-D method as configurations of ``run_pretraining_multimae.py``: its arguments, checks,
model / teacher / data construction and the step functions handed to the shared :class:`utils.engine.trainer.Trainer`.

    python run_pretraining_multimae.py -c cfgs/pretrain/rgbd_contrastive_stage1_tiny.yaml
    python run_pretraining_multimae.py -c cfgs/pretrain/rgbd_contrastive_stage2_tiny.yaml

``--method multimae`` (default) is MultiMAE pre-training (:mod:`utils.pretrain.multimae`); ``rgbd_stage1`` and
``rgbd_stage2`` are the two stages of :mod:`multimae.rgbd_contrastive`. :func:`pretrain_method` gives the
script the builders of the chosen method.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from multimae import SpatialOutputAdapter
from utils.checkpoint import CheckpointError, load_checkpoint, load_model_state
from utils.config import add_bool_arg
from utils.config.checks import check_path_exists
from utils.dist import DistContext
from utils.engine.factory import TrainingPlan
from utils.jobs import Parts, register_job
from utils.pretrain.config import PretrainConfig
from utils.pretrain.multimae import MultiMAEPretraining, build_pretrain_loader, validate_pretrain_args
from utils.data.depth import robust_standardize
from utils.data.modalities import build_input_adapters, get_modality, parse_domains
from multimae.rgbd_contrastive import (MODALITIES, NEGATIVES, RGBDContrastStage1, RGBDMaskedStage2,
                                    ResidualXattnSpatialOutputAdapter, dirichlet_visible_split, gather_tokens,
                                    keep_to_mask, masked_patch_mse, masked_pixel_mse, max_pool_distill_loss,
                                    num_visible_patches, patch_info_nce, patch_retrieval_accuracy,
                                    patch_valid_fraction, patchify, random_keep, stream_valid)

__all__ = ["METHODS", "add_rgbd_args", "validate_rgbd_args", "validate_method_args", "prepare_rgbd",
           "RGBDStage1Step", "RGBDStage2Step", "build_rgbd_model", "build_rgbd_teacher", "build_rgbd_step",
           "RGBDStage1", "RGBDStage2"]

METHODS = ("multimae", "rgbd_stage1", "rgbd_stage2")
# architecture arguments a stage-2 student must share with its stage-1 teacher (it starts from its weights)
_ARCH_KEYS = ("model", "encoder_depth", "encoder_dim", "encoder_num_heads", "num_global_tokens", "patch_size",
              "input_size", "separate_encoders")
_ENCODER_PREFIXES = ("encoder.", "depth_encoder.", "input_adapters.", "global_tokens", "depth_global_tokens")


def add_rgbd_args(parser: argparse.ArgumentParser) -> None:
    """``--method`` and the arguments of the two-stage RGB-D method (ignored by ``--method multimae``)."""
    parser.add_argument("--method", type=str, default="multimae", choices=METHODS,
                        help="multimae (default) or a stage of the two-stage RGB-D method (PRETRAINING.md); the "
                             "RGB-D stages do not use num_encoded_tokens, alphas (except --mask_sampler dirichlet), "
                             "out_domains, extra_norm_pix_loss, loss_on_unmasked, fp32_output_adapters")
    g = parser.add_argument_group("two-stage RGB-D method (--method rgbd_stage1 / rgbd_stage2)")
    add_bool_arg(g, "separate_encoders", False, "one encoder per modality (paper; on in the configs), else the "
                 "shared MultiMAE encoder")
    add_bool_arg(g, "use_mask_valid", False, "read mask_valid/ and leave invalid depth out of the input and losses")
    g.add_argument("--min_valid_fraction", type=float, default=0.5,
                   help="a patch counts as valid depth when at least this fraction of its pixels is valid")
    g.add_argument("--temperature", type=float, default=0.07, help="stage 1: initial InfoNCE temperature")
    add_bool_arg(g, "learn_temperature", True, "stage 1: learn the temperature")
    g.add_argument("--contrast_negatives", type=str, default="position", choices=list(NEGATIVES),
                   help="stage 1: negatives are the depth patches at the same position in the other images of "
                        "the batch (position), the other patches of the same image (image: the paper's, solvable "
                        "by the position embedding alone) or all patches of the batch (batch)")
    g.add_argument("--contrast_patch_fraction", type=float, default=1.0,
                   help="stage 1: encode and contrast this random fraction of the positions (one subset per batch, "
                        "both modalities); costs about that fraction of a full step")
    g.add_argument("--proj_dim", type=int, default=256, help="stage 1: projection head output width")
    g.add_argument("--proj_hidden_dim", type=int, default=None, help="stage 1: head hidden width (default: encoder)")
    g.add_argument("--mask_ratio", type=float, default=0.8, help="stage 2: hidden fraction of each modality")
    g.add_argument("--mask_sampler", type=str, default="independent", choices=["independent", "dirichlet"],
                   help="stage 2: fixed count per modality, or one Dirichlet(--alphas) split per batch")
    g.add_argument("--sigma_max", type=float, default=1.0,
                   help="stage 2: depth noise std drawn per sample from U[0, sigma_max] (standardised depth units)")
    add_bool_arg(g, "joint_encoder", False, "stage 2: both modalities' visible tokens in one sequence through one "
                 "encoder (cross-modal attention, as MultiMAE), initialised from stage 1's rgb encoder")
    add_bool_arg(g, "rgb_reconstruction", False, "stage 2: also reconstruct the hidden rgb patches")
    add_bool_arg(g, "decoder_xattn_residual", True, "stage 2: residual around the decoder's cross-attention "
                 "(MultiMAE's decoder has none; without it the noise on visible patches is not learned)")
    g.add_argument("--denoise_hidden_dim", type=int, default=512,
                   help="stage 2: width of the denoising head that reads each visible depth token with its noisy "
                        "pixels (0: the depth decoder predicts the noise, which it cannot learn)")
    g.add_argument("--distill_tokens", type=str, default="matched", choices=["matched", "all"],
                   help="stage 2: max-pool the teacher over the student's visible tokens (matched) or all of its")
    g.add_argument("--distill_norm", type=str, default="target", choices=["target", "both", "none"],
                   help="stage 2: layer-norm the teacher tokens before the max-pool (target: unit-scale targets the "
                        "raw student features must match), the tokens of student and teacher (both), or none")
    g.add_argument("--distill_beta", type=float, default=1.0, help="stage 2: smooth-L1 beta of the distillation")
    g.add_argument("--recon_weight", type=float, default=1.0, help="stage 2: weight of the masked reconstruction")
    g.add_argument("--denoise_weight", type=float, default=1.0, help="stage 2: weight of the noise prediction")
    g.add_argument("--distill_weight", type=float, default=1.0, help="stage 2: weight of the feature distillation")
    g.add_argument("--teacher_checkpoint", type=str, default="",
                   help="stage 2: the stage-1 checkpoint (teacher, and initialisation unless "
                        "--no_init_from_teacher)")
    g.add_argument("--teacher_input", type=str, default="full", choices=["full", "same"],
                   help="stage 2: the teacher sees the full clean images, or the student's masked noisy input")
    add_bool_arg(g, "init_from_teacher", True, "stage 2: start the student's encoder from the stage-1 checkpoint "
                 "(paper); off: a random initialisation, stage 1 is then only the distillation teacher")


def validate_rgbd_args(cfg: PretrainConfig) -> list[str]:
    """Checks of the RGB-D method's arguments (nothing for ``--method multimae``)."""
    if cfg.method == "multimae":
        return []
    errors = []
    try:
        ins = parse_domains(cfg.in_domains)
    except ValueError as e:
        return [f"--in_domains: {e}"]
    if sorted(ins) != sorted(MODALITIES):
        errors.append(f"--method {cfg.method} uses --in_domains rgb-depth, got '{cfg.in_domains}'")
    if cfg.input_size % cfg.patch_size:
        errors.append(f"--input_size {cfg.input_size} is not a multiple of --patch_size {cfg.patch_size}")
    if not 0.0 <= cfg.mask_ratio < 1.0:
        errors.append(f"--mask_ratio must be in [0, 1), got {cfg.mask_ratio}")
    if not 0.0 <= cfg.min_valid_fraction <= 1.0:
        errors.append(f"--min_valid_fraction must be in [0, 1], got {cfg.min_valid_fraction}")
    if not 0.0 < cfg.contrast_patch_fraction <= 1.0:
        errors.append(f"--contrast_patch_fraction must be in (0, 1], got {cfg.contrast_patch_fraction}")
    if cfg.temperature <= 0:
        errors.append(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.contrast_negatives in ("position", "batch") and cfg.method == "rgbd_stage1" and cfg.batch_size < 2:
        errors.append(f"--contrast_negatives {cfg.contrast_negatives} takes negatives from other images: "
                      f"--batch_size must be >= 2, got {cfg.batch_size}")
    if cfg.denoise_hidden_dim < 0 or cfg.distill_beta <= 0:
        errors.append(f"--denoise_hidden_dim must be >= 0 and --distill_beta > 0, got {cfg.denoise_hidden_dim}, "
                      f"{cfg.distill_beta}")
    if cfg.sigma_max < 0:
        errors.append(f"--sigma_max must be >= 0, got {cfg.sigma_max}")
    for name in ("recon_weight", "denoise_weight", "distill_weight"):
        if getattr(cfg, name) < 0:
            errors.append(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.task_balancer != "none":
        errors.append(f"--task_balancer {cfg.task_balancer} is a MultiMAE option; the RGB-D method weighs its losses "
                      f"with --recon_weight/--denoise_weight/--distill_weight")
    if min(cfg.proj_dim, cfg.proj_hidden_dim or 1) < 1:
        errors.append("--proj_dim and --proj_hidden_dim must be >= 1")
    if cfg.method == "rgbd_stage2" and not cfg.teacher_checkpoint and cfg.distill_weight > 0:
        errors.append("--method rgbd_stage2 needs --teacher_checkpoint (the stage-1 checkpoint it starts from and "
                      "distils); pass --distill_weight 0 to train stage 2 from scratch without a teacher")
    if cfg.teacher_checkpoint and cfg.method == "rgbd_stage2":
        err = check_path_exists("teacher_checkpoint", cfg.teacher_checkpoint, "file")
        if err:
            errors.append(err)
    if cfg.use_mask_valid and cfg.data_path:

        if os.path.isdir(cfg.data_path) and not os.path.isdir(os.path.join(cfg.data_path, "mask_valid")):
            errors.append(f"--use_mask_valid: '{cfg.data_path}' has no mask_valid/ folder")
    return errors


def validate_method_args(cfg: PretrainConfig) -> list[str]:
    """The pre-training checks of the chosen method (``utils.pretrain.multimae.validate_pretrain_args`` for multimae)."""
    if cfg.method == "multimae":
        return validate_pretrain_args(cfg)
    return validate_rgbd_args(cfg)


# ---------------------------------------------------------------------------------------------- steps
def prepare_rgbd(x: dict[str, Tensor], standardize_depth: bool, use_mask_valid: bool
                 ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(rgb, depth, valid)`` on the device: depth robust-standardised (statistics of valid pixels only)
    when asked, and 0 wherever ``mask_valid`` is False, so invalid depth values reach neither input nor loss."""
    valid = x["mask_valid"].bool() if use_mask_valid else None
    depth = x["depth"].float()
    if standardize_depth:
        depth = robust_standardize(depth, valid)
    elif valid is not None:
        depth = torch.where(valid, depth, torch.zeros_like(depth))
    return x["rgb"], depth, valid


def _batch_dict(batch: Any) -> dict[str, Tensor]:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


class RGBDStage1Step:
    """Stage 1: ``step(model, (x, label)) -> (loss, logs)`` with the symmetric patch InfoNCE.

    Patches with less than ``min_valid_fraction`` valid depth are neither anchors nor negatives.
    Logs ``loss``, ``temperature``, ``patch_acc`` (rgb -> depth top-1 retrieval within the image),
    ``patch_acc_other_image`` (the same against the depth of another image of the batch: close to
    ``patch_acc`` when the features match patches by position instead of content) and
    ``patch_acc_position`` (retrieval among the depth patches at the same position in every image of the
    batch, chance ``1 / B``: content only). ``patch_fraction < 1``: only a random subset of the positions
    (one per batch, both modalities) is encoded and contrasted, which costs about that fraction.
    """

    def __init__(self, patch_size: int, negatives: str = "position", standardize_depth: bool = True,
                 use_mask_valid: bool = False, min_valid_fraction: float = 0.5, patch_fraction: float = 1.0):
        if not 0.0 < patch_fraction <= 1.0:
            raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
        self.patch_size, self.negatives, self.patch_fraction = patch_size, negatives, patch_fraction
        self.standardize_depth, self.use_mask_valid = standardize_depth, use_mask_valid
        self.min_valid_fraction = min_valid_fraction

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        rgb, depth, valid = prepare_rgbd(_batch_dict(batch), self.standardize_depth, self.use_mask_valid)
        keep = None
        pv = None if valid is None else patch_valid_fraction(valid, self.patch_size) >= self.min_valid_fraction
        if self.patch_fraction < 1.0:  # one subset for the batch: negatives at one position stay at one position
            B, N = rgb.shape[0], (rgb.shape[-2] // self.patch_size) * (rgb.shape[-1] // self.patch_size)
            ids = random_keep(1, N, max(1, round(N * self.patch_fraction)), rgb.device).expand(B, -1)
            keep = {m: ids for m in MODALITIES}
            pv = stream_valid(pv, ids)
        out = model({"rgb": rgb, "depth": depth}) if keep is None else model({"rgb": rgb, "depth": depth}, keep)
        z_rgb, z_depth = out["z"]["rgb"], out["z"]["depth"]
        loss = patch_info_nce(z_rgb, z_depth, out["logit_scale"], pv, self.negatives)
        z_rgb, z_depth = z_rgb.detach(), z_depth.detach()
        # the same retrieval against the depth of another image: as high as patch_acc when the features
        # encode the patch position rather than the content (the shortcut of within-image negatives)
        other = z_depth.roll(1, dims=0)
        pv_other = None if pv is None else pv & pv.roll(1, dims=0)
        return loss, {"loss": loss.detach(), "temperature": 1.0 / out["logit_scale"].detach(),
                      "patch_acc": patch_retrieval_accuracy(z_rgb, z_depth, pv),
                      "patch_acc_other_image": patch_retrieval_accuracy(z_rgb, other, pv_other),
                      "patch_acc_position": patch_retrieval_accuracy(z_rgb, z_depth, pv, "position")}


class RGBDStage2Step:
    """Stage 2: ``step(model, (x, label)) -> (loss, logs)``.

    Per batch: visible patches per modality (``mask_ratio`` each, or a Dirichlet split of the same total),
    ``sigma ~ U[0, sigma_max]`` per sample and noise ``sigma * e`` on valid depth pixels; the decoder output
    is scored against the clean depth on hidden patches (``recon``), the denoising head's (or, without one,
    the decoder's) output against the noise on visible ones (``denoise``), both on valid pixels; ``distill``
    is the mean over modalities of the smooth-L1 between max-pooled student and teacher features of the same
    visible tokens (``distill_tokens='all'``: the teacher's pooled over all its tokens), teacher (and student)
    tokens layer-normed as ``distill_norm`` says, invalid depth patches left out of the max.
    ``loss = recon_weight * (recon [+ rgb_recon]) + denoise_weight * denoise + distill_weight * distill``; the
    weights are logged beside the losses.
    """

    def __init__(self, teacher: Optional[RGBDContrastStage1], patch_size: int, mask_ratio: float = 0.8,
                 mask_sampler: str = "independent", alphas: float = 1.0, sigma_max: float = 1.0,
                 recon_weight: float = 1.0, denoise_weight: float = 1.0, distill_weight: float = 1.0,
                 teacher_input: str = "full", standardize_depth: bool = True, use_mask_valid: bool = False,
                 min_valid_fraction: float = 0.5, distill_tokens: str = "matched", distill_norm: str = "target",
                 distill_beta: float = 1.0):
        if mask_sampler not in ("independent", "dirichlet"):
            raise ValueError(f"mask_sampler must be 'independent' or 'dirichlet', got {mask_sampler!r}")
        if teacher_input not in ("full", "same"):
            raise ValueError(f"teacher_input must be 'full' or 'same', got {teacher_input!r}")
        if distill_tokens not in ("matched", "all"):
            raise ValueError(f"distill_tokens must be 'matched' or 'all', got {distill_tokens!r}")
        self.teacher, self.patch_size, self.mask_ratio = teacher, patch_size, mask_ratio
        self.mask_sampler, self.alphas, self.sigma_max = mask_sampler, alphas, sigma_max
        self.weights = {"recon": recon_weight, "denoise": denoise_weight, "distill": distill_weight}
        self.teacher_input = teacher_input
        self.distill_tokens, self.distill_norm, self.distill_beta = distill_tokens, distill_norm, distill_beta
        self.standardize_depth, self.use_mask_valid = standardize_depth, use_mask_valid
        self.min_valid_fraction = min_valid_fraction

    def sample_keep(self, batch_size: int, num_patches: int, device: torch.device) -> dict[str, Tensor]:
        """Visible patch indices per modality, ``{m: (B, k_m)}`` ascending."""
        k = num_visible_patches(num_patches, self.mask_ratio)
        counts = (k, k) if self.mask_sampler == "independent" else \
            dirichlet_visible_split(2 * k, num_patches, self.alphas)
        return {m: random_keep(batch_size, num_patches, n, device) for m, n in zip(MODALITIES, counts)}

    def sample_noise(self, depth: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(sigma (B,), noise (B, 1, H, W))``: ``noise = sigma * e`` on valid pixels, 0 elsewhere."""
        sigma = torch.rand(depth.shape[0], device=depth.device) * self.sigma_max
        noise = sigma.view(-1, 1, 1, 1) * torch.randn_like(depth)
        return sigma, noise if valid is None else noise * valid

    def denoise_loss(self, preds: dict[str, Tensor], noise: Tensor, keep: Tensor, visible: Tensor,
                     valid: Optional[Tensor]) -> Tensor:
        """MSE of the noise prediction on the valid pixels of the visible depth patches ``keep (B, k)``."""
        if "noise" not in preds:
            return masked_pixel_mse(preds["depth"], noise, visible, self.patch_size, valid)
        target = gather_tokens(patchify(noise, self.patch_size), keep)
        weight = None if valid is None else gather_tokens(patchify(valid.to(noise.dtype), self.patch_size), keep)
        return masked_patch_mse(preds["noise"], target, weight)

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        rgb, depth, valid = prepare_rgbd(_batch_dict(batch), self.standardize_depth, self.use_mask_valid)
        B, _, H, W = rgb.shape
        N = (H // self.patch_size) * (W // self.patch_size)
        keep = self.sample_keep(B, N, rgb.device)
        sigma, noise = self.sample_noise(depth, valid)
        out = model({"rgb": rgb, "depth": depth + noise}, sigma, keep)
        preds = out["preds"]
        hidden = keep_to_mask(keep["depth"], N)
        losses = {"recon": masked_pixel_mse(preds["depth"], depth, hidden, self.patch_size, valid),
                  "denoise": self.denoise_loss(preds, noise, keep["depth"], 1 - hidden, valid)}
        if "rgb" in preds:
            losses["rgb_recon"] = masked_pixel_mse(preds["rgb"], rgb, keep_to_mask(keep["rgb"], N), self.patch_size)
        pv = None if valid is None else patch_valid_fraction(valid, self.patch_size) >= self.min_valid_fraction
        if self.teacher is not None:
            losses.update(self.distill(out["features"], rgb, depth, depth + noise, keep, pv))
        w = self.weights
        loss = w["recon"] * (losses["recon"] + losses.get("rgb_recon", 0.0)) + w["denoise"] * losses["denoise"]
        if "distill" in losses:
            loss = loss + w["distill"] * losses["distill"]
        logs = {"loss": loss.detach(), **{f"{k}_loss": v.detach() for k, v in losses.items()},
                **{f"{k}_weight": torch.tensor(v) for k, v in w.items()}}
        return loss, logs

    def distill(self, feats: dict[str, Tensor], rgb: Tensor, depth: Tensor, noisy: Tensor,
                keep: dict[str, Tensor], pv: Optional[Tensor]) -> dict[str, Tensor]:
        """``{'distill', 'distill_rgb', 'distill_depth'}`` against the frozen teacher."""
        teacher = self.teacher
        with torch.no_grad():
            if self.teacher_input == "full":
                t_feats = {m: teacher.patch_tokens(f) for m, f in
                           teacher.encode_visible({"rgb": rgb, "depth": depth}).items()}
                t_keep = {m: None for m in MODALITIES}
                if self.distill_tokens == "matched":  # the teacher's features of the student's visible patches
                    t_feats = {m: gather_tokens(t, keep[m]) for m, t in t_feats.items()}
                    t_keep = keep
            else:
                t_feats = {m: teacher.patch_tokens(f) for m, f in
                           teacher.encode_visible({"rgb": rgb, "depth": noisy}, keep).items()}
                t_keep = keep
        out = {}
        for m in MODALITIES:
            s_valid = stream_valid(pv, keep[m]) if m == "depth" else None
            t_valid = stream_valid(pv, t_keep[m]) if m == "depth" else None
            out[f"distill_{m}"] = max_pool_distill_loss(teacher.patch_tokens(feats[m]), t_feats[m], s_valid, t_valid,
                                                        beta=self.distill_beta, normalize=self.distill_norm)
        out["distill"] = sum(out[f"distill_{m}"] for m in MODALITIES) / len(MODALITIES)
        return out


# ---------------------------------------------------------------------------------------------- building
def _backbone(cfg: PretrainConfig, output_adapters: Optional[dict] = None) -> nn.Module:
    from multimae import create_model

    overrides = {k: v for k, v in (("depth", cfg.encoder_depth), ("dim_tokens", cfg.encoder_dim),
                                   ("num_heads", cfg.encoder_num_heads)) if v is not None}
    return create_model(cfg.model, input_adapters=build_input_adapters(list(MODALITIES), cfg.patch_size,
                                                                        cfg.input_size),
                        output_adapters=output_adapters, num_global_tokens=cfg.num_global_tokens,
                        drop_path_rate=cfg.drop_path, **overrides)


def _stage1_model(cfg: PretrainConfig) -> RGBDContrastStage1:
    depth_backbone = _backbone(cfg) if cfg.separate_encoders else None
    return RGBDContrastStage1(_backbone(cfg), depth_backbone, proj_dim=cfg.proj_dim,
                              proj_hidden_dim=cfg.proj_hidden_dim, temperature=cfg.temperature,
                              learn_temperature=cfg.learn_temperature)


def _stage2_model(cfg: PretrainConfig) -> RGBDMaskedStage2:
    cls = ResidualXattnSpatialOutputAdapter if cfg.decoder_xattn_residual else SpatialOutputAdapter
    decoders = {m: cls(num_channels=get_modality(m).num_channels, stride_level=get_modality(m).stride_level,
                       patch_size_full=cfg.patch_size, image_size=cfg.input_size, dim_tokens=cfg.decoder_dim,
                       depth=cfg.decoder_depth, num_heads=cfg.decoder_num_heads,
                       use_task_queries=cfg.decoder_use_task_queries, task=m, context_tasks=list(MODALITIES),
                       use_xattn=cfg.decoder_use_xattn)
                for m in (MODALITIES if cfg.rgb_reconstruction else ("depth",))}
    # joint: one encoder (stage 1's rgb one) for both modalities; a stage-1 depth encoder is then not used
    depth_backbone = _backbone(cfg) if cfg.separate_encoders and not cfg.joint_encoder else None
    return RGBDMaskedStage2(_backbone(cfg, decoders), depth_backbone, denoise_hidden_dim=cfg.denoise_hidden_dim,
                            joint=cfg.joint_encoder)


def _load_stage1(path: str) -> tuple[dict[str, Tensor], dict]:
    """``(model state dict, config dict)`` of a stage-1 checkpoint; an error names what is wrong."""
    ckpt = load_checkpoint(path, map_location="cpu")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(k.startswith("proj_heads.") for k in state):
        raise CheckpointError(f"--teacher_checkpoint '{path}' is not a stage-1 checkpoint of --method rgbd_stage1 "
                              f"(no 'proj_heads.*' weights)")
    return state, dict(ckpt.get("args") or {})


def _check_same_architecture(cfg: PretrainConfig, stage1: dict, path: str) -> None:
    diff = [f"--{k} {getattr(cfg, k)!r} (stage 1: {stage1[k]!r})" for k in _ARCH_KEYS
            if k in stage1 and _plain(stage1[k]) != _plain(getattr(cfg, k))]
    if diff:
        raise ValueError(f"stage 2 must use the architecture of its stage-1 checkpoint '{path}'; different: "
                         + ", ".join(diff))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def build_rgbd_teacher(cfg: PretrainConfig) -> Optional[RGBDContrastStage1]:
    """The frozen stage-1 model of ``--teacher_checkpoint`` in eval mode (None without a checkpoint), built
    from the configuration stored in the checkpoint."""
    if not cfg.teacher_checkpoint or cfg.distill_weight == 0:
        return None
    state, stage1 = _load_stage1(cfg.teacher_checkpoint)
    _check_same_architecture(cfg, stage1, cfg.teacher_checkpoint)
    names = set(cfg.to_dict())
    teacher = _stage1_model(cfg.replace(**{k: v for k, v in stage1.items() if k in names and k != "config"}))
    load_model_state(teacher, state, strict=True, source=cfg.teacher_checkpoint)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_rgbd_model(cfg: PretrainConfig) -> nn.Module:
    """The stage-1 model, or the stage-2 model with its encoder (input adapters, encoder(s), global tokens)
    initialised from ``--teacher_checkpoint`` (randomly with ``--no_init_from_teacher``)."""
    if cfg.method == "rgbd_stage1":
        return _stage1_model(cfg)
    model = _stage2_model(cfg)
    if cfg.teacher_checkpoint and cfg.init_from_teacher:
        state, stage1 = _load_stage1(cfg.teacher_checkpoint)
        _check_same_architecture(cfg, stage1, cfg.teacher_checkpoint)
        encoder_state = {k: v for k, v in state.items() if k.startswith(_ENCODER_PREFIXES)}
        wanted = [k for k in model.state_dict() if k.startswith(_ENCODER_PREFIXES)]
        missing = [k for k in wanted if k not in encoder_state]
        if missing:
            raise ValueError(f"--teacher_checkpoint '{cfg.teacher_checkpoint}' lacks encoder weights {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} (--separate_encoders must match stage 1)")
        model.load_state_dict(encoder_state, strict=False)
        print(f"Stage 2 starts from the encoder of {cfg.teacher_checkpoint} ({len(wanted)} tensors)")
    elif cfg.teacher_checkpoint:
        print(f"Stage 2 starts from a random initialisation (--no_init_from_teacher); {cfg.teacher_checkpoint} "
              f"is only its teacher")
    return model


def build_rgbd_step(cfg: PretrainConfig, device: torch.device) -> Callable:
    """The step function of ``cfg.method`` (stage 2: with its teacher on ``device``)."""
    common = dict(standardize_depth=cfg.standardize_depth, use_mask_valid=cfg.use_mask_valid,
                  min_valid_fraction=cfg.min_valid_fraction)
    if cfg.method == "rgbd_stage1":
        return RGBDStage1Step(cfg.patch_size, cfg.contrast_negatives, patch_fraction=cfg.contrast_patch_fraction,
                              **common)
    teacher = build_rgbd_teacher(cfg)
    return RGBDStage2Step(teacher.to(device) if teacher is not None else None, cfg.patch_size, cfg.mask_ratio,
                          cfg.mask_sampler, cfg.alphas, cfg.sigma_max, cfg.recon_weight, cfg.denoise_weight,
                          cfg.distill_weight, cfg.teacher_input, distill_tokens=cfg.distill_tokens,
                          distill_norm=cfg.distill_norm, distill_beta=cfg.distill_beta, **common)


class _RGBDStage(MultiMAEPretraining):
    """A stage of the two-stage RGB-D method: MultiMAE's data, optimizer grouping and schedules around the
    stage's own model and step (no reconstruction pictures)."""

    def build(self, cfg: PretrainConfig, ctx: DistContext) -> Parts:
        data_cfg = cfg.replace(in_domains="rgb-depth", out_domains="mask_valid" if cfg.use_mask_valid else "")
        dataset, loader = build_pretrain_loader(data_cfg)
        model = build_rgbd_model(cfg).to(ctx.device)
        print(f"Data: {len(dataset)} samples of {dataset.modalities} from {cfg.data_path}")
        return Parts(model, loader, {"dataset": dataset})

    def plan(self, cfg: PretrainConfig, ctx: DistContext, parts: Parts) -> TrainingPlan:
        plan = super().plan(cfg, ctx, parts)
        plan.step_fn = build_rgbd_step(cfg, ctx.device)
        return plan

    def callbacks(self, cfg: PretrainConfig, ctx: DistContext, parts: Parts, trainer: Any, wandb: Any) -> list:
        return []


@register_job("pretrain", "rgbd_stage1")
class RGBDStage1(_RGBDStage):
    """Stage 1: cross-modal patch contrast."""


@register_job("pretrain", "rgbd_stage2")
class RGBDStage2(_RGBDStage):
    """Stage 2: masked depth reconstruction, denoising and distillation from the stage-1 teacher."""
