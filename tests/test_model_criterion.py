"""Masked pre-training losses and the ignore_index extension."""
import pytest
import torch
import torch.nn.functional as F

from multimae import MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss


def _published_masked(loss, mask, p):
    """Reference formula: per-sample mean over hidden pixels, nanmean over samples."""
    B, H, W = loss.shape
    m = mask.reshape(B, H // p, W // p).repeat_interleave(p, 1).repeat_interleave(p, 2).float()
    return ((loss * m).flatten(1).sum(1) / m.flatten(1).sum(1)).nanmean()


@pytest.fixture
def data():
    B, C, H, W, p = 3, 3, 32, 32, 8
    mask = (torch.rand(B, (H // p) * (W // p)) < 0.6).long()
    mask[1] = 0  # a sample with nothing hidden is skipped (NaN in the published nanmean)
    return torch.randn(B, C, H, W), torch.randn(B, C, H, W), mask, p


def test_mse_and_l1_match_the_published_formula(data):
    pred, target, mask, p = data
    mse = MaskedMSELoss(patch_size=p, stride=1)(pred, target, mask)
    torch.testing.assert_close(mse, _published_masked((pred - target).square().mean(1), mask, p))
    l1 = MaskedL1Loss(patch_size=p, stride=1)(pred, target, mask)
    torch.testing.assert_close(l1, _published_masked((pred - target).abs().mean(1), mask, p))


def test_stride_sets_the_patch_edge(data):
    """semseg-style targets at 1/4 resolution: patch 16, stride 4 -> 4x4 pixel patches."""
    pred, target, mask, _ = data
    pred, target = pred[..., :16, :16], target[..., :16, :16]
    loss = MaskedMSELoss(patch_size=16, stride=4)(pred, target, mask)
    torch.testing.assert_close(loss, _published_masked((pred - target).square().mean(1), mask, 4))


@pytest.mark.parametrize("loss_fn", [MaskedMSELoss(8), MaskedL1Loss(8), MaskedMSELoss(8, norm_pix=True)])
def test_all_visible_mask_gives_zero_and_all_hidden_gives_plain_mean(data, loss_fn):
    pred, target, _, _ = data
    pred.requires_grad_(True)
    zero = loss_fn(pred, target, torch.zeros(3, 16, dtype=torch.long))
    assert zero.dtype == torch.float32 and zero.item() == 0.0
    zero.backward()  # differentiable, gradient zero
    assert torch.count_nonzero(pred.grad) == 0
    torch.testing.assert_close(loss_fn(pred, target, torch.ones(3, 16)), loss_fn(pred, target))


def test_norm_pix_targets_are_standardised_per_patch():
    loss_fn = MaskedMSELoss(patch_size=8, stride=1, norm_pix=True)
    target = torch.rand(2, 3, 16, 16) * 5 + 2
    normed = loss_fn.normalize_target(target, 2, 2)
    patches = loss_fn.patchify(normed, 2, 2)  # (B, 4, 8*8*3)
    torch.testing.assert_close(patches.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1), torch.ones(2, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(loss_fn.unpatchify(loss_fn.patchify(target, 2, 2), 2, 2), target)
    # patch layout (p1 p2 c): the first channel vector of patch 0 is pixel (0, 0)
    torch.testing.assert_close(loss_fn.patchify(target, 2, 2)[0, 0, :3], target[0, :, 0, 0])
    torch.testing.assert_close(loss_fn(normed, target), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_cross_entropy_matches_published_formula_and_edge_cases():
    B, K, H, W, p = 2, 5, 16, 16, 4
    logits, target = torch.randn(B, K, H, W), torch.randint(0, K, (B, H, W))
    mask = (torch.rand(B, 16) < 0.5).long()
    ce = MaskedCrossEntropyLoss(patch_size=16, stride=4)
    full = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(ce(logits, target, mask), _published_masked(full, mask, p))
    torch.testing.assert_close(ce(logits, target), full.mean())
    assert ce(logits, target, torch.zeros(B, 16)).item() == 0.0
    smooth = MaskedCrossEntropyLoss(16, 4, label_smoothing=0.1)(logits, target, mask)
    ref = _published_masked(F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1), mask, p)
    torch.testing.assert_close(smooth, ref)


def test_cross_entropy_ignore_index_excluded_from_denominators():
    B, K, H, W = 2, 4, 8, 8
    logits, target = torch.randn(B, K, H, W), torch.randint(0, K, (B, H, W))
    mask = torch.ones(B, 4, dtype=torch.long)  # patch 4 at stride 1 -> 2x2 tokens, all hidden
    target_ign = target.clone()
    target_ign[0, :4] = 255  # half of sample 0 ignored
    target_ign[1] = 255  # sample 1 entirely ignored -> skipped like a sample with nothing hidden
    loss = MaskedCrossEntropyLoss(patch_size=4, stride=1, ignore_index=255)(logits, target_ign, mask)
    expected = F.cross_entropy(logits[0:1, :, 4:], target[0:1, 4:])
    torch.testing.assert_close(loss, expected)
    unmasked = MaskedCrossEntropyLoss(patch_size=4, ignore_index=255)(logits, target_ign)
    torch.testing.assert_close(unmasked, F.cross_entropy(logits, target_ign, ignore_index=255))


def test_mask_size_mismatch_is_reported():
    with pytest.raises(ValueError, match="mask has 5 tokens"):
        MaskedMSELoss(8)(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), torch.ones(1, 5))


def test_losses_run_on_meta_device_without_host_sync():
    """Meta tensors carry no data, so any data-dependent Python branch (host sync) would raise."""
    with torch.device("meta"):
        pred, target, mask = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.ones(2, 4)
        for loss_fn in (MaskedMSELoss(8, norm_pix=True), MaskedL1Loss(8)):
            assert loss_fn(pred, target, mask).shape == ()
        ce = MaskedCrossEntropyLoss(8, ignore_index=255)(torch.randn(2, 5, 16, 16), torch.zeros(2, 16, 16).long(), mask)
        assert ce.shape == ()
