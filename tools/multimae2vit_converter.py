#!/usr/bin/env python
"""Convert MultiMAE/MultiViT weights into a timm ViT state dict.

    python tools/multimae2vit_converter.py --multimae_ckpt_path multimae-b_98_rgb+-depth-semseg_1600e.pth \
        --vit_ckpt_path multimae-b_timm.safetensors      # .pth/.pt/.bin or .safetensors, either way

Mapping (utils.weights.multimae_to_vit): global_tokens -> cls_token; input_adapters.rgb.pos_emb
(1, D, h, w) -> pos_embed (1, 1 + h*w, D) with a zero class-token row; input_adapters.rgb.proj ->
patch_embed.proj; encoder.* -> blocks.*. Other input adapters and the decoders are dropped. MultiMAE has no
final norm, so load the result with

    timm.create_model('vit_base_patch16_224', num_classes=0, final_norm=False).load_state_dict(sd, strict=True)

(`forward_features` then gives MultiViT's RGB tokens with the class token first instead of last).
The result is checked by a strict load into a matching timm VisionTransformer on the meta device.
"""
import argparse

import torch

from tools.lib.convert import convert_weights_file
from utils.weights import is_timm_vit_state_dict, multimae_to_vit


def build_matching_timm_vit(sd: dict) -> torch.nn.Module:
    """timm VisionTransformer (no head, no final norm) whose parameter shapes match the converted `sd`,
    built on the meta device. Head count does not change shapes: D // 64 is used."""
    from timm.models.vision_transformer import VisionTransformer

    dim, in_chans, p_h, p_w = sd["patch_embed.proj.weight"].shape
    n_patches = sd["pos_embed"].shape[1] - 1
    side = int(round(n_patches ** 0.5))
    if side * side != n_patches or p_h != p_w:
        raise ValueError(f"verification only handles square grids and patches (pos_embed "
                         f"{tuple(sd['pos_embed'].shape)}, patch {p_h}x{p_w}); use --no_verify")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    with torch.device("meta"):
        return VisionTransformer(img_size=side * p_h, patch_size=p_h, in_chans=in_chans, embed_dim=dim, depth=depth,
                                 num_heads=max(1, dim // 64), mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                                 qkv_bias="blocks.0.attn.qkv.bias" in sd, num_classes=0, final_norm=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--multimae_ckpt_path", required=True, help="MultiMAE / MultiViT weights (input)")
    p.add_argument("--vit_ckpt_path", required=True, help="timm ViT weights (output; suffix picks the format)")
    p.add_argument("--no_verify", action="store_true", help="skip the strict load into a matching timm ViT")
    args = p.parse_args(argv)

    convert_weights_file(
        args.multimae_ckpt_path, args.vit_ckpt_path, convert=multimae_to_vit, is_converted=is_timm_vit_state_dict,
        converted_hint="blocks.*, patch_embed.*",
        not_converted=lambda sd: sorted({".".join(k.split(".")[:2]) for k in sd
                                         if k.startswith(("output_adapters.", "input_adapters."))
                                         and not k.startswith("input_adapters.rgb.")}),
        build_matching=None if args.no_verify else build_matching_timm_vit, src_kind="MultiMAE",
        dst_kind="timm ViT", verified_into="timm VisionTransformer(num_classes=0, final_norm=False)")


if __name__ == "__main__":
    main()
