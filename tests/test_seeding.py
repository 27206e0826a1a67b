"""Per-sample augmentation seeds: the same draws with 0 or 2 (persistent) workers, per epoch, for torch, random
and numpy, and the fine-tuning train loader built on them."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.config.job import RuntimeConfig
from utils.data.seeding import PerSampleSeed, sample_seed
from utils.finetune.common import build_train_loader


class Draws(Dataset):
    """Sample ``i``: one draw from each of torch, random and numpy (what an augmentation would use)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())], dtype=torch.float64)


def _epochs(num_workers: int, epochs: int = 2) -> list[torch.Tensor]:
    ds = PerSampleSeed(Draws(), seed=5)
    loader = DataLoader(ds, batch_size=4, num_workers=num_workers, persistent_workers=num_workers > 0)
    out = []
    for e in range(epochs):
        ds.set_epoch(e)  # in the main process; the persistent workers were started in epoch 0
        out.append(torch.cat(list(loader)))
    return out


def test_persistent_workers_see_the_epoch_and_draw_what_the_main_process_draws():
    main, workers = _epochs(0), _epochs(2)
    for a, b in zip(main, workers):
        assert torch.equal(a, b)
    assert not torch.equal(main[0], main[1])  # the epoch reached the workers: new draws
    g = torch.Generator().manual_seed(sample_seed(5, 1, 3))
    assert main[1][3, 0].item() == torch.rand((), generator=g).item()
    assert main[1][3, 1].item() == random.Random(sample_seed(5, 1, 3)).random()


def test_callers_streams_are_untouched():
    ds = PerSampleSeed(Draws(), seed=0)
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = (torch.rand(()).item(), random.random(), np.random.rand())
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    ds[0], ds[5]
    assert (torch.rand(()).item(), random.random(), np.random.rand()) == expected


def test_finetune_train_loader_seeds_per_sample_and_epoch():
    loader = build_train_loader(Draws(), 4, RuntimeConfig(seed=2, num_workers=0))
    assert loader.dataset.seeded_per_sample
    loader.sampler.set_epoch(3)
    assert loader.dataset.epoch == 3
    batch = next(iter(loader))
    first = next(iter(loader.sampler))
    reference = PerSampleSeed(Draws(), 2)
    reference.set_epoch(3)
    assert torch.equal(batch[0], reference[first])
