import argparse

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from multimae import LinearOutputAdapter, MultiMAE, MultiViT, PatchedInputAdapter, SemSegInputAdapter, create_model
from utils.weights import (WeightsMismatchError, compress_keys, extract_state_dict, is_multimae_state_dict,
                              is_timm_vit_state_dict, load_finetune_weights, load_weights_file, multimae_to_vit,
                              prepare_finetune_state_dict, vit_to_multimae)

DIM = 32


def _timm_vit_tiny(img_size=224):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, final_norm=False,
                              img_size=img_size).eval()
    with torch.no_grad():  # timm initialises cls_token / pos_embed tiny; make the class-token fold visible
        model.cls_token.normal_()
        model.pos_embed.normal_()
    return model


@pytest.fixture(scope="module")
def vit_tiny():
    return _timm_vit_tiny()


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


# ---------------------------------------------------------------- converters
def test_vit_multimae_round_trip_spec_10_8(vit_tiny):
    sd = vit_tiny.state_dict()
    before = _clone(sd)
    mm = vit_to_multimae(sd)
    assert is_multimae_state_dict(mm) and is_timm_vit_state_dict(sd) and not is_timm_vit_state_dict(mm)
    assert mm["input_adapters.rgb.pos_emb"].shape == (1, 192, 14, 14)
    back = multimae_to_vit(mm)
    assert set(back) == set(sd)
    for k in sd:
        if k.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(back[k], sd[k]), k
    assert torch.equal(back["pos_embed"][:, 1:], sd["pos_embed"][:, 1:])
    assert torch.equal(back["pos_embed"][:, 0], torch.zeros(1, 192))
    assert torch.equal(back["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    # row-major patch order: patch (r, c) is token r * 14 + c
    assert torch.equal(mm["input_adapters.rgb.pos_emb"][0, :, 2, 5], sd["pos_embed"][0, 1 + 2 * 14 + 5])
    for k in sd:  # inputs untouched (the published converter modified cls_token in place)
        assert torch.equal(sd[k], before[k]), k
    mm_before = _clone(mm)
    multimae_to_vit(mm)
    assert all(torch.equal(mm[k], mm_before[k]) for k in mm)


def test_features_match_timm_both_directions():
    vit_tiny = _timm_vit_tiny(img_size=96)  # ViT-Ti width/depth on a 6x6 grid keeps the test fast
    img = torch.randn(2, 3, 96, 96)
    ours = create_model("multivit_tiny", input_adapters={"rgb": PatchedInputAdapter(3, 1, 16, image_size=96)},
                        output_adapters=None).eval()
    ours.load_state_dict(vit_to_multimae(vit_tiny.state_dict()), strict=True)
    with torch.no_grad():
        ref = vit_tiny.forward_features(img)  # (B, 1 + 36, D), class token first
        tokens = ours({"rgb": img})  # (B, 36 + 1, D), global token last
        assert torch.allclose(tokens[:, :-1], ref[:, 1:], atol=1e-4)
        assert torch.allclose(tokens[:, -1], ref[:, 0], atol=1e-4)
        # MultiViT -> timm: loads strictly and gives the same tokens
        timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, final_norm=False,
                                       img_size=96)
        timm_model.load_state_dict(multimae_to_vit(ours.state_dict()), strict=True)
        assert torch.allclose(timm_model.eval().forward_features(img), ref, atol=1e-4)


def test_multimae_to_vit_errors():
    with pytest.raises(ValueError, match="'global_tokens' missing"):
        multimae_to_vit({"input_adapters.rgb.pos_emb": torch.zeros(1, 4, 2, 2)})
    with pytest.raises(ValueError, match="num_global_tokens=1"):
        multimae_to_vit({"global_tokens": torch.zeros(1, 2, 4), "input_adapters.rgb.pos_emb": torch.zeros(1, 4, 2, 2)})


# ---------------------------------------------------------------- weights files
def test_load_weights_file_formats(tmp_path):
    sd = {"encoder.0.w": torch.randn(3), "global_tokens": torch.randn(1, 1, 2)}
    torch.save(sd, tmp_path / "bare.pth")
    # published checkpoints: {'model': ..., 'args': Namespace, 'epoch': int}; DDP prefix stripped
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "args": argparse.Namespace(lr=1.0), "epoch": 3},
               tmp_path / "ckpt.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("bare.pth", "ckpt.pth", "w.safetensors"):
        out = load_weights_file(tmp_path / name)
        assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd), name
    assert set(extract_state_dict({"state_dict": sd})) == set(sd)


class _Evil:
    def __reduce__(self):
        return (print, ("arbitrary code",))


def test_load_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights_file(tmp_path / "nope.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth.*weights_only=True"):
        load_weights_file(tmp_path / "evil.pth")
    torch.save({"epoch": 1}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="empty.pth: no tensors found"):
        load_weights_file(tmp_path / "empty.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_weights_file(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------- fine-tune loading
def _pretrained(image_size=32, semseg_classes=5, depth=True):
    inputs = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=image_size),
              "semseg": SemSegInputAdapter(semseg_classes, 4, 16, image_size=image_size)}
    if depth:
        inputs["depth"] = PatchedInputAdapter(1, 1, 16, image_size=image_size)
    return MultiMAE(inputs, {"rgb": LinearOutputAdapter(7)}, dim_tokens=DIM, depth=2, num_heads=2)


def _finetune_model(image_size=64, dim=DIM, extra=None):
    inputs = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=image_size),
              "semseg": SemSegInputAdapter(5, 4, 16, image_size=image_size, emb_padding_idx=5)}
    inputs.update(extra or {})
    return MultiViT(inputs, {"cls": LinearOutputAdapter(3)}, dim_tokens=dim, depth=2, num_heads=2)


def test_finetune_loading_interpolates_pads_drops_and_reports(tmp_path):
    src = _pretrained()
    src_sd = _clone(src.state_dict())
    save_file(src_sd, str(tmp_path / "pre.safetensors"))
    model = _finetune_model()
    logs = []
    report = load_finetune_weights(model, tmp_path / "pre.safetensors", log=logs.append)
    sd = model.state_dict()
    # encoder weights copied exactly
    for k in src_sd:
        if k.startswith("encoder.") or k == "global_tokens" or k.startswith("input_adapters.rgb.proj"):
            assert torch.equal(sd[k], src_sd[k]), k
    # pos-emb 2x2 -> 4x4 bicubic, align_corners=False
    for t in ("rgb", "semseg"):
        ref = F.interpolate(src_sd[f"input_adapters.{t}.pos_emb"], size=(4, 4), mode="bicubic", align_corners=False)
        assert torch.allclose(sd[f"input_adapters.{t}.pos_emb"], ref)
    assert report.interpolated["input_adapters.rgb.pos_emb"] == ((1, DIM, 2, 2), (1, DIM, 4, 4))
    # class embedding 5 -> 6 rows, the padding row is zero
    emb = sd["input_adapters.semseg.class_emb.weight"]
    assert emb.shape == (6, 64) and torch.equal(emb[:5], src_sd["input_adapters.semseg.class_emb.weight"])
    assert torch.equal(emb[5], torch.zeros(64))
    # report: decoders dropped, head missing, depth adapter of the checkpoint unused
    assert sorted(report.dropped) == ["output_adapters.rgb.head.bias", "output_adapters.rgb.head.weight",
                                      "output_adapters.rgb.norm.bias", "output_adapters.rgb.norm.weight"]
    assert all(k.startswith("output_adapters.cls.") for k in report.missing) and report.missing
    assert sorted(report.unexpected) == sorted(k for k in src_sd if k.startswith("input_adapters.depth."))
    assert "encoder.0.attn.qkv.weight" in report.loaded and len(report.loaded) == len(set(report.loaded))
    text = logs[0]
    assert "encoder.{0-1}.attn.qkv.weight" in text and "input_adapters.depth.proj.weight" in text
    assert "(1, 32, 2, 2) -> (1, 32, 4, 4)" in text


def test_missing_encoder_weight_is_an_error_unless_allowed():
    src_sd = _pretrained(depth=False).state_dict()
    extra = {"depth": PatchedInputAdapter(1, 1, 16, image_size=64)}
    with pytest.raises(WeightsMismatchError, match=r"input_adapters\.depth\.proj\.weight"):
        load_finetune_weights(_finetune_model(extra=extra), src_sd, log=None)
    report = load_finetune_weights(_finetune_model(extra=extra), src_sd, log=None,
                                   allow_missing=["input_adapters.depth.*"])
    assert "input_adapters.depth.proj.weight" in report.missing
    broken = {k: v for k, v in src_sd.items() if k != "encoder.1.mlp.fc2.bias"}
    with pytest.raises(WeightsMismatchError, match=r"encoder\.1\.mlp\.fc2\.bias"):
        load_finetune_weights(_finetune_model(), broken, log=None)


def test_encoder_shape_mismatch_is_an_error_naming_the_key():
    src_sd = _pretrained().state_dict()
    with pytest.raises(WeightsMismatchError, match=r"'global_tokens' has shape \(1, 1, 32\).*\(1, 1, 48\)"):
        load_finetune_weights(_finetune_model(dim=48), src_sd, log=None)


def test_head_shape_mismatch_is_dropped_not_fatal():
    model = _finetune_model()
    sd = dict(_pretrained().state_dict())
    sd["output_adapters.cls.head.weight"] = torch.zeros(10, DIM)  # e.g. a head for another number of classes
    sd["output_adapters.cls.head.bias"] = torch.zeros(10)
    report = load_finetune_weights(model, {"model": sd}, log=None, drop_output_adapters=False)
    assert "output_adapters.cls.head.weight" in report.dropped and "output_adapters.cls.head.weight" in report.missing
    assert "output_adapters.rgb.head.weight" in report.unexpected


def test_timm_weights_load_into_multivit_with_new_image_size(vit_tiny):
    model = create_model("multivit_tiny", input_adapters={"rgb": PatchedInputAdapter(3, 1, 16, image_size=64)},
                         output_adapters=None)
    report = load_finetune_weights(model, vit_tiny.state_dict(), log=None)
    assert report.source_format.startswith("timm ViT")
    assert report.interpolated["input_adapters.rgb.pos_emb"] == ((1, 192, 14, 14), (1, 192, 4, 4))
    assert not report.missing and not report.unexpected
    assert torch.equal(model.encoder[3].attn.qkv.weight, vit_tiny.blocks[3].attn.qkv.weight)


def test_prepare_does_not_mutate_and_rejects_unknown_layouts():
    src_sd = _pretrained().state_dict()
    before = _clone(src_sd)
    prepare_finetune_state_dict(_finetune_model(), src_sd)
    assert set(src_sd) == set(before) and all(torch.equal(src_sd[k], before[k]) for k in src_sd)
    with pytest.raises(ValueError, match="unrecognised weights layout"):
        prepare_finetune_state_dict(_finetune_model(), {"fc.weight": torch.zeros(2, 2)})


def test_compress_keys():
    keys = [f"encoder.{i}.norm1.weight" for i in (0, 1, 2, 5)] + ["global_tokens", "encoder.7.mlp.fc1.bias"]
    assert compress_keys(keys) == ["encoder.{0-2,5}.norm1.weight", "global_tokens", "encoder.7.mlp.fc1.bias"]


def _published_layout_multivit(image_size):
    inputs = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=image_size),
              "depth": PatchedInputAdapter(1, 1, 16, image_size=image_size),
              "semseg": SemSegInputAdapter(133, 4, 16, image_size=image_size, emb_padding_idx=133)}
    return MultiViT(inputs, None, dim_tokens=64, depth=2, num_heads=4).eval()


def test_published_pretraining_checkpoint_fine_tunes(fixtures_dir):
    fx = torch.load(fixtures_dir / "public_pretrain.pt", weights_only=True)
    model = _published_layout_multivit(64)
    report = load_finetune_weights(model, {"model": fx["state_dict"]}, log=None)
    assert report.padded == {"input_adapters.semseg.class_emb.weight": ((133, 64), (134, 64))}
    assert not report.missing and not report.unexpected and not report.interpolated
    assert {k.split(".")[1] for k in report.dropped} == {"rgb", "depth", "semseg", "norm_rgb"}
    with torch.no_grad():  # same encoder tokens as the published MultiViT on the fixture inputs
        assert torch.allclose(model(fx["inputs"]), fx["multivit_encoder_tokens"], atol=1e-5)
    big = load_finetune_weights(_published_layout_multivit(128), fx["state_dict"], log=None)
    assert set(big.interpolated) == {f"input_adapters.{t}.pos_emb" for t in ("rgb", "depth", "semseg")}
