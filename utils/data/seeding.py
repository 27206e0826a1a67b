"""Augmentation randomness as a function of ``(seed, epoch, sample index)``, for pre-training and fine-tuning.

:class:`PerSampleSeed` wraps a map-style dataset: while sample ``i`` of epoch ``e`` is loaded, the CPU torch
generator, Python's ``random`` and numpy's global generator are seeded from ``(seed, e, i)`` (and restored
afterwards; numpy's only in the main process, see :class:`seeded`). Every transform the project uses draws
from one of those three (torchvision and this project's transforms: torch; timm's RandAugment,
random-resized crop and random erasing: ``random``), so a sample
gets the same augmentation whatever the number of processes or data-loader workers, whatever was loaded
before it, and whether or not the batches before it were loaded at all: a mid-epoch resume skips them.

The epoch lives in a one-element shared-memory tensor, so :meth:`PerSampleSeed.set_epoch` in the main
process also reaches *persistent* data-loader workers (forked or spawned before the epoch began): the main
process sets it before it creates the epoch's iterator, which is before any index of that epoch is sent.

Public API: PerSampleSeed, sample_seed(seed, epoch, index) -> int, seeded(seed) (a context manager).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["PerSampleSeed", "sample_seed", "seeded"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of sample ``index`` in ``epoch`` of a run seeded ``seed`` (< 2**63)."""
    return ((int(seed) * 1_000_003 + int(epoch)) * 1_000_003 + int(index)) % (2 ** 63)


class seeded:
    """Context manager: inside, torch's CPU generator, Python's ``random`` and numpy's global generator are
    seeded from ``seed``; afterwards all three continue where they were.

    Exception, for speed: in a DataLoader worker numpy's global generator stays seeded from the last sample
    (saving and restoring its 2.5 kB state costs ~80 us, the rest of this ~20 us: 3-4 % of loading a
    pre-training sample). Every sample re-seeds it, and a worker draws nothing between samples, so no
    sample's augmentation changes; the main process (0 workers) gets the exact restore.
    """

    __slots__ = ('seed', '_torch', '_py', '_np')

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __enter__(self) -> None:
        # Only the CPU torch generator is saved and seeded: a data-loader worker has no CUDA RNG, and
        # torch.manual_seed would also (lazily) reseed the CUDA generators, which it would not restore (with
        # 0 workers on a GPU that would clobber the training stream). Same as fork_rng(devices=[]) around
        # default_generator.manual_seed, without its device queries.
        gen = torch.default_generator
        self._torch = gen.get_state()
        self._py = random.getstate()
        self._np = np.random.get_state() if get_worker_info() is None else None
        gen.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % (2 ** 32))

    def __exit__(self, *exc: Any) -> None:
        torch.default_generator.set_state(self._torch)
        random.setstate(self._py)
        if self._np is not None:
            np.random.set_state(self._np)


class PerSampleSeed(Dataset):
    """Dataset wrapper: the random augmentation of sample ``i`` in epoch ``e`` depends only on ``(seed, e,
    i)``, not on the process, the worker or what was drawn before; the caller's random streams are left
    untouched. Call :meth:`set_epoch` every epoch (it reaches persistent workers too)."""

    seeded_per_sample = True  # tells the Trainer that a mid-epoch resume may skip batches without loading them

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # classes, modalities, samples_paths(), ...
        if name in ("dataset", "_epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
