"""Golden-fixture tests: models rebuilt from each fixture's ``config`` load the published weights
strictly and reproduce the published outputs and losses (see tests/fixtures/README.md).

Builders read sizes from the fixture ``config`` and the modality layout from the state dict / input
shapes, so fixtures with other sizes, decoder settings or heads pass as well.
"""
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from multimae.criterion import MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss
from multimae.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from multimae.multimae import MultiMAE, MultiViT
from multimae.output_adapters import (ConvNeXtAdapter, DPTOutputAdapter, LinearOutputAdapter,
                                      SegmenterMaskTransformerAdapter, SpatialOutputAdapter)
from multimae.registry import create_model

ATOL = 1e-5


def _load(fixtures_dir, name):
    path = fixtures_dir / name
    if not path.exists():
        pytest.fail(f"golden fixture missing: {path}")
    return torch.load(path, weights_only=True)


def _tasks(state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
    """Adapter names under ``prefix`` in state-dict order."""
    names = []
    for key in state_dict:
        if key.startswith(prefix + "."):
            task = key.split(".")[1]
            if task not in names:
                names.append(task)
    return names


def _semseg_stride(cfg, inputs, task):
    if f"{task}_stride" in cfg:
        return cfg[f"{task}_stride"]
    size = cfg["image_size"]
    return size // inputs[task].shape[-1] if task in inputs else 4


def _input_adapters(cfg, state_dict, inputs):
    """Rebuild the input adapters: semantic maps (a class embedding) or patched images."""
    adapters = {}
    for task in _tasks(state_dict, "input_adapters"):
        p = f"input_adapters.{task}."
        if p + "class_emb.weight" in state_dict:
            rows, dim_class_emb = state_dict[p + "class_emb.weight"].shape
            padding_idx = cfg.get("emb_padding_idx")
            adapters[task] = SemSegInputAdapter(
                num_classes=cfg.get("semseg_classes", rows - (padding_idx is not None)),
                stride_level=_semseg_stride(cfg, inputs, task), patch_size_full=cfg["patch_size"],
                image_size=cfg["image_size"], dim_class_emb=cfg.get("dim_class_emb", dim_class_emb),
                interpolate_class_emb=cfg.get("interpolate_class_emb", p + "proj.1.weight" in state_dict),
                emb_padding_idx=padding_idx)
        else:
            adapters[task] = PatchedInputAdapter(
                num_channels=state_dict[p + "proj.weight"].shape[1], stride_level=1,
                patch_size_full=cfg["patch_size"], image_size=cfg["image_size"])
    return adapters


def _encoder_kwargs(cfg):
    return dict(num_global_tokens=cfg.get("num_global_tokens", 1), dim_tokens=cfg["dim_tokens"],
                depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0),
                qkv_bias=cfg.get("qkv_bias", True))


# ---------------------------------------------------------------------------------------------- pre-training
PRETRAIN_FIXTURES = ["public_pretrain.pt", "public_strong_pretrain.pt"]
FINETUNE_FIXTURES = ["public_finetune.pt", "public_strong_finetune.pt"]


@pytest.fixture(scope="module", params=PRETRAIN_FIXTURES)
def pretrain(fixtures_dir, request):
    """The plain fixture, and the strong one (perturbed norms and biases, non-square inputs of another
    size than the adapters were built for: 96 x 64 on 64 x 64 adapters)."""
    fx = _load(fixtures_dir, request.param)
    cfg, sd, inputs = fx["config"], fx["state_dict"], fx["inputs"]
    in_adapters = _input_adapters(cfg, sd, inputs)
    context_tasks = cfg.get("context_tasks", list(in_adapters))
    out_adapters = {}
    for name in _tasks(sd, "output_adapters"):
        p = f"output_adapters.{name}."
        target = "rgb" if name == "norm_rgb" else name
        P = in_adapters[target].P_H
        out_adapters[name] = SpatialOutputAdapter(
            num_channels=sd[p + "out_proj.weight"].shape[0] // (P * P), stride_level=in_adapters[target].stride_level,
            patch_size_full=cfg["patch_size"], dim_tokens=cfg["decoder_dim"], depth=cfg["decoder_depth"],
            num_heads=cfg["decoder_num_heads"], image_size=cfg["image_size"],
            use_task_queries=cfg.get("decoder_use_task_queries", True), task=target, context_tasks=context_tasks,
            use_xattn=cfg.get("decoder_use_xattn", True))
    model = MultiMAE(in_adapters, out_adapters, **_encoder_kwargs(cfg))
    model.load_state_dict(sd, strict=True)
    model.eval()
    losses = {}
    for name in out_adapters:
        target = "rgb" if name == "norm_rgb" else name
        stride = in_adapters[target].stride_level
        if isinstance(in_adapters[target], SemSegInputAdapter):
            losses[name] = MaskedCrossEntropyLoss(patch_size=cfg["patch_size"], stride=stride)
        elif target == "depth":
            losses[name] = MaskedL1Loss(patch_size=cfg["patch_size"], stride=stride)
        else:
            losses[name] = MaskedMSELoss(patch_size=cfg["patch_size"], stride=stride, norm_pix=name == "norm_rgb")
    return fx, model, losses


def _num_visible(masks):
    return int(sum((m == 0).sum() for m in masks.values()))


def test_pretrain_predictions_and_losses_per_sample(pretrain):
    fx, model, losses = pretrain
    assert len(fx["samples"]) == next(iter(fx["inputs"].values())).shape[0]
    for i, sample in enumerate(fx["samples"]):
        x = {k: v[i:i + 1] for k, v in fx["inputs"].items()}
        with torch.no_grad():
            preds, masks = model(x, mask_inputs=True, task_masks=sample["task_masks"],
                                 num_encoded_tokens=_num_visible(sample["task_masks"]))
        assert list(preds) == list(sample["preds"])
        for task, ref in sample["preds"].items():
            assert preds[task].shape == ref.shape
            torch.testing.assert_close(preds[task], ref, atol=ATOL, rtol=0, msg=f"sample {i} pred {task}")
        for name, ref in sample["losses"].items():
            target = "rgb" if name == "norm_rgb" else name
            loss = losses[name](preds[name].float(), x[target], mask=sample["task_masks"][target])
            torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0, msg=f"sample {i} loss {name}")


def test_pretrain_given_masks_for_whole_batch_match_per_sample(pretrain):
    """The published code only supported task_masks for batch size 1; a batch with equal visible
    counts must give the per-sample results."""
    fx, model, _ = pretrain
    samples = fx["samples"]
    counts = {_num_visible(s["task_masks"]) for s in samples}
    if len(counts) != 1:
        pytest.skip("fixture samples have different visible-token counts")
    masks = {t: torch.cat([s["task_masks"][t] for s in samples]) for t in samples[0]["task_masks"]}
    with torch.no_grad():
        preds, out_masks = model(fx["inputs"], task_masks=masks)
    for task in samples[0]["preds"]:
        ref = torch.cat([s["preds"][task] for s in samples])
        torch.testing.assert_close(preds[task], ref, atol=ATOL, rtol=0)
    assert all(torch.equal(out_masks[t], masks[t]) for t in masks)


def test_pretrain_given_masks_with_unequal_counts_raise(pretrain):
    fx, model, _ = pretrain
    masks = {t: torch.cat([s["task_masks"][t] for s in fx["samples"]]) for t in fx["samples"][0]["task_masks"]}
    first = next(iter(masks))
    masks[first] = masks[first].clone()
    masks[first][0] = 1 - masks[first][0]  # change sample 0's visible count only
    with pytest.raises(ValueError, match="same number of visible tokens"):
        model(fx["inputs"], task_masks=masks)


def test_multivit_encoder_tokens(pretrain, fixtures_dir):
    fx, _, _ = pretrain
    cfg, sd = fx["config"], fx["state_dict"]
    model = MultiViT(_input_adapters(cfg, sd, fx["inputs"]), None, **_encoder_kwargs(cfg))
    model.load_state_dict({k: v for k, v in sd.items() if not k.startswith("output_adapters.")}, strict=True)
    model.eval()
    with torch.no_grad():
        tokens = model(fx["inputs"])
    ref = fx["multivit_encoder_tokens"]
    assert tokens.shape == ref.shape
    torch.testing.assert_close(tokens, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- fine-tuning
def _finetune_head(name: str, cfg, num_classes: int):
    """Head for a fixture entry; the kind is read from the entry name, the sizes from ``config``."""
    main_tasks = cfg.get("main_tasks", ["rgb"])
    if "convnext" in name:
        return ConvNeXtAdapter(num_classes, embed_dim=cfg["convnext_embed_dim"],
                               preds_per_patch=cfg["convnext_preds_per_patch"], main_tasks=main_tasks,
                               patch_size=cfg["patch_size"], depth=cfg["convnext_depth"])
    if "dpt" in name:
        return DPTOutputAdapter(num_classes=num_classes, stride_level=1, patch_size=cfg["patch_size"],
                                main_tasks=main_tasks, hooks=cfg["dpt_hooks"], layer_dims=cfg["dpt_layer_dims"],
                                feature_dim=cfg["dpt_feature_dim"], use_bn=cfg.get("dpt_use_bn", False),
                                head_type="semseg" if name.startswith("semseg") else "regression")
    if "segmenter" in name:
        return SegmenterMaskTransformerAdapter(
            num_classes, depth=cfg.get("segmenter_depth", 2), num_heads=cfg.get("segmenter_num_heads", 4),
            embed_dim=cfg.get("segmenter_embed_dim", cfg["dim_tokens"]), main_tasks=main_tasks,
            patch_size=cfg["patch_size"])
    if name.startswith("cls"):
        return LinearOutputAdapter(num_classes, use_mean_pooling=cfg.get("cls_use_mean_pooling", True))
    raise AssertionError(f"no builder for fine-tuning fixture entry {name!r}")


def _finetune_entries(fixtures_dir):
    """``(fixture file, entry)`` pairs; the strong file runs the same heads on 64 x 96 inputs."""
    pairs = []
    for name in FINETUNE_FIXTURES:
        path = fixtures_dir / name
        entries = list(torch.load(path, weights_only=True)["models"]) if path.exists() else ["missing"]
        pairs += [(name, entry) for entry in entries]
    return pairs


_FINETUNE_CACHE: Dict[str, dict] = {}


@pytest.mark.parametrize("fixture_name,entry", _finetune_entries(Path(__file__).parent / "fixtures"))
def test_finetune_head_outputs(fixtures_dir, fixture_name, entry):
    if fixture_name not in _FINETUNE_CACHE:
        _FINETUNE_CACHE[fixture_name] = _load(fixtures_dir, fixture_name)
    finetune = _FINETUNE_CACHE[fixture_name]
    cfg, inputs = finetune["config"], finetune["inputs"]
    e = finetune["models"][entry]
    head = _finetune_head(entry, cfg, num_classes=e["output"].shape[1])
    model = MultiViT(_input_adapters(cfg, e["state_dict"], inputs), {entry: head}, **_encoder_kwargs(cfg))
    model.load_state_dict(e["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model({k: inputs[k] for k in e["input_keys"]}, **e["forward_kwargs"])
    assert out[entry].shape == e["output"].shape
    torch.testing.assert_close(out[entry], e["output"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- released layout
def test_pretrain_multimae_base_matches_released_key_layout(fixtures_dir):
    """``pretrain_multimae_base`` built like the released config has exactly the released
    checkpoint's keys and shapes, 98,569,360 elements (built on the meta device: no memory, no init cost)."""
    ref = json.loads((fixtures_dir / "vitb_keys.json").read_text())["multimae"]
    tasks = ["rgb", "depth", "semseg"]
    with torch.device("meta"):
        ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=224), "depth": PatchedInputAdapter(1, 1, 16, image_size=224),
               "semseg": SemSegInputAdapter(133, 4, 16, image_size=224, dim_class_emb=64)}
        outs = {name: SpatialOutputAdapter(c, s, 16, dim_tokens=256, depth=2, num_heads=8, image_size=224,
                                           use_task_queries=True, task=task, context_tasks=tasks)
                for name, c, s, task in [("rgb", 3, 1, "rgb"), ("depth", 1, 1, "depth"), ("semseg", 133, 4, "semseg"),
                                         ("norm_rgb", 3, 1, "rgb")]}
        model = create_model("pretrain_multimae_base", input_adapters=ins, output_adapters=outs, num_global_tokens=1)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(shapes) == set(ref), (sorted(set(shapes) ^ set(ref)))[:10]
    assert shapes == ref
    assert sum(v.numel() for v in model.state_dict().values()) == 98_569_360
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 97_917_072  # the 7 sin-cos position embeddings are frozen
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("encoder.", "global_tokens")))
    assert encoder == 85_055_232
