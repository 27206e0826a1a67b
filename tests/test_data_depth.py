"""robust_standardize: published truncated standardisation (fixture) and the masked variant."""
import os

import pytest
import torch

from utils.data.depth import robust_standardize

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'public_pretrain.pt')


def _reference(depth, valid, trim=0.1, eps=1e-6):
    """Per-image loop: sort the valid pixels, drop the lowest/highest ``trim``, standardise with their mean/var."""
    out = torch.zeros_like(depth)
    for b in range(depth.shape[0]):
        vals = depth[b][valid[b]].sort().values
        n = vals.numel()
        kept = vals[int(trim * n):int((1 - trim) * n)]
        out[b] = (depth[b] - kept.mean()) / torch.sqrt(kept.var(unbiased=True) + eps)
        out[b][~valid[b]] = 0
    return out


def test_matches_published_fixture():
    fx = torch.load(FIXTURE, weights_only=True)
    raw, expected = fx['depth_raw'], fx['inputs']['depth']
    torch.testing.assert_close(robust_standardize(raw), expected, atol=1e-5, rtol=0)
    # an all-valid mask gives the same numbers
    torch.testing.assert_close(robust_standardize(raw, torch.ones_like(raw, dtype=torch.bool)), expected,
                               atol=1e-5, rtol=0)


def test_masked_variant_matches_per_image_reference():
    g = torch.Generator().manual_seed(0)
    depth = torch.rand(4, 1, 13, 11, generator=g) * 5 + 1
    depth[0, 0, :3] = 1000.0  # outliers that must not matter once masked out
    valid = torch.rand(4, 1, 13, 11, generator=g) > 0.3
    valid[0, 0, :3] = False
    out = robust_standardize(depth, valid)
    torch.testing.assert_close(out, _reference(depth, valid), atol=1e-5, rtol=1e-5)
    assert torch.all(out[~valid] == 0)


@pytest.mark.parametrize('n_valid', [7, 10, 30, 50, 90])
def test_trim_counts_follow_python_int(n_valid):
    """int(0.1 * n) / int(0.9 * n) boundaries for awkward counts."""
    depth = torch.randn(1, 1, 10, 10, generator=torch.Generator().manual_seed(n_valid))
    valid = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    valid.view(-1)[:n_valid] = True
    torch.testing.assert_close(robust_standardize(depth, valid), _reference(depth, valid), atol=1e-5, rtol=1e-5)


def test_invariant_to_affine_changes_and_shapes():
    depth = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    a = robust_standardize(depth)
    b = robust_standardize(depth * 250 + 17)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert robust_standardize(depth[:, 0]).shape == (3, 16, 16)
    # trimmed statistics: result has mean ~0 and std ~1 on the kept middle part
    kept = a.flatten(1).sort(dim=1).values[:, 25:230]
    torch.testing.assert_close(kept.mean(1), torch.zeros(3), atol=1e-5, rtol=0)


def test_all_invalid_image_gives_zeros_not_nan():
    depth = torch.rand(2, 1, 8, 8)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[1] = False
    out = robust_standardize(depth, valid)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)


def test_bad_trim():
    with pytest.raises(ValueError, match='trim'):
        robust_standardize(torch.rand(1, 1, 4, 4), trim=0.5)
