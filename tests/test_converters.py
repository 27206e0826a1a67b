"""tools/{vit2multimae,multimae2vit}_converter.py: file formats, strict timm/MultiViT loading, same features."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from multimae import LinearOutputAdapter, PatchedInputAdapter, create_model
from tools import multimae2vit_converter, vit2multimae_converter
from utils.data.modalities import build_input_adapters, build_pretrain_output_adapters
from utils.weights import load_finetune_weights

DOMAINS = ["rgb", "depth", "semseg"]


def _pretrain_model(name="pretrain_multimae_tiny", dim=32, depth=1, heads=4):
    inputs = build_input_adapters(DOMAINS, 16, 224)
    outputs = build_pretrain_output_adapters(DOMAINS, context_tasks=DOMAINS, patch_size=16, image_size=224,
                                             dim_tokens=dim, depth=depth, num_heads=heads, extra_norm_pix_loss=True)
    return create_model(name, input_adapters=inputs, output_adapters=outputs)


def _multivit_rgb(name="multivit_tiny", head=None):
    return create_model(name, input_adapters={"rgb": PatchedInputAdapter(3, 1, 16, image_size=224)},
                        output_adapters=head)


def _random_timm(name):
    model = timm.create_model(name, pretrained=False)  # with final norm and a 1000-class head, like a hub file
    with torch.no_grad():  # timm starts cls_token / pos_embed near zero; make their mapping visible
        model.cls_token.normal_()
        model.pos_embed.normal_()
    return model.eval()


def _timm_no_norm(name, sd):
    ref = timm.create_model(name, pretrained=False, num_classes=0, final_norm=False).eval()
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}, strict=True)
    return ref


def _compare(ours, ref, img):
    """MultiViT tokens (patches..., global) vs timm forward_features (cls, patches...): max abs diff."""
    with torch.no_grad():
        tokens = ours({"rgb": img})
        feats = ref.forward_features(img)
    assert tokens.shape == feats.shape
    return max((tokens[:, :-1] - feats[:, 1:]).abs().max().item(), (tokens[:, -1] - feats[:, 0]).abs().max().item())


# ---------------------------------------------------------------------------------------------- MultiMAE -> timm
def test_multimae_checkpoint_to_timm_loads_strictly_and_matches_features(tmp_path, capsys):
    torch.manual_seed(0)
    model = _pretrain_model()
    src = tmp_path / "checkpoint-3.pth"
    torch.save({"model": model.state_dict(), "args": {"model": "pretrain_multimae_tiny", "input_size": 224},
                "epoch": 3, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}}}, src)
    for out in (tmp_path / "vit.safetensors", tmp_path / "vit.pth"):
        multimae2vit_converter.main(["--multimae_ckpt_path", str(src), "--vit_ckpt_path", str(out)])
    log = capsys.readouterr().out
    assert "input_adapters.depth, input_adapters.semseg, output_adapters.depth" in log
    assert "checkpoint entries dropped: optimizer" in log and "verified" in log

    sd = load_file(str(tmp_path / "vit.safetensors"))
    pth = torch.load(tmp_path / "vit.pth", weights_only=True)
    assert pth["epoch"] == 3 and pth["args"]["model"] == "pretrain_multimae_tiny" and "optimizer" not in pth
    assert set(pth["model"]) == set(sd) and all(torch.equal(pth["model"][k], sd[k]) for k in sd)

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, final_norm=False).eval()
    vit.load_state_dict(sd, strict=True)
    ours = _multivit_rgb().eval()
    report = load_finetune_weights(ours, src, log=None)
    assert not report.missing
    img = torch.randn(2, 3, 224, 224)
    diff = _compare(ours, vit, img)
    print(f"MultiMAE-Ti -> timm max abs diff {diff:.2e}")
    assert diff < 1e-4


# ---------------------------------------------------------------------------------------------- timm -> MultiMAE
def test_timm_checkpoint_to_multimae_loads_strictly_and_matches_features(tmp_path, capsys):
    torch.manual_seed(0)
    src_model = _random_timm("vit_tiny_patch16_224")
    src = tmp_path / "vit_tiny.pth"
    torch.save(src_model.state_dict(), src)  # bare state dict, as timm / hub files are
    out = tmp_path / "multimae.safetensors"
    vit2multimae_converter.main(["--vit_ckpt_path", str(src), "--multimae_ckpt_path", str(out)])
    assert "not converted (no MultiMAE counterpart): head.bias, head.weight, norm.bias, norm.weight" in \
        capsys.readouterr().out

    ours = _multivit_rgb().eval()
    ours.load_state_dict(load_file(str(out)), strict=True)
    ref = _timm_no_norm("vit_tiny_patch16_224", src_model.state_dict())
    diff = _compare(ours, ref, torch.randn(2, 3, 224, 224))
    print(f"timm ViT-Ti -> MultiViT max abs diff {diff:.2e}")
    assert diff < 1e-4

    # back again: identical blocks, class position embedding folded into the class token
    back = tmp_path / "back.pth"
    multimae2vit_converter.main(["--multimae_ckpt_path", str(out), "--vit_ckpt_path", str(back)])
    sd, orig = torch.load(back, weights_only=True), src_model.state_dict()
    assert all(torch.equal(sd[k], orig[k]) for k in sd if k.startswith(("blocks.", "patch_embed.")))
    assert torch.equal(sd["cls_token"], orig["cls_token"] + orig["pos_embed"][:, :1])


def test_finetune_accepts_timm_weights_directly(tmp_path):
    """--finetune with a timm file: MultiViT + a new head, encoder equal to the timm encoder."""
    torch.manual_seed(1)
    src_model = _random_timm("vit_tiny_patch16_224")
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in src_model.state_dict().items()}, str(path))
    ours = _multivit_rgb(head={"cls": LinearOutputAdapter(num_classes=5)}).eval()
    report = load_finetune_weights(ours, path, log=None)
    assert report.source_format.startswith("timm ViT")
    assert sorted(report.missing) == ["output_adapters.cls.head.bias", "output_adapters.cls.head.weight",
                                      "output_adapters.cls.norm.bias", "output_adapters.cls.norm.weight"]
    ours.output_adapters = None  # compare encoder tokens
    assert _compare(ours, _timm_no_norm("vit_tiny_patch16_224", src_model.state_dict()),
                    torch.randn(1, 3, 224, 224)) < 1e-4


@pytest.mark.parametrize("size", ["small", "base"])
def test_timm_shapes_convert_to_multivit_shapes(size):
    """Parameter-free (meta device): converted timm keys/shapes are exactly MultiViT's."""
    with torch.device("meta"):
        vit = timm.create_model(f"vit_{size}_patch16_224", pretrained=False)
        ours = _multivit_rgb(f"multivit_{size}")
    converted = vit2multimae_converter.vit_to_multimae(vit.state_dict())
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_released_vitb_layout_converts_to_the_published_timm_keys(fixtures_dir):
    keys = json.loads((fixtures_dir / "vitb_keys.json").read_text())
    with torch.device("meta"):
        model = _pretrain_model("pretrain_multimae_base", dim=256, depth=2, heads=8)
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == keys["multimae"]
    converted = multimae2vit_converter.multimae_to_vit(sd)
    assert {k: list(v.shape) for k, v in converted.items()} == keys["timm_vit_base_patch16_224"]
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, final_norm=False)
    vit.load_state_dict(converted, strict=True, assign=True)


@pytest.mark.slow
def test_vitb_features_match_both_directions(tmp_path):
    torch.manual_seed(0)
    model = _pretrain_model("pretrain_multimae_base", dim=256, depth=2, heads=8)
    torch.save({"model": model.state_dict()}, tmp_path / "mm.pth")
    multimae2vit_converter.main(["--multimae_ckpt_path", str(tmp_path / "mm.pth"),
                                 "--vit_ckpt_path", str(tmp_path / "vit.safetensors")])
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, final_norm=False).eval()
    vit.load_state_dict(load_file(str(tmp_path / "vit.safetensors")), strict=True)
    ours = _multivit_rgb("multivit_base").eval()
    load_finetune_weights(ours, tmp_path / "mm.pth", log=None)
    img = torch.randn(2, 3, 224, 224)
    diff = _compare(ours, vit, img)
    print(f"MultiMAE-B -> timm max abs diff {diff:.2e}")
    assert diff < 1e-4

    src_model = _random_timm("vit_base_patch16_224")
    torch.save({"model": src_model.state_dict()}, tmp_path / "vitb.pth")
    vit2multimae_converter.main(["--vit_ckpt_path", str(tmp_path / "vitb.pth"),
                                 "--multimae_ckpt_path", str(tmp_path / "vitb_mm.pth")])
    ours = _multivit_rgb("multivit_base").eval()
    ours.load_state_dict(torch.load(tmp_path / "vitb_mm.pth", weights_only=True)["model"], strict=True)
    diff = _compare(ours, _timm_no_norm("vit_base_patch16_224", src_model.state_dict()), img)
    print(f"timm ViT-B -> MultiViT max abs diff {diff:.2e}")
    assert diff < 1e-4


# ---------------------------------------------------------------------------------------------- errors
def test_converter_errors_name_the_problem(tmp_path):
    timm_sd = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).state_dict()
    torch.save(timm_sd, tmp_path / "timm.pth")
    with pytest.raises(SystemExit, match="timm.pth already holds timm ViT weights"):
        multimae2vit_converter.main(["--multimae_ckpt_path", str(tmp_path / "timm.pth"),
                                     "--vit_ckpt_path", str(tmp_path / "x.pth")])
    with pytest.raises(ValueError, match="weights format of .*x.npz"):
        vit2multimae_converter.main(["--vit_ckpt_path", str(tmp_path / "timm.pth"),
                                     "--multimae_ckpt_path", str(tmp_path / "x.npz")])
    with pytest.raises(Exception, match="missing.pth"):
        vit2multimae_converter.main(["--vit_ckpt_path", str(tmp_path / "missing.pth"),
                                     "--multimae_ckpt_path", str(tmp_path / "x.pth")])
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "x.npz").exists()
