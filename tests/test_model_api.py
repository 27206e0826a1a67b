"""Registry, every registered model and output adapter (forward + backward), timm conventions
(no_weight_decay, group_matcher / layer decay, grad checkpointing), state-dict round trip, output shapes at 224."""
import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

import multimae
from multimae import (
    ConvNeXtAdapter,
    DPTOutputAdapter,
    LinearOutputAdapter,
    MaskedCrossEntropyLoss,
    MaskedL1Loss,
    MaskedMSELoss,
    MultiMAE,
    MultiViT,
    PatchedInputAdapter,
    SegmenterMaskTransformerAdapter,
    SemSegInputAdapter,
    SpatialOutputAdapter,
    create_model,
    list_models,
)

SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16)}
TASKS = ["rgb", "depth", "semseg"]


def _input_adapters(image_size=32, num_classes=5, **kw):
    return {"rgb": PatchedInputAdapter(3, 1, 16, image_size=image_size, **kw),
            "depth": PatchedInputAdapter(1, 1, 16, image_size=image_size, **kw),
            "semseg": SemSegInputAdapter(num_classes, 4, 16, image_size=image_size, **kw)}


def _pretrain_adapters(image_size=32, num_classes=5, dim=16, depth=1, heads=2):
    return {name: SpatialOutputAdapter(c, s, 16, dim_tokens=dim, depth=depth, num_heads=heads, image_size=image_size,
                                       task=task, context_tasks=TASKS)
            for name, c, s, task in [("rgb", 3, 1, "rgb"), ("depth", 1, 1, "depth"),
                                     ("semseg", num_classes, 4, "semseg"), ("norm_rgb", 3, 1, "rgb")]}


def _inputs(B=2, size=32, num_classes=5):
    return {"rgb": torch.randn(B, 3, size, size), "depth": torch.randn(B, 1, size, size),
            "semseg": torch.randint(0, num_classes, (B, size // 4, size // 4))}


def _pretrain_loss(preds, x, masks):
    losses = {"rgb": MaskedMSELoss()(preds["rgb"], x["rgb"], masks["rgb"]),
              "norm_rgb": MaskedMSELoss(norm_pix=True)(preds["norm_rgb"], x["rgb"], masks["rgb"]),
              "depth": MaskedL1Loss()(preds["depth"], x["depth"], masks["depth"]),
              "semseg": MaskedCrossEntropyLoss(stride=4)(preds["semseg"], x["semseg"], masks["semseg"])}
    return sum(losses.values())


def _assert_all_trainable_have_grads(model, allow_missing=()):
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
               and not any(a in n for a in allow_missing)]
    assert not missing, missing[:10]


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_every_size():
    expected = {f"{kind}_{size}" for kind in ("pretrain_multimae", "multivit") for size in SIZES}
    assert expected <= set(list_models())


@pytest.mark.parametrize("name", sorted(f"{k}_{s}" for k in ("pretrain_multimae", "multivit") for s in SIZES))
def test_registered_model_full_size_on_meta(name):
    """Every registered constructor builds its published size (meta device: shapes only)."""
    dim, depth, heads = SIZES[name.rsplit("_", 1)[1]]
    with torch.device("meta"):
        model = create_model(name, input_adapters=_input_adapters(224, 133), output_adapters=None)
    assert type(model) is (MultiMAE if name.startswith("pretrain") else MultiViT)
    assert model.get_num_layers() == depth and model.global_tokens.shape == (1, 1, dim)
    assert model.encoder[0].attn.num_heads == heads
    assert model.encoder[0].norm1.eps == 1e-6 and model.encoder[0].attn.qkv.bias is not None
    per_block = 12 * dim * dim + 13 * dim  # qkv, proj, fc1 (4d), fc2 + biases + 2 LayerNorms
    assert sum(p.numel() for p in model.encoder.parameters()) == depth * per_block


@pytest.mark.parametrize("size", list(SIZES))
def test_pretrain_models_forward_backward(size):
    """Tiny images and depth overridden to 2 keep this fast; widths/heads are the registered ones."""
    dim = SIZES[size][0]
    model = create_model(f"pretrain_multimae_{size}", input_adapters=_input_adapters(),
                         output_adapters=_pretrain_adapters(), depth=2, drop_path_rate=0.1)
    assert model.encoder[0].attn.qkv.in_features == dim
    x = _inputs()
    preds, masks = model(x, num_encoded_tokens=6, alphas=[1.0, 0.5, 1.0], sample_tasks_uniformly=True)
    assert preds["rgb"].shape == (2, 3, 32, 32) and preds["semseg"].shape == (2, 5, 8, 8)
    assert all(m.shape == (2, 4) for m in masks.values())
    _pretrain_loss(preds, x, masks).backward()
    # class-embedding rows of classes absent from the batch legitimately get zero (not None) grads
    _assert_all_trainable_have_grads(model)


@pytest.mark.parametrize("size", list(SIZES))
def test_multivit_models_forward_backward(size):
    model = create_model(f"multivit_{size}", input_adapters=_input_adapters(),
                         output_adapters={"cls": LinearOutputAdapter(7)}, depth=2)
    out = model(_inputs())
    assert out["cls"].shape == (2, 7)
    out["cls"].sum().backward()
    _assert_all_trainable_have_grads(model)


def test_create_model_errors_and_compat():
    with pytest.raises(ValueError, match="did you mean 'multivit_base'"):
        create_model("multivit_bsae", input_adapters=_input_adapters())
    with pytest.warns(DeprecationWarning):
        model = create_model("multivit_tiny", input_adapters=_input_adapters(), output_adapters=None, depth=2,
                             drop_connect_rate=0.2, drop_path_rate=None, num_global_tokens=None)
    assert model.encoder[1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.global_tokens.shape[1] == 1  # None kwargs keep the defaults
    with pytest.raises(ValueError, match="no weights are bundled"):
        create_model("multivit_tiny", input_adapters=_input_adapters(), pretrained=True)


def test_timm_create_model():
    model = timm.create_model("multivit_tiny", input_adapters=_input_adapters(), output_adapters=None, depth=1)
    assert isinstance(model, MultiViT) and model.output_adapters is None
    assert model(_inputs()).shape == (2, 3 * 4 + 1, 192)


# ---------------------------------------------------------------------------------------------- output adapters
def _spatial(**kw):
    args = dict(num_channels=3, stride_level=1, patch_size_full=16, dim_tokens=16, depth=1, num_heads=2,
                image_size=32, task="rgb", context_tasks=TASKS)
    args.update(kw)
    return SpatialOutputAdapter(**args)


SPATIAL_VARIANTS = {
    "default": {},
    "no_task_queries": dict(use_task_queries=False),
    "no_xattn": dict(use_xattn=False),
    "no_context_tasks": dict(context_tasks=None),
    "learnable_pos_emb": dict(learnable_pos_emb=True),
    "task_not_in_inputs": dict(task="normal"),
    "depth0": dict(depth=0),
    "semseg_stride4": dict(num_channels=5, stride_level=4, task="semseg"),
}


@pytest.mark.parametrize("variant", list(SPATIAL_VARIANTS))
def test_spatial_output_adapter_variants(variant):
    adapter = _spatial(**SPATIAL_VARIANTS[variant])
    model = MultiMAE(_input_adapters(), {"out": adapter}, dim_tokens=32, depth=1, num_heads=2, num_global_tokens=2)
    preds, _ = model(_inputs(), num_encoded_tokens=5)
    stride = adapter.stride_level
    assert preds["out"].shape == (2, adapter.num_channels, 32 // stride, 32 // stride)
    preds["out"].square().mean().backward()
    assert adapter.out_proj.weight.grad.abs().sum() > 0
    if adapter.use_xattn:  # without cross-attention only the task's own visible tokens reach the encoder
        assert model.encoder[0].attn.qkv.weight.grad.abs().sum() > 0


def _dense_heads(num_classes=4):
    return {
        "convnext": ConvNeXtAdapter(num_classes, embed_dim=64, preds_per_patch=16, depth=1),
        "convnext_rgbd": ConvNeXtAdapter(num_classes, embed_dim=64, preds_per_patch=4, depth=1,
                                         main_tasks=("rgb", "depth")),
        "dpt_regression": DPTOutputAdapter(num_classes=1, hooks=[0, 1, 1, 2], layer_dims=[8, 8, 16, 16],
                                           feature_dim=16, head_type="regression"),
        "dpt_semseg_bn": DPTOutputAdapter(num_classes=num_classes, hooks=[0, 1, 2, 2], layer_dims=[8, 8, 16, 16],
                                          feature_dim=16, head_type="semseg", use_bn=True, main_tasks="rgb-depth"),
        "segmenter": SegmenterMaskTransformerAdapter(num_classes, depth=1, num_heads=2, embed_dim=16),
        "linear_mean": LinearOutputAdapter(num_classes),
        "linear_last_token": LinearOutputAdapter(num_classes, use_mean_pooling=False),
    }


@pytest.mark.parametrize("head", list(_dense_heads()))
def test_finetune_heads_forward_backward(head):
    adapter = _dense_heads()[head]
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=64), "depth": PatchedInputAdapter(1, 1, 16, image_size=64)}
    model = MultiViT(ins, {head: adapter}, dim_tokens=32, depth=3, num_heads=2)
    x = {"rgb": torch.randn(2, 3, 64, 64), "depth": torch.randn(2, 1, 64, 64)}
    out = model(x, return_all_layers=head.startswith("dpt"))[head]
    if head.startswith("linear"):
        assert out.shape == (2, 4)
    else:
        assert out.shape == (2, adapter.num_channels if head.startswith("dpt") else 4, 64, 64)
    out.square().mean().backward()
    unused = ("input_adapters.depth",) if head in ("convnext", "dpt_regression", "segmenter") else ()
    if head.startswith("dpt"):
        # the deepest fusion block has a single input, so its first residual unit is unused (as published)
        unused += ("refinenet4.resConfUnit1",) + (("encoder.2",) if max(adapter.hooks) < 2 else ())
    _assert_all_trainable_have_grads(model, allow_missing=unused)


def test_dpt_needs_all_layers():
    model = MultiViT({"rgb": PatchedInputAdapter(3, 1, 16, image_size=64)},
                     {"d": DPTOutputAdapter(1, hooks=[0, 0, 0, 0], layer_dims=[8, 8, 8, 8], feature_dim=8)},
                     dim_tokens=16, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="return_all_layers=True"):
        model(torch.randn(1, 3, 64, 64))


def test_linear_adapter_reset_and_identity_head():
    head = LinearOutputAdapter(0, dim_tokens_enc=8)
    assert isinstance(head.head, torch.nn.Identity)
    head.reset_classifier(3)
    assert head.get_classifier().out_features == 3


def test_fp32_output_adapters_run_last_and_unchanged():
    model = MultiMAE(_input_adapters(), _pretrain_adapters(), dim_tokens=32, depth=1, num_heads=2).eval()
    x = _inputs()
    torch.manual_seed(5)
    ref, _ = model(x, num_encoded_tokens=6)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds, _ = model(x, num_encoded_tokens=6, fp32_output_adapters=["semseg", "unknown"])
    assert list(preds) == ["rgb", "depth", "norm_rgb", "semseg"]
    assert preds["semseg"].dtype == torch.float32 and preds["rgb"].dtype == torch.bfloat16
    torch.testing.assert_close(preds["semseg"], ref["semseg"], atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- timm conventions
def test_no_weight_decay_names():
    model = MultiMAE(_input_adapters(), _pretrain_adapters(), dim_tokens=32, depth=1, num_heads=2)
    nwd = model.no_weight_decay()
    assert {"global_tokens", "input_adapters.rgb.pos_emb", "input_adapters.semseg.class_emb",
            "output_adapters.rgb.mask_token", "output_adapters.norm_rgb.task_embeddings"} <= nwd
    encoder_only = MultiViT(_input_adapters(), None, dim_tokens=32, depth=1, num_heads=2)
    assert "global_tokens" in encoder_only.no_weight_decay()  # published code crashed here


def _scales(model, layer_decay=0.75):
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=layer_decay,
                                      no_weight_decay_list=model.no_weight_decay())
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_timm_layer_decay_reproduces_published_scales():
    L, ld = 4, 0.75
    model = MultiViT(_input_adapters(), {"cls": LinearOutputAdapter(3)}, dim_tokens=32, depth=L, num_heads=2)
    scales = _scales(model, ld)
    for name, (scale, wd) in scales.items():
        if name.startswith(("input_adapters.", "global_tokens")):
            expected = ld ** (L + 1)
        elif name.startswith("encoder."):
            expected = ld ** (L - int(name.split(".")[1]))
        else:
            assert name.startswith("output_adapters.")
            expected = 1.0
        assert scale == pytest.approx(expected), name
    assert scales["global_tokens"][1] == 0.0
    assert scales["input_adapters.semseg.class_emb.weight"][1] == 0.05  # published name mismatch kept
    assert scales["encoder.0.attn.qkv.weight"][1] == 0.05 and scales["encoder.0.attn.qkv.bias"][1] == 0.0
    assert "input_adapters.rgb.pos_emb" not in scales  # frozen sin-cos


def test_layer_decay_vit_b_values():
    with torch.device("meta"):
        model = create_model("multivit_base", input_adapters=_input_adapters(224, 133),
                             output_adapters={"cls": LinearOutputAdapter(10)})
    scales = _scales(model)
    assert scales["input_adapters.rgb.proj.weight"][0] == pytest.approx(0.023757, abs=1e-6)
    assert scales["encoder.0.norm1.weight"][0] == pytest.approx(0.031676, abs=1e-6)
    assert scales["encoder.11.mlp.fc2.weight"][0] == pytest.approx(0.75)
    assert scales["output_adapters.cls.head.weight"][0] == 1.0
    assert model.group_matcher(coarse=True)["blocks"] == r"^encoder\.(\d+)"


@pytest.mark.parametrize("kind", ["multimae", "multivit_all_layers"])
def test_grad_checkpointing_gives_same_grads(kind):
    if kind == "multimae":
        model = MultiMAE(_input_adapters(), _pretrain_adapters(), dim_tokens=32, depth=2, num_heads=2)
    else:
        model = MultiViT(_input_adapters(64), {"d": DPTOutputAdapter(1, hooks=[0, 1, 1, 1], layer_dims=[8, 8, 8, 8],
                                                                     feature_dim=8)},
                         dim_tokens=32, depth=2, num_heads=2)
    x = _inputs(size=32 if kind == "multimae" else 64)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(7)
        if kind == "multimae":
            preds, masks = model(x, num_encoded_tokens=6)
            _pretrain_loss(preds, x, masks).backward()
        else:
            model(x, return_all_layers=True)["d"].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_state_dict_round_trip(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        return MultiMAE(_input_adapters(), _pretrain_adapters(), dim_tokens=32, depth=2, num_heads=2).eval()

    model = build(0)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    other = build(1)
    assert not torch.equal(other.encoder[0].attn.qkv.weight, model.encoder[0].attn.qkv.weight)
    other.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x = _inputs()
    torch.manual_seed(3)
    a, _ = model(x, num_encoded_tokens=6)
    torch.manual_seed(3)
    b, _ = other(x, num_encoded_tokens=6)
    for k in a:
        assert torch.equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------- shapes at 224
def test_pretrain_and_finetune_shapes_at_224():
    """Released pre-training layout at 224 px and 98 visible tokens (tiny width, one block, for speed)."""
    model = create_model("pretrain_multimae_tiny", input_adapters=_input_adapters(224, 133),
                         output_adapters=_pretrain_adapters(224, 133, dim=32, depth=1, heads=4), depth=1).eval()
    x = _inputs(2, 224, 133)
    with torch.no_grad():
        preds, masks = model(x, num_encoded_tokens=98)
    assert {k: tuple(v.shape) for k, v in preds.items()} == {
        "rgb": (2, 3, 224, 224), "depth": (2, 1, 224, 224), "semseg": (2, 133, 56, 56), "norm_rgb": (2, 3, 224, 224)}
    assert all(m.shape == (2, 196) and m.dtype == torch.int64 for m in masks.values())
    assert torch.all(sum((m == 0).sum(1) for m in masks.values()) == 98)
    model.output_adapters = None
    with torch.no_grad():
        tokens, _ = model(x, num_encoded_tokens=98)
    assert tokens.shape == (2, 98 + 1, 192)


def test_no_host_sync_in_pretraining_forward_backward():
    """The whole masked forward, losses and backward run on the meta device (no data, so any
    .item()/nonzero/data-dependent branch would fail)."""
    with torch.device("meta"):
        model = MultiMAE(_input_adapters(), _pretrain_adapters(), dim_tokens=32, depth=1, num_heads=2)
        x = _inputs()
        for uniform in (False, True):
            preds, masks = model(x, num_encoded_tokens=6, sample_tasks_uniformly=uniform)
            _pretrain_loss(preds, x, masks).backward()
    assert model.encoder[0].attn.qkv.weight.grad.device.type == "meta"


@pytest.mark.slow
def test_full_vit_b_shapes():
    model = create_model("pretrain_multimae_base", input_adapters=_input_adapters(224, 133),
                         output_adapters=_pretrain_adapters(224, 133, dim=256, depth=2, heads=8)).eval()
    with torch.no_grad():
        preds, masks = model(_inputs(1, 224, 133), num_encoded_tokens=98)
    assert preds["semseg"].shape == (1, 133, 56, 56)
    assert multimae.MultiMAE is MultiMAE
