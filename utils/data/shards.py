"""Streaming training batches from tar shards (written by tools/make_shards.py), read with webdataset.

Each epoch's order is a pure function of ``(seed, epoch)``: the shards are permuted, their samples laid end
to end, and process ``rank`` takes the ``rank``-th equal slice (drop-last: ``len(self)`` batches for every
process, the few left-over samples differ per epoch). Within a process, data-loader worker ``w`` of ``W``
takes a contiguous block of the slice's batches (so each worker opens about ``1/W`` of the shards), shuffles
its stream with a seeded buffer and yields whole batches; the DataLoader hands them out round robin, so
loader batch ``i`` is batch ``i // W`` of worker ``i % W``. That arithmetic makes a mid-epoch resume
exact: :meth:`ShardStream.skip_next` makes each worker drop the samples of its batches already trained on
without decoding them.

Augmentation is seeded per sample with the formula of ``utils.data.seeding.PerSampleSeed`` and the
sample's folder index, so a sample gets the same tensors as from the folder it was sharded from.

Bad data: a missing modality or an undecodable member (naming shard and key), a shard that is missing,
truncated or corrupt (naming the shard and the last key read) and a checksum mismatch (checked while
streaming: :func:`stream_checksum`) raise :class:`ShardError`/``BadSampleError`` under
``on_bad_sample='error'``; under ``'skip'`` each lost sample is logged, counted in the batch's
``TrackedBatch.bad`` (the trainer counts them per epoch) and its slot is filled by a copy of the previous good
sample, so every process still yields ``len(self)`` batches.

Public API: ShardStream, ShardLoader, build_shard_loader, bad_sample_policy, shard_samples, train_split_stream,
is_shard_source, sample_seed, stream_checksum.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
import sys
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate

from utils.data.datasets import BadSampleError, check_label_range
from utils.data.loader import ResumableBatchSampler, TrackedBatch
from utils.data.modalities import get_modality
from utils.data.seeding import sample_seed, seeded
from utils.data.shard_format import (Manifest, ShardError, ShardInfo, check_modalities, decode_member,
                                     is_shard_source, load_manifest, sample_key)

__all__ = ['ShardStream', 'ShardLoader', 'build_shard_loader', 'bad_sample_policy', 'shard_samples', 'train_split_stream',
           'is_shard_source', 'sample_seed', 'stream_checksum']

Segment = Tuple[int, int, int]  # (shard number in the manifest, first position, end position) in that shard


try:  # optional (requirements.txt): the fast checksum; without it the loader checks the CRC-32
    import xxhash
except ImportError:  # pragma: no cover - depends on the installation
    xxhash = None


def stream_checksum(shard: ShardInfo) -> Tuple[str, str]:
    """``(kind, expected hex digest)`` the loader checks for ``shard``: xxh3 when the manifest has it and
    ``xxhash`` is installed, else CRC-32, else sha256 (manifests written before the others were recorded)."""
    if shard.xxh3 and xxhash is not None:
        return 'xxh3', shard.xxh3
    return ('crc32', shard.crc32) if shard.crc32 else ('sha256', shard.sha256)


class _HashingReader:
    """A read-only stream that checksums what passes through it, checked at the end of the shard. Measured
    inside the tar stream for a 320 px fast-encoded sample (230 KB): xxh3 0.02 ms, CRC-32 and sha256 ~0.15 ms
    each (of ~2.4 ms a sample). ``kind=''``: no checksum."""

    def __init__(self, stream: Any, kind: str = 'crc32'):
        self.stream, self.kind, self.crc = stream, kind, 0
        self.hash = {'sha256': hashlib.sha256, 'xxh3': getattr(xxhash, 'xxh3_64', None)}.get(kind, lambda: None)()

    def __repr__(self) -> str:  # webdataset appends the stream to its error messages
        return f'<stream of {getattr(self.stream, "name", "a shard")}>'

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.kind == 'crc32':
            self.crc = zlib.crc32(data, self.crc)
        elif self.hash is not None:
            self.hash.update(data)
        return data

    def drain(self) -> str:
        """Read to the end and close; the checksum in hex digits, '' without one."""
        while self.read(1 << 20):
            pass
        close = getattr(self.stream, 'close', None)
        if close is not None:
            close()
        if self.kind == 'crc32':
            return f'{self.crc:08x}'
        return self.hash.hexdigest() if self.hash is not None else ''


def _with_exit_status(err: Exception, stream: Any) -> Exception | str:
    """``err``, plus the exit status of a failed ``pipe:`` command. Whether the tar reader sees the command's
    exit first or the end of its output first depends on timing, so the pipe is closed (waited for) here
    and a non-zero status is always named."""
    pipe = getattr(stream, 'stream', None)
    if pipe is None or not hasattr(pipe, 'proc') or 'exit' in str(err):
        return err
    try:
        pipe.close()
    except Exception as status:  # webdataset's Pipe raises IOError('...: exit N ...') on a failed command
        return f'{err}; {status}'
    return err


def _slices(total: int, parts: int) -> List[Tuple[int, int]]:
    """``[start, end)`` of ``parts`` contiguous blocks of ``total`` items, earlier ones larger by <= 1."""
    q, r = divmod(total, parts)
    bounds = [0]
    for p in range(parts):
        bounds.append(bounds[-1] + q + (p < r))
    return list(zip(bounds[:-1], bounds[1:]))


class ShardStream(IterableDataset):
    """Batches ``TrackedBatch((dict modality -> (B, ...) tensor, labels (B,)), folder indices, bad)`` of one
    process (``rank`` of ``world_size``) from the shards of ``data_path`` (manifest or shard pattern).

    Args:
        transform: callable on the dict of decoded (C, H, W) tensors, e.g. ``PretrainTransform``.
        batch_size: samples per batch (every batch is full).
        shuffle_buffer: samples a worker holds to shuffle its stream (raw bytes; ~0.3 MB each for 320 px
            rgb + raw 16-bit depth). 0: shard order only.
        label_ranges: ``{modality: (num_classes, allowed_ids)}`` checked per sample, as in the folder.
        verify: check every shard's checksum while streaming it (see :func:`stream_checksum`).
    """

    seeded_per_sample = True

    @property
    def dataset(self) -> 'ShardStream':
        # the Trainer looks one level down (under its SampleGuard) for ``seeded_per_sample`` to decide that a
        # resume may skip batches without loading them
        return self

    def __init__(self, data_path: str, modalities: Sequence[str], transform: Optional[Callable], batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 256,
                 label_ranges: Optional[Dict[str, Tuple[int, Sequence[int]]]] = None, on_bad_sample: str = 'error',
                 verify: bool = True, manifest: Optional[Manifest] = None):
        if on_bad_sample not in ('error', 'skip'):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.manifest = manifest or load_manifest(data_path)
        check_modalities(self.manifest, modalities)
        self.modalities, self.transform, self.batch_size = list(modalities), transform, int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.shuffle_buffer, self.verify, self.on_bad_sample = int(shuffle_buffer), verify, on_bad_sample
        self.label_ranges = {m: (int(n), tuple(e)) for m, (n, e) in (label_ranges or {}).items() if m in modalities}
        narrow = bool(getattr(transform, 'accepts_uint16_dense', False))
        self._narrow = frozenset(m for m in self.modalities if narrow and get_modality(m).kind == 'dense')
        self.classes, self.epoch, self._skip = self.manifest.classes, 0, 0
        if self.num_batches == 0:
            raise ValueError(f"{self.manifest.num_samples} samples in '{self.manifest.source}' make no full batch of "
                             f"{self.batch_size} on each of {self.world_size} process(es)")

    def __len__(self) -> int:
        """All samples of the shards (like the folder dataset); :attr:`num_batches` is per process."""
        return self.manifest.num_samples

    @property
    def num_batches(self) -> int:
        """Batches every process yields per epoch (drop-last)."""
        return self.manifest.num_samples // self.world_size // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, n: int) -> None:
        """The next iteration starts ``n`` loader batches into the epoch (the dataset is copied to the
        workers when the loader's iterator is created, so call this before ``iter(loader)``)."""
        self._skip = max(0, int(n))

    def samples_paths(self, index: int) -> Dict[str, str]:
        """Where sample ``index`` (folder index) lives, for error messages."""
        for s in self.manifest.shards:
            if index in s.indices:
                return {'shard': s.url, 'key': sample_key(index)}
        return {'shard': '(not in these shards)', 'key': sample_key(index)}

    # -- the plan ------------------------------------------------------------------------------------

    def epoch_segments(self, epoch: int, rank: int) -> List[Segment]:
        """The samples process ``rank`` trains on in ``epoch``, as pieces of shards, in order."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 2 ** 40))
        order = torch.randperm(len(self.manifest.shards), generator=g).tolist()
        per_rank = self.num_batches * self.batch_size
        return self._cut(order, rank * (self.manifest.num_samples // self.world_size), per_rank)

    def _cut(self, order: List[int], start: int, count: int) -> List[Segment]:
        """Positions ``[start, start + count)`` of the shards laid end to end in ``order``."""
        out, pos = [], 0
        for s in order:
            n = self.manifest.shards[s].num_samples
            lo, hi = max(start, pos), min(start + count, pos + n)
            if lo < hi:
                out.append((s, lo - pos, hi - pos))
            pos += n
        return out

    def worker_segments(self, epoch: int, worker: int, num_workers: int) -> Tuple[List[Segment], int]:
        """Segments and number of batches of data-loader worker ``worker`` of ``num_workers``."""
        b0, b1 = _slices(self.num_batches, num_workers)[worker]
        flat = [(s, p) for s, lo, hi in self.epoch_segments(epoch, self.rank) for p in range(lo, hi)]
        mine = flat[b0 * self.batch_size:b1 * self.batch_size]
        segments: List[Segment] = []
        for s, p in mine:  # re-join consecutive positions
            if segments and segments[-1][0] == s and segments[-1][2] == p:
                segments[-1] = (s, segments[-1][1], p + 1)
            else:
                segments.append((s, p, p + 1))
        return segments, b1 - b0

    # -- reading -------------------------------------------------------------------------------------

    def _bad(self, message: str) -> Tuple[str, Any]:
        if self.on_bad_sample == 'error':
            raise ShardError(message)
        sys.stderr.write(f'[bad sample] skipped {message}\n')
        return 'bad', message

    def _read_shard(self, shard: ShardInfo, lo: int, hi: int) -> Iterator[Tuple[str, Any]]:
        """``('ok', raw sample dict)`` for positions ``[lo, hi)`` of ``shard``; ``('bad', message)`` for each
        position lost to a truncated or unreadable shard (under 'skip')."""
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        pos, key, stream = 0, None, None
        try:
            kind, expected = stream_checksum(shard) if self.verify else ('', '')
            stream = _HashingReader(gopen(shard.url, 'rb'), kind)
            for sample in group_by_keys(tar_file_expander([{'url': shard.url, 'stream': stream}])):
                key = sample['__key__']
                if lo <= pos < hi:
                    yield 'ok', sample
                pos += 1
            digest = stream.drain()  # the tar end blocks, then close: a pipe: command's exit status is checked
        except Exception as err:  # tarfile, gzip, OSError from gopen/pipe: all of them mean a broken shard
            where = f"after key '{key}'" if key is not None else 'before its first sample'
            err = _with_exit_status(err, stream)
            for p in range(max(pos, lo), hi):
                yield self._bad(f"shard '{shard.url}' is missing, truncated or corrupt ({where}, {pos} of "
                                f"{shard.num_samples} samples read; position {p} lost): {err}")
            return
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.stream.close()
        for p in range(max(pos, lo), hi):
            yield self._bad(f"shard '{shard.url}' ends after {pos} samples (key '{key}'); the manifest "
                            f"lists {shard.num_samples} (position {p} lost)")
        if self.verify and digest != expected:
            msg = (f"shard '{shard.url}': {stream.kind} {digest} does not match the manifest's {expected} "
                   f"(the file changed after it was written; its samples were used)")
            if self.on_bad_sample == 'error':
                raise ShardError(msg)
            sys.stderr.write(f'[bad shard] {msg}\n')

    def decode(self, raw: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], int, int]:
        """A raw sample -> ``(dict modality -> decoded tensor, class index, folder index)``, checked like
        ``MultiModalImageFolder.load``; raises BadSampleError naming shard and key."""
        where = f"shard '{raw['__url__']}', key '{raw['__key__']}'"
        members = {k.split('.', 1)[0]: k for k in raw if not k.startswith('__')}
        sample = {}
        for m in self.modalities:
            if m not in members:
                raise BadSampleError(f"{where}: modality '{m}' is missing (members: {sorted(members.values())})")
            try:
                sample[m] = decode_member(raw[members[m]], m, members[m], widen_uint16=m not in self._narrow)
            except Exception as err:
                raise BadSampleError(f"{where}: cannot decode {m} member '{members[m]}': {err}") from err
        sizes = {m: tuple(t.shape[-2:]) for m, t in sample.items()}
        if len(set(sizes.values())) > 1:
            raise BadSampleError(f'{where}: modalities of different sizes (HxW) {sizes}')
        for m, (n, extra) in self.label_ranges.items():
            check_label_range(sample[m], f"{raw['__key__']}.{members[m]} in {raw['__url__']}", m, n, extra)
        try:
            label = int(raw['cls']) if 'cls' in raw else -1
        except ValueError as err:
            raise BadSampleError(f'{where}: class label is not an integer: {err}') from err
        return sample, label, int(raw['__key__'])

    def _items(self, segments: List[Segment], rng: random.Random) -> Iterator[Tuple[str, Any]]:
        """The worker's raw items, shuffled through a buffer of ``shuffle_buffer`` (seeded: deterministic)."""
        buf: List[Tuple[str, Any]] = []
        for s, lo, hi in segments:
            for item in self._read_shard(self.manifest.shards[s], lo, hi):
                if len(buf) < self.shuffle_buffer:
                    buf.append(item)
                    continue
                if not buf:
                    yield item
                    continue
                k = rng.randrange(len(buf))
                buf[k], item = item, buf[k]
                yield item
        rng.shuffle(buf)
        yield from buf

    def _load(self, raw: Dict[str, Any]) -> Tuple[Tuple[Dict[str, torch.Tensor], int], int]:
        sample, label, index = self.decode(raw)
        if self.transform is not None:
            with seeded(sample_seed(self.seed, self.epoch, index)):  # timm's cls transforms draw from random
                sample = self.transform(sample)
        return (sample, label), index

    def __iter__(self) -> Iterator[TrackedBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Loader batch i comes from worker i % W (the DataLoader's round robin). In an epoch started at batch
        # `skip`, worker w must therefore produce what worker (w + skip) % W produces in a full epoch.
        role = (worker + self._skip) % workers
        segments, _ = self.worker_segments(self.epoch, role, workers)
        skipped = len(range(role, self._skip, workers)) * self.batch_size
        rng = random.Random(sample_seed(self.seed, self.epoch, (self.rank * 1024 + role) * 2 ** 20))
        return self._batches(self._items(segments, rng), skipped, role, self.epoch)

    def _batches(self, items: Iterator[Tuple[str, Any]], skipped: int, worker: int,
                 epoch: int) -> Iterator[TrackedBatch]:
        """Full batches of decoded samples after dropping the first ``skipped`` raw items; a bad item's
        slot gets the previous good sample (or the next one, at the start)."""
        for _ in range(skipped):
            next(items, None)
        pending: list = []
        last, owed = None, 0
        for kind, payload in items:
            if kind == 'ok':
                try:
                    last = self._load(payload)
                except BadSampleError as err:
                    kind, payload = self._bad(str(err))
            bad = [payload] if kind == 'bad' else []
            if last is None:
                owed += 1
                pending.append((None, bad))
                continue
            pending = [(last if s is None else s, b) for s, b in pending] if owed else pending
            owed = 0
            pending.append((last, bad))
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []
        if owed:
            raise BadSampleError(f'every sample of worker {worker} of process {self.rank} in epoch {epoch} '
                                 f'was bad; the shards look broken')

    @staticmethod
    def _collate(items: list) -> TrackedBatch:
        data = default_collate([s for (s, _), _ in items])
        return TrackedBatch(data, [i for (_, i), _ in items], [m for _, b in items for m in b])


class ShardLoader:
    """A DataLoader over a :class:`ShardStream` that the Trainer resumes like a map-style loader: it has
    ``len``, ``dataset`` (with ``set_epoch``) and a ``batch_sampler`` whose ``skip_next`` reaches the stream."""

    def __init__(self, stream: ShardStream, num_workers: int = 0, pin_memory: bool = False, **kwargs: Any):
        self.dataset, self.num_workers, self.sampler = stream, int(num_workers), None
        self.batch_size = stream.batch_size
        self.batch_sampler = _StreamSkip(stream)
        # Persistent workers would keep the epoch (and resume position) they started with: the plan lives in
        # the workers, so they are started anew every epoch (fine-tuning loaders pass persistent_workers=True).
        kwargs.pop('persistent_workers', None)
        self._kwargs = dict(num_workers=self.num_workers, pin_memory=pin_memory, **kwargs)

    def __len__(self) -> int:
        return self.dataset.num_batches

    def persist(self) -> None:
        """Keep the worker processes between epochs (for benchmarks: a new epoch or resume position then
        does not reach them)."""
        if self.num_workers:
            self._persistent = self._loader(persistent_workers=True)

    def _loader(self, **extra: Any) -> DataLoader:
        from utils.data.loader import _WorkerInit
        kwargs = {**self._kwargs, **extra}
        if self.num_workers:
            kwargs['worker_init_fn'] = _WorkerInit(kwargs.get('worker_init_fn'))
        return DataLoader(self.dataset, batch_size=None, **kwargs)

    def __iter__(self) -> Iterator[TrackedBatch]:
        it = iter(getattr(self, '_persistent', None) or self._loader())
        self.dataset.skip_next(0)  # the workers (or this process's iterator) already have the position
        return it


class _StreamSkip(ResumableBatchSampler):
    """What the Trainer sees as the loader's batch sampler: ``skip_next`` goes to the stream."""

    def __init__(self, stream: ShardStream):
        super().__init__(range(stream.num_batches))
        self.stream = stream

    def skip_next(self, n: int) -> None:
        self.stream.skip_next(n)


def bad_sample_policy(cfg: Any) -> str:
    """``on_bad_sample`` of a configuration: a flat namespace or one with a ``runtime`` section."""
    return getattr(cfg, 'on_bad_sample', None) or getattr(getattr(cfg, 'runtime', None), 'on_bad_sample', 'error')


def build_shard_loader(data_path: str, modalities: Sequence[str], transform: Callable, batch_size: int,
                       seed: int, rank: int, world_size: int, num_workers: int, pin_memory: bool = False,
                       label_ranges: Optional[dict] = None, on_bad_sample: str = 'error') -> ShardLoader:
    """The training loader over shards (see the module docstring for order, split and resume)."""
    stream = ShardStream(data_path, modalities, transform, batch_size, seed=seed, rank=rank, world_size=world_size,
                         label_ranges=label_ranges, on_bad_sample=on_bad_sample)
    return ShardLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def shard_samples(data_path: str, modalities: Sequence[str], transform: Optional[Callable], n: int) -> list:
    """The first ``n`` samples of the shards in manifest order, decoded and transformed (fixed pictures,
    e.g. for reconstructions): a list of dicts modality -> tensor. The global RNG stream is left alone."""
    stream = ShardStream(data_path, modalities, transform, batch_size=1, shuffle_buffer=0)
    out: list = []
    with torch.random.fork_rng(devices=[]):
        for i, shard in enumerate(stream.manifest.shards):
            for _, raw in stream._read_shard(shard, 0, min(shard.num_samples, n - len(out))):
                out.append(stream._load(raw)[0][0])
            if len(out) >= n:
                break
    return out


def train_split_stream(data_path: str, split: str, modalities: Sequence[str], transform: Callable, batch_size: int,
                       seed: int, label_ranges: Optional[dict] = None, max_images: Optional[int] = None,
                       on_bad_sample: str = 'error') -> ShardStream:
    """The fine-tuning training split as a :class:`ShardStream` of this process (rank and world size from
    ``utils.dist``); ``runner.build_train_loader`` wraps it in a :class:`ShardLoader`. Evaluation splits
    are read in order without dropping samples, so they stay folders."""
    from utils.dist import get_rank, get_world_size

    if split != 'train':
        raise ValueError(f"'{data_path}' names shards, which serve the training split only (shuffled, drop-last); "
                         f"give the {split} split as a folder")
    if max_images:
        raise ValueError(f'--max_train_images {max_images} does not apply to shards; select fewer shards with a '
                         f"brace pattern (e.g. '.../train-{{000000..000009}}.tar')")
    return ShardStream(data_path, modalities, transform, batch_size, seed=seed, rank=get_rank(),
                       world_size=get_world_size(), label_ranges=label_ranges, on_bad_sample=on_bad_sample)
