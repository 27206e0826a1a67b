"""Activation checkpointing of MultiMAE (``set_grad_checkpointing``): the encoder blocks and the pre-training
decoders (cross-attention + MLP, decoder blocks) are recomputed in backward. Same outputs, same gradients,
same state dict -- and less memory, which is the point."""
import pytest
import torch

from multimae import (MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss, MultiMAE, PatchedInputAdapter,
                      SemSegInputAdapter, SpatialOutputAdapter)
from tools.lib.benchmark import tensor_peak_bytes

TASKS = ["rgb", "depth", "semseg"]
NUM_CLASSES = 5


def _model(size, dim=32, depth=2, dec_depth=2, use_xattn=True, dec_dim=16):
    inputs = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=size),
              "depth": PatchedInputAdapter(1, 1, 16, image_size=size),
              "semseg": SemSegInputAdapter(NUM_CLASSES, 4, 16, image_size=size)}
    outputs = {name: SpatialOutputAdapter(c, s, 16, dim_tokens=dec_dim, depth=dec_depth, num_heads=2, image_size=size,
                                          task=task, context_tasks=TASKS, use_xattn=use_xattn)
               for name, c, s, task in [("rgb", 3, 1, "rgb"), ("depth", 1, 1, "depth"),
                                        ("semseg", NUM_CLASSES, 4, "semseg"), ("norm_rgb", 3, 1, "rgb")]}
    return MultiMAE(inputs, outputs, dim_tokens=dim, depth=depth, num_heads=2)


def _batch(size, B=2):
    g = torch.Generator().manual_seed(3)
    return {"rgb": torch.randn(B, 3, size, size, generator=g), "depth": torch.randn(B, 1, size, size, generator=g),
            "semseg": torch.randint(0, NUM_CLASSES, (B, size // 4, size // 4), generator=g)}


def _loss(preds, x, masks):
    return (MaskedMSELoss()(preds["rgb"], x["rgb"], masks["rgb"])
            + MaskedMSELoss(norm_pix=True)(preds["norm_rgb"], x["rgb"], masks["rgb"])
            + MaskedL1Loss()(preds["depth"], x["depth"], masks["depth"])
            + MaskedCrossEntropyLoss(stride=4)(preds["semseg"], x["semseg"], masks["semseg"]))


def _run(model, x, num_encoded_tokens):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # same Dirichlet split and masks
    preds, masks = model(x, num_encoded_tokens=num_encoded_tokens)
    _loss(preds, x, masks).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach().clone() for k, v in preds.items()}, masks, grads


@pytest.mark.parametrize("dec_depth, use_xattn", [(2, True), (0, True), (1, False)])
def test_checkpointing_keeps_outputs_and_gradients(dec_depth, use_xattn):
    torch.manual_seed(0)
    model = _model(32, dec_depth=dec_depth, use_xattn=use_xattn)
    keys = list(model.state_dict())
    x = _batch(32)
    model.set_grad_checkpointing(False)
    preds0, masks0, grads0 = _run(model, x, 6)
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing and all(a.grad_checkpointing for a in model.output_adapters.values())
    preds1, masks1, grads1 = _run(model, x, 6)
    assert list(model.state_dict()) == keys  # checkpointing adds no parameter or buffer
    for task in preds0:
        assert torch.equal(preds0[task], preds1[task]), task  # the forward is the same computation
    for task in masks0:
        assert torch.equal(masks0[task], masks1[task])
    assert grads0.keys() == grads1.keys() and len(grads0) > 40
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], atol=1e-7, rtol=1e-6, msg=name)


def test_switching_off_reaches_every_decoder_and_no_grad_forward_is_unchanged():
    torch.manual_seed(0)
    model = _model(32)
    x = _batch(32)
    outs = []
    for enable in (True, False):
        model.set_grad_checkpointing(enable)
        assert all(a.grad_checkpointing == enable for a in model.output_adapters.values())
        torch.manual_seed(1)
        with torch.no_grad():
            outs.append(model(x, num_encoded_tokens=6)[0])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_checkpointing_lowers_the_step_memory():
    """Encoder and decoder activations are not kept for backward: the training step's peak tensor memory
    (gradients included) drops well below the plain step's."""
    torch.manual_seed(0)
    model = _model(96, dim=64, depth=6, dec_depth=2, dec_dim=32)
    x = _batch(96, B=8)
    peaks = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        _run(model, x, 72)  # allocate lazily created state first
        peaks[enable] = tensor_peak_bytes(lambda: _run(model, x, 72))[0]
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert peaks[True] < 0.6 * peaks[False]  # measured 0.31
    assert peaks[True] > grads  # the gradients themselves are still allocated during the step
