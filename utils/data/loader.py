"""A training DataLoader that knows which samples it delivers, survives bad samples and resumes mid-epoch.

:func:`track_loader` rebuilds a ``torch.utils.data.DataLoader`` with the same settings and three additions:

* every batch arrives as a :class:`TrackedBatch` ``(data, indices, bad)``: ``data`` is exactly what the
  original loader would have produced, ``indices`` the dataset indices in it (so a NaN loss can be traced
  to its files) and ``bad`` the messages of samples replaced because they could not be loaded;
* ``on_bad_sample='skip'``: a sample raising :class:`utils.data.datasets.BadSampleError` is logged and replaced
  by the next loadable index (deterministic, so a resumed run makes the same replacement); ``'error'``
  re-raises (the message names the file);
* :meth:`ResumableBatchSampler.skip_next` drops the first ``n`` batches of the next epoch without loading
  them (the sampler still draws the same permutation: ``DistributedSampler`` depends only on seed and epoch).

Data-loader workers ignore SIGTERM/SIGUSR1 (the main process saves and shuts them down itself).

Public API: TrackedBatch, SampleGuard, TrackingCollate, ResumableBatchSampler, track_loader(loader, on_bad_sample)
-> DataLoader | None, describe_samples(dataset, indices) -> list[str].
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from utils.data.datasets import BadSampleError
from utils.engine.preemption import ignore_stop_signals

__all__ = ['TrackedBatch', 'SampleGuard', 'TrackingCollate', 'ResumableBatchSampler', 'track_loader',
           'describe_samples', 'MAX_REPLACEMENTS']

MAX_REPLACEMENTS = 16  # consecutive bad samples before giving up (a broken folder, not a bad file)


class TrackedBatch(NamedTuple):
    """One batch with its provenance. ``indices``: dataset index of every sample actually used;
    ``bad``: one message per sample replaced in this batch."""
    data: Any
    indices: list
    bad: list


class SampleGuard(Dataset):
    """``dataset[i] -> (index_used, sample, bad_messages)``; replaces bad samples when ``on_bad_sample``
    is ``'skip'``."""

    def __init__(self, dataset: Dataset, on_bad_sample: str = 'error'):
        if on_bad_sample not in ('error', 'skip'):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.dataset, self.on_bad_sample = dataset, on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any, list]:
        bad: list[str] = []
        n = len(self)
        j = index
        for _ in range(MAX_REPLACEMENTS):
            try:
                return j, self.dataset[j], bad
            except BadSampleError as err:
                if self.on_bad_sample == 'error':
                    raise
                msg = f'sample {j}: {err}'
                sys.stderr.write(f'[bad sample] skipped {msg}\n')
                bad.append(msg)
                j = (j + 1) % n
        raise BadSampleError(f'{MAX_REPLACEMENTS} consecutive bad samples from index {index} on; the data '
                             f'folder looks broken. Last: {bad[-1]}')


class TrackingCollate:
    """Collate ``(index, sample, bad)`` triples into a :class:`TrackedBatch` with the original collate."""

    def __init__(self, collate_fn: Callable[[list], Any]):
        self.collate_fn = collate_fn

    def __call__(self, items: Sequence[tuple[int, Any, list]]) -> TrackedBatch:
        return TrackedBatch(self.collate_fn([s for _, s, _ in items]), [i for i, _, _ in items],
                            [m for _, _, b in items for m in b])


class ResumableBatchSampler:
    """Wraps a batch sampler; :meth:`skip_next` makes the next iteration start ``n`` batches in."""

    def __init__(self, batch_sampler: Any):
        self.batch_sampler = batch_sampler
        self._skip = 0

    def skip_next(self, n: int) -> None:
        self._skip = max(0, int(n))

    def __iter__(self) -> Iterator[list]:
        # A generator: the skip is taken when the first batch is drawn, not when iter() is called. A
        # multi-process DataLoader calls iter() on its batch sampler twice (once in the base iterator, once
        # when it starts its workers) and draws only from the second one.
        skip_ref = self

        def batches() -> Iterator[list]:
            skip, skip_ref._skip = skip_ref._skip, 0
            yield from itertools.islice(iter(skip_ref.batch_sampler), skip, None)
        return batches()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_size, drop_last, ...
        if name == 'batch_sampler':
            raise AttributeError(name)
        return getattr(self.batch_sampler, name)


class _WorkerInit:
    """Worker start-up: ignore stop signals, then the loader's own ``worker_init_fn``."""

    def __init__(self, fn: Callable[[int], None] | None):
        self.fn = fn

    def __call__(self, worker_id: int) -> None:
        ignore_stop_signals()
        if self.fn is not None:
            self.fn(worker_id)


def track_loader(loader: Any, on_bad_sample: str = 'error') -> DataLoader | None:
    """The tracked, resumable version of ``loader`` (a map-style ``DataLoader`` with automatic batching),
    or None when ``loader`` is something else (then it is used as it is)."""
    if (not isinstance(loader, DataLoader) or loader.batch_sampler is None
            or isinstance(loader.dataset, IterableDataset)):
        return None
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers, collate_fn=TrackingCollate(loader.collate_fn), pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=_WorkerInit(loader.worker_init_fn),
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs['prefetch_factor'] = loader.prefetch_factor
    if getattr(loader, 'pin_memory_device', ''):
        kwargs['pin_memory_device'] = loader.pin_memory_device
    if hasattr(loader, 'in_order'):
        kwargs['in_order'] = loader.in_order
    return DataLoader(SampleGuard(loader.dataset, on_bad_sample),
                      batch_sampler=ResumableBatchSampler(loader.batch_sampler), **kwargs)


def _sample_files(dataset: Any, index: int) -> str:
    while isinstance(dataset, (SampleGuard, Subset)):
        if isinstance(dataset, Subset):
            index = int(dataset.indices[index])
        dataset = dataset.dataset
    if hasattr(dataset, 'samples_paths'):
        paths = dataset.samples_paths(index)
        return ', '.join(f'{m}: {p}' for m, p in paths.items()) if isinstance(paths, dict) else str(paths)
    samples = getattr(dataset, 'samples', None) or getattr(dataset, 'imgs', None)
    if isinstance(samples, Sequence) and index < len(samples):
        item = samples[index]
        return str(item[0] if isinstance(item, (tuple, list)) else item)
    return '(no file names: the dataset has no samples_paths())'


def describe_samples(dataset: Any, indices: Sequence[int], limit: int = 16) -> list[str]:
    """``'#<index>: <files>'`` for each dataset index (at most ``limit``), for error messages."""
    lines = []
    for i in list(indices)[:limit]:
        try:
            lines.append(f'#{int(i)}: {_sample_files(dataset, int(i))}')
        except Exception as err:  # a description must never hide the error it describes
            lines.append(f'#{int(i)}: (cannot describe: {err})')
    if len(indices) > limit:
        lines.append(f'... and {len(indices) - limit} more')
    return lines
