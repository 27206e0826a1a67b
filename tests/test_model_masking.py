"""Token masking: Dirichlet budgets, given masks, make_mask, sampling statistics."""
import itertools

import pytest
import torch

from multimae import MultiMAE, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter
from multimae.multimae import sample_alphas


def _tokens(B, sizes, dim=4):
    return {f"t{i}": torch.zeros(B, n, dim) for i, n in enumerate(sizes)}


@pytest.fixture(scope="module")
def masker():
    """A MultiMAE whose mask generator is used directly (the method does not touch the weights)."""
    return MultiMAE({"rgb": PatchedInputAdapter(3, 1, 16, image_size=32)}, None, dim_tokens=8, depth=0, num_heads=2)


def _reference_masks(sizes, B, budget, alphas):
    """The masking algorithm written out literally (Dirichlet over the batch, per-task shuffles, rounding repair)."""
    props = torch.distributions.Dirichlet(torch.tensor(alphas)).sample((B,))
    k = (props * budget).round().long()
    masks = []
    for i, n in enumerate(sizes):
        perm = torch.argsort(torch.rand(B, n), dim=1)
        masks.append(torch.where(perm < k[:, i:i + 1], 0, 1))
    mask_all = torch.cat(masks, dim=1)
    ids_shuffle = torch.argsort(mask_all + torch.rand_like(mask_all.float()), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    repaired = torch.ones_like(mask_all)
    repaired[:, :budget] = 0
    return torch.gather(repaired, 1, ids_restore), ids_shuffle[:, :budget], ids_restore


def test_random_masks_follow_the_published_algorithm(masker):
    sizes, B, budget, alphas = [16, 16, 9], 64, 12, [1.0, 0.5, 2.0]
    torch.manual_seed(3)
    ref_mask, ref_keep, ref_restore = _reference_masks(sizes, B, budget, alphas)
    torch.manual_seed(3)
    masks, ids_keep, ids_restore = masker.generate_random_masks(_tokens(B, sizes), budget, alphas=alphas)
    assert torch.equal(torch.cat(list(masks.values()), dim=1), ref_mask)
    assert torch.equal(ids_keep, ref_keep) and torch.equal(ids_restore, ref_restore)


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("budget", [1, 7, 20, 40])
def test_exact_budget_and_consistent_indices(masker, uniform, budget):
    sizes, B = [16, 16, 8], 50
    masks, ids_keep, ids_restore = masker.generate_random_masks(_tokens(B, sizes), budget,
                                                                sample_tasks_uniformly=uniform)
    assert [tuple(m.shape) for m in masks.values()] == [(B, n) for n in sizes]
    assert all(m.dtype == torch.int64 for m in masks.values())
    mask_all = torch.cat(list(masks.values()), dim=1)
    assert torch.all((mask_all == 0).sum(1) == budget)
    assert ids_keep.shape == (B, budget)
    # ids_keep lists exactly the visible tokens; ids_restore inverts the shuffle
    assert torch.all(torch.gather(mask_all, 1, ids_keep) == 0)
    shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(shuffle[:, :budget], ids_keep)
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(sum(sizes)).expand(B, -1))


def test_mean_share_per_task_follows_alphas(masker):
    """E[share_t] = alpha_t / sum(alpha) for Dirichlet budgets (no clipping: budget < every task's tokens)."""
    B, budget, alphas = 4000, 12, [2.0, 1.0, 1.0]
    masks, _, _ = masker.generate_random_masks(_tokens(B, [16, 16, 16]), budget, alphas=alphas)
    shares = torch.stack([(m == 0).sum(1).float() / budget for m in masks.values()], dim=1).mean(0)
    torch.testing.assert_close(shares, torch.tensor([0.5, 0.25, 0.25]), atol=0.02, rtol=0)


def test_uniform_task_subsets_are_equally_likely(masker):
    """With sample_tasks_uniformly every non-empty subset of tasks is the set of visible tasks with
    probability 1/(2^T - 1) (large budget, so rounding almost never empties a chosen task)."""
    T, B, budget = 3, 7000, 100
    masks, _, _ = masker.generate_random_masks(_tokens(B, [200] * T), budget, sample_tasks_uniformly=True)
    visible = torch.stack([(m == 0).any(1) for m in masks.values()], dim=1).long()
    codes = (visible * torch.tensor([4, 2, 1])).sum(1)
    freq = torch.bincount(codes, minlength=8).float() / B
    assert freq[0] == 0
    torch.testing.assert_close(freq[1:], torch.full((7,), 1 / 7), atol=0.02, rtol=0)


def test_sample_alphas_enumerates_subsets_in_product_order():
    T, B = 3, 14000
    conc = sample_alphas(B, T, alphas=[1.0, 2.0, 3.0])
    chosen = (conc > 1e-3).long()
    subsets = [list(s) for s in itertools.product([0, 1], repeat=T)][1:]
    counts = [int((chosen == torch.tensor(s)).all(1).sum()) for s in subsets]
    assert sum(counts) == B
    assert all(abs(c / B - 1 / 7) < 0.015 for c in counts), counts
    # chosen tasks get their alpha (+eps), the others eps only
    torch.testing.assert_close(conc, chosen * torch.tensor([1.0, 2.0, 3.0]) + 1e-5)


def test_unchosen_tasks_get_no_budget_before_repair(masker):
    """Tasks outside the sampled subset receive ~0 of the budget: with one visible task, all of a
    sample's visible tokens come from it."""
    masks, _, _ = masker.generate_random_masks(_tokens(3000, [60, 60, 60]), 30, sample_tasks_uniformly=True)
    counts = torch.stack([(m == 0).sum(1) for m in masks.values()], dim=1)
    n_visible_tasks = (counts > 0).sum(1)
    assert (n_visible_tasks == 1).float().mean() > 0.35  # 3/7 of samples pick a single task
    single = counts[n_visible_tasks == 1]
    assert torch.all(single.max(1).values == 30)


def test_alphas_length_must_match_tasks(masker):
    with pytest.raises(ValueError, match="alphas has 2 entries"):
        masker.generate_random_masks(_tokens(2, [4, 4, 4]), 3, alphas=[1.0, 1.0])


# ---------------------------------------------------------------------------------------------- forward options
@pytest.fixture(scope="module")
def tiny_mae():
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=32), "semseg": SemSegInputAdapter(5, 4, 16, image_size=32)}
    outs = {"rgb": SpatialOutputAdapter(3, 1, 16, dim_tokens=16, depth=0, num_heads=2, image_size=32, task="rgb",
                                        context_tasks=["rgb", "semseg"])}
    return MultiMAE(ins, outs, dim_tokens=32, depth=1, num_heads=2).eval()


def _inputs(B=3):
    return {"rgb": torch.randn(B, 3, 32, 32), "semseg": torch.randint(0, 5, (B, 8, 8))}


def test_num_encoded_tokens_none_or_no_masking_keeps_all(tiny_mae):
    x = _inputs()
    for kwargs in (dict(num_encoded_tokens=None), dict(mask_inputs=False), dict(num_encoded_tokens=10_000)):
        _, masks = tiny_mae(x, **kwargs)
        assert all(torch.count_nonzero(m) == 0 for m in masks.values()), kwargs
    encoder_only = MultiMAE({"rgb": PatchedInputAdapter(3, 1, 16, image_size=32)}, None, dim_tokens=32, depth=1,
                            num_heads=2)
    tokens, _ = encoder_only(torch.randn(2, 3, 32, 32), num_encoded_tokens=None)
    assert tokens.shape == (2, 4 + 1, 32)


def test_given_masks_batch_equals_per_sample(tiny_mae):
    x = _inputs(3)
    masks = {"rgb": torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 1]]),
             "semseg": torch.tensor([[1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 1]])}  # 3 visible each
    with torch.no_grad():
        batch_preds, out_masks = tiny_mae(x, task_masks=masks)
        for i in range(3):
            single, _ = tiny_mae({k: v[i:i + 1] for k, v in x.items()}, task_masks={k: v[i:i + 1] for k, v in masks.items()})
            torch.testing.assert_close(batch_preds["rgb"][i:i + 1], single["rgb"], atol=1e-6, rtol=0)
    assert out_masks is masks


def test_given_masks_errors(tiny_mae):
    x = _inputs(2)
    with pytest.raises(ValueError, match="same number of visible tokens"):
        tiny_mae(x, task_masks={"rgb": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]), "semseg": torch.ones(2, 4)})
    with pytest.raises(KeyError, match="semseg"):
        tiny_mae(x, task_masks={"rgb": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        tiny_mae(x, task_masks={"rgb": torch.zeros(2, 5), "semseg": torch.zeros(2, 4)})


def test_make_mask_coordinates_and_default_device(tiny_mae):
    masks = tiny_mae.make_mask(2, 3, {"rgb": [[0, 0], [2, 1]], "depth": []}, full_tasks=["depth"])
    expected_rgb = torch.tensor([[0, 1, 1], [1, 1, 0]]).flatten()[None]
    assert torch.equal(masks["rgb"], expected_rgb) and masks["rgb"].dtype == torch.int64
    assert torch.equal(masks["depth"], torch.zeros(1, 6, dtype=torch.int64))
    assert masks["rgb"].device == next(tiny_mae.parameters()).device
    inverted = MultiMAE.make_mask(2, 3, {"rgb": [[0, 0]]}, indicate_visible=False, flatten=False)
    assert inverted["rgb"].shape == (2, 3) and inverted["rgb"].sum() == 1 and inverted["rgb"][0, 0] == 1
    assert inverted["rgb"].device.type == "cpu"


def test_make_mask_drives_forward(tiny_mae):
    masks = tiny_mae.make_mask(2, 2, {"rgb": [[0, 0], [1, 1]], "semseg": [[1, 0]]})
    preds, out = tiny_mae(_inputs(1), task_masks=masks)
    assert preds["rgb"].shape == (1, 3, 32, 32)
    assert int(sum((m == 0).sum() for m in out.values())) == 3
