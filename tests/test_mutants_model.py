"""Model behaviours that the plain golden fixtures (square inputs of the built size, unit norms) cannot see:
non-square patches, the position-embedding resize, ``mask_inputs=False``, ``use_task_queries=False``, the
full-resolution size of a strided input and the linear drop-path schedule. The strong fixtures in
test_model_fixtures.py cover the resize axes, ``align_corners`` and the decoder norms against the published
outputs; these tests name the behaviour directly."""
import pytest
import torch
import torch.nn.functional as F

from multimae import MultiMAE, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter

D = 16


def _rgb_adapter(patch=(8, 4), image=(16, 16)):
    return PatchedInputAdapter(num_channels=3, stride_level=1, patch_size_full=patch, dim_tokens=D, image_size=image)


@pytest.mark.parametrize("patch", [(8, 4), (4, 8)])
def test_input_adapters_use_both_patch_sides(patch):
    rgb = _rgb_adapter(patch)
    assert (rgb.P_H, rgb.P_W) == patch and tuple(rgb.proj.kernel_size) == patch
    assert rgb(torch.randn(2, 3, 16, 16)).shape == (2, (16 // patch[0]) * (16 // patch[1]), D)
    full = (patch[0] * 4, patch[1] * 4)  # semseg at stride 4: patch on the label map = full patch / 4
    sem = SemSegInputAdapter(num_classes=5, stride_level=4, patch_size_full=full, dim_tokens=D, image_size=(32, 32))
    assert (sem.P_H, sem.P_W) == patch
    assert sem(torch.randint(0, 5, (2, 8, 8))).shape == (2, (8 // patch[0]) * (8 // patch[1]), D)


def test_output_adapter_uses_both_patch_sides():
    out = SpatialOutputAdapter(num_channels=2, stride_level=1, patch_size_full=(8, 4), dim_tokens_enc=D,
                               dim_tokens=D, num_heads=2, image_size=(16, 16), task="rgb", context_tasks=["rgb"])
    assert (out.P_H, out.P_W) == (8, 4) and out.out_proj.out_features == 2 * 8 * 4
    model = MultiMAE({"rgb": _rgb_adapter()}, {"rgb": out}, dim_tokens=D, depth=1, num_heads=2)
    preds, _ = model({"rgb": torch.randn(1, 3, 16, 16)}, num_encoded_tokens=4)
    assert preds["rgb"].shape == (1, 2, 16, 16)


def test_pos_emb_is_resized_height_first_with_align_corners_false():
    """On a 24 x 16 input, adapters built for 16 x 16 add their embedding resized to the (6, 4) token grid."""
    rgb = _rgb_adapter(patch=4)
    rgb.pos_emb.data = torch.randn_like(rgb.pos_emb)  # not symmetric in h and w
    x = torch.randn(1, 3, 24, 16)
    ref = F.interpolate(rgb.pos_emb, size=(6, 4), mode="bicubic", align_corners=False)
    tokens = rgb(x) - rgb.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2))


def _tiny_mae(**kw):
    outs = {"rgb": SpatialOutputAdapter(num_channels=3, stride_level=1, patch_size_full=4, dim_tokens=D, num_heads=2,
                                        image_size=16, task="rgb", context_tasks=["rgb", "semseg"], **kw)}
    ins = {"rgb": PatchedInputAdapter(3, 1, 4, image_size=16),
           "semseg": SemSegInputAdapter(5, 4, 4, image_size=16, dim_class_emb=8)}  # 1 x 1 patches on 4 x 4 labels
    return MultiMAE(ins, outs, dim_tokens=D, depth=2, num_heads=2).eval()


def test_mask_inputs_false_encodes_every_token():
    model = _tiny_mae()
    x = {"rgb": torch.randn(2, 3, 16, 16), "semseg": torch.randint(0, 5, (2, 4, 4))}
    _, masks = model(x, mask_inputs=False, num_encoded_tokens=3)
    assert all(bool((m == 0).all()) for m in masks.values()), "mask_inputs=False must leave every token visible"
    model.output_adapters = None
    tokens, _ = model(x, mask_inputs=False, num_encoded_tokens=3)
    assert tokens.shape == (2, 16 + 16 + 1, D)  # 16 rgb + 16 semseg patch tokens + 1 global token
    tokens, _ = model(x, mask_inputs=True, num_encoded_tokens=3)
    assert tokens.shape == (2, 3 + 1, D)


def test_without_task_queries_the_queries_ignore_the_encoded_tokens():
    model = _tiny_mae(use_task_queries=False)
    adapter = model.output_adapters["rgb"]
    x = {"rgb": torch.randn(2, 3, 16, 16), "semseg": torch.randint(0, 5, (2, 4, 4))}
    tokens, info = model.tokenize(x)
    masks, keep, restore = model.generate_random_masks(tokens, 6)
    context = torch.randn(2, 6 + 1, D)
    queries, _ = adapter.get_queries_and_context(context, info, keep, restore)
    expected = adapter.mask_token + adapter.pos_emb.flatten(2).transpose(1, 2) + adapter.task_embeddings["rgb"]
    torch.testing.assert_close(queries, expected.expand(2, -1, -1))
    with_queries = _tiny_mae(use_task_queries=True).output_adapters["rgb"]
    with_queries.load_state_dict(adapter.state_dict())
    other, _ = with_queries.get_queries_and_context(context, info, keep, restore)
    assert not torch.allclose(other, queries)


def test_image_size_of_a_strided_input_is_multiplied_by_its_stride():
    ins = {"semseg": SemSegInputAdapter(5, 4, 16, image_size=32, dim_class_emb=8)}
    outs = {"semseg": SpatialOutputAdapter(num_channels=5, stride_level=4, patch_size_full=16, dim_tokens=D,
                                           num_heads=2, image_size=32, task="semseg", context_tasks=["semseg"])}
    model = MultiMAE(ins, outs, dim_tokens=D, depth=1, num_heads=2).eval()
    labels = torch.randint(0, 5, (1, 8, 12))  # a 32 x 48 image at stride 4
    _, info = model.tokenize({"semseg": labels})
    assert tuple(info["image_size"]) == (32, 48)
    preds, _ = model({"semseg": labels}, num_encoded_tokens=3)
    assert preds["semseg"].shape == (1, 5, 8, 12)


def test_drop_path_grows_linearly_over_depth():
    ins = {"rgb": PatchedInputAdapter(3, 1, 4, image_size=16)}
    model = MultiMAE(ins, None, dim_tokens=D, depth=4, num_heads=2, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.encoder]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    out = SpatialOutputAdapter(3, 1, 4, dim_tokens=D, depth=3, num_heads=2, image_size=16, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in out.decoder_transformer]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
