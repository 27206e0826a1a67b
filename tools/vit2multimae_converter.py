#!/usr/bin/env python
"""Convert timm ViT weights into a MultiMAE/MultiViT state dict with an RGB input adapter.

    python tools/vit2multimae_converter.py --vit_ckpt_path mae_pretrain_vit_base.pth \
        --multimae_ckpt_path mae-b_multimae.pth          # .pth/.pt/.bin or .safetensors, either way

Mapping (utils.weights.vit_to_multimae): cls_token + its position embedding -> global_tokens;
pos_embed patch rows -> input_adapters.rgb.pos_emb (1, D, h, w); patch_embed.proj -> input_adapters.rgb.proj;
blocks.* -> encoder.*; final norm / fc_norm / head are dropped (MultiMAE has no final norm).
Checkpoint entries without tensors ('args', 'epoch', ...) are kept, optimizer states dropped. The result
is checked by loading it with strict=True into a MultiViT of the inferred size (on the meta device).
"""
import argparse

import torch

from tools.lib.convert import convert_weights_file
from utils.weights import is_multimae_state_dict, vit_to_multimae


def build_matching_multivit(sd: dict) -> torch.nn.Module:
    """A MultiViT (RGB input adapter, no heads) whose parameter shapes match the converted `sd`,
    built on the meta device (no memory). Head count does not change shapes: D // 64 is used."""
    from multimae import MultiViT, PatchedInputAdapter

    dim, _, p_h, p_w = sd["input_adapters.rgb.proj.weight"].shape
    _, _, g_h, g_w = sd["input_adapters.rgb.pos_emb"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("encoder."))
    mlp_ratio = sd["encoder.0.mlp.fc1.weight"].shape[0] / dim
    qkv_bias = "encoder.0.attn.qkv.bias" in sd
    with torch.device("meta"):
        rgb = PatchedInputAdapter(3, 1, (p_h, p_w), dim_tokens=dim, image_size=(g_h * p_h, g_w * p_w))
        return MultiViT({"rgb": rgb}, None, num_global_tokens=sd["global_tokens"].shape[1], dim_tokens=dim,
                        depth=depth, num_heads=max(1, dim // 64), mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit_ckpt_path", required=True, help="timm ViT weights (input)")
    p.add_argument("--multimae_ckpt_path", required=True, help="MultiMAE weights (output; suffix picks the format)")
    p.add_argument("--grid_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="patch grid of a non-square pos_embed")
    p.add_argument("--no_verify", action="store_true", help="skip the strict load into a matching MultiViT")
    args = p.parse_args(argv)

    grid_size = tuple(args.grid_size) if args.grid_size else None
    convert_weights_file(
        args.vit_ckpt_path, args.multimae_ckpt_path, convert=lambda sd: vit_to_multimae(sd, grid_size=grid_size),
        is_converted=is_multimae_state_dict, converted_hint="encoder.*, input_adapters.*",
        not_converted=lambda sd: sorted(k for k in sd
                                        if not k.startswith(("blocks.", "patch_embed.proj.", "pos_embed", "cls_token"))),
        build_matching=None if args.no_verify else build_matching_multivit, src_kind="timm",
        dst_kind="MultiMAE", verified_into="a matching MultiViT")


if __name__ == "__main__":
    main()
