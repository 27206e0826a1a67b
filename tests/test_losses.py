import math

import pytest
import torch
import torch.nn.functional as F

from utils.finetune.losses import (PixelBerHuLoss, PixelL1Loss, PixelMSELoss, build_regression_loss, masked_berhu_loss,
                          masked_l1_loss, masked_mse_loss)


def _case():
    pred = torch.tensor([1.0, 2.0, 3.0, 100.0]).view(1, 1, 1, 4).requires_grad_()
    target = torch.tensor([0.0, 2.0, 5.0, 4.0]).view(1, 1, 1, 4)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)
    return pred, target, mask


def test_l1_hand_computed_and_invalid_pixel_ignored():
    pred, target, mask = _case()
    loss = masked_l1_loss(pred, target, mask)
    assert loss.item() == pytest.approx((1 + 0 + 2) / 3)
    loss.backward()
    assert pred.grad.view(-1).tolist() == pytest.approx([1 / 3, 0.0, -1 / 3, 0.0])


def test_berhu_hand_computed():
    pred, target, mask = _case()
    # masked diffs 1, 0, -2, (0); c = 0.2 * 2 = 0.4 (the invalid diff of 96 must not set c)
    c = 0.4
    expected = ((1 + c * c) / (2 * c) + 0 + (4 + c * c) / (2 * c)) / 3
    loss = masked_berhu_loss(pred, target, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # quadratic branch: d/dp (d^2 + c^2) / 2c = d / c (c is a constant)
    assert pred.grad.view(-1).tolist() == pytest.approx([1 / c / 3, 0.0, -2 / c / 3, 0.0], rel=1e-6)


def test_berhu_linear_branch_below_c():
    pred = torch.tensor([0.1, 1.0]).view(1, 1, 1, 2)
    target = torch.zeros(1, 1, 1, 2)
    c = 0.2  # 0.2 * max|d| = 0.2; |0.1| < c -> L1, |1.0| >= c -> quadratic
    expected = (0.1 + (1.0 + c * c) / (2 * c)) / 2
    assert masked_berhu_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_mask_broadcast_over_channels_counts_elements():
    pred = torch.tensor([[1.0, 3.0], [2.0, 5.0]]).view(1, 2, 1, 2)
    target = torch.zeros(1, 2, 1, 2)
    mask = torch.tensor([True, False]).view(1, 1, 1, 2)
    assert masked_l1_loss(pred, target, mask).item() == pytest.approx((1 + 2) / 2)
    assert masked_mse_loss(pred, target, mask).item() == pytest.approx((1 + 4) / 2)
    # (B, H, W) masks are accepted too
    assert masked_l1_loss(pred, target, mask[:, 0]).item() == pytest.approx(1.5)


@pytest.mark.parametrize("fn", [masked_l1_loss, masked_berhu_loss, masked_mse_loss])
def test_all_invalid_gives_zero_with_grad_not_nan(fn):
    pred = torch.randn(2, 1, 3, 3, requires_grad=True)
    target = torch.full((2, 1, 3, 3), float("nan"))  # garbage where invalid must not leak
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    loss = fn(pred, target, mask)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_nan_target_at_invalid_pixels_is_ignored():
    torch.manual_seed(0)
    pred = torch.randn(1, 1, 4, 4, requires_grad=True)
    target = torch.randn(1, 1, 4, 4)
    mask = torch.rand(1, 1, 4, 4) > 0.5
    ref = masked_berhu_loss(pred, target, mask)
    target_nan = torch.where(mask, target, torch.tensor(float("nan")))
    loss = masked_berhu_loss(pred, target_nan, mask)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item())
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_without_mask_equals_torch_losses():
    torch.manual_seed(0)
    p, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    assert masked_l1_loss(p, t).item() == pytest.approx(F.l1_loss(p, t).item(), rel=1e-6)
    assert masked_mse_loss(p, t).item() == pytest.approx(F.mse_loss(p, t).item(), rel=1e-6)


def test_modules_builder_and_errors():
    pred, target, mask = _case()
    assert isinstance(build_regression_loss("berhu"), PixelBerHuLoss)
    assert isinstance(build_regression_loss("l1"), PixelL1Loss)
    assert isinstance(build_regression_loss("l2"), PixelMSELoss)
    assert PixelL1Loss()(pred, target, mask).item() == pytest.approx(1.0)
    assert PixelMSELoss()(pred, target, mask).item() == pytest.approx(5 / 3)
    assert math.isclose(PixelBerHuLoss()(pred, target, mask).item(), masked_berhu_loss(pred, target, mask).item())
    with pytest.raises(ValueError, match="unknown regression loss 'huber'"):
        build_regression_loss("huber")
    with pytest.raises(ValueError, match="target shape"):
        masked_l1_loss(pred, target[..., :2])
