"""Write a multi-modal folder as tar shards with a manifest (the library behind tools/make_shards.py).

The plan is a pure function of the folder, ``seed`` and ``shard_size``: the sorted samples are permuted with
``seed`` and cut into shards of ``shard_size``; shard ``i`` is ``<prefix>-<i:06d>.tar``. Each shard is
written to a temporary name, fsynced and renamed; ``manifest.partial.json`` records every finished shard
with its sha256, so an interrupted run, started again with the same arguments, keeps the shards whose
checksums match and writes only the rest. The finished ``manifest.json`` replaces the partial one.

Every sample is decoded before it is written (an unreadable file stops the run naming it, or with
``skip_bad`` is left out and listed in the manifest), and a fast-encoded member is decoded back and
compared with the original pixels.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from utils.data.datasets import BadSampleError, MultiModalImageFolder, decode_file
from utils.data.modalities import get_modality
from utils.data.shard_format import (ENCODINGS, FAST_ENCODINGS, FORMAT, MANIFEST_NAME, decode_member,
                                     encode_array, member_suffix, sample_key)
from utils.data.shards import xxhash
from utils.io import atomic_open, atomic_write

__all__ = ['ShardPlan', 'resolve_encodings', 'plan_shards', 'write_shard', 'make_shards', 'file_sha256',
           'file_checksums', 'verify_shards']

PARTIAL_NAME = 'manifest.partial.json'


@dataclass(frozen=True)
class ShardPlan:
    """What to write: source folder, modalities with their encodings and folder prefixes, the order."""
    data_path: str
    output_dir: str
    modalities: List[str]
    encodings: Dict[str, str]
    prefixes: Dict[str, str] = field(default_factory=dict)
    shard_size: int = 1000
    seed: int = 0
    prefix: str = 'train'
    skip_bad: bool = False

    def identity(self) -> dict:
        """The arguments a resumed run must share with the interrupted one."""
        return {k: v for k, v in asdict(self).items() if k not in ('output_dir', 'data_path')}


def resolve_encodings(modalities: Sequence[str], encoding: str, overrides: Dict[str, str]) -> Dict[str, str]:
    """Per-modality encoding: ``encoding`` 'orig' (files unchanged) or 'fast' (FAST_ENCODINGS by kind), then
    ``overrides`` (e.g. ``{'depth': 'zlib'}``)."""
    if encoding not in ('orig', 'fast'):
        raise ValueError(f"--encoding must be 'orig' or 'fast', got '{encoding}'")
    out = {m: 'orig' if encoding == 'orig' else FAST_ENCODINGS[get_modality(m).kind] for m in modalities}
    for m, e in overrides.items():
        if m not in out or e not in ENCODINGS:
            raise ValueError(f"--encodings: '{m}:{e}' must name one of {list(out)} and one of {ENCODINGS}")
        out[m] = e
    return out


def plan_shards(num_samples: int, shard_size: int, seed: int) -> List[List[int]]:
    """Folder indices of every shard: a ``seed`` permutation of ``range(num_samples)`` cut into pieces."""
    if shard_size < 1:
        raise ValueError(f'shard_size must be >= 1, got {shard_size}')
    order = np.random.RandomState(seed).permutation(num_samples).tolist()
    return [order[i:i + shard_size] for i in range(0, num_samples, shard_size)]


def file_checksums(path: str) -> Dict[str, str]:
    """``{'sha256': 64 hex digits, 'crc32': 8, 'xxh3': 16}`` of the file, in one read (no ``xxh3`` without
    the ``xxhash`` package)."""
    h, crc = hashlib.sha256(), 0
    xx = xxhash.xxh3_64() if xxhash is not None else None
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
            crc = zlib.crc32(block, crc)
            if xx is not None:
                xx.update(block)
    return {'sha256': h.hexdigest(), 'crc32': f'{crc:08x}', **({'xxh3': xx.hexdigest()} if xx is not None else {})}


def file_sha256(path: str) -> str:
    return file_checksums(path)['sha256']


def _sample_members(plan: ShardPlan, folder: MultiModalImageFolder, index: int) -> Dict[str, bytes]:
    """Members ``suffix -> bytes`` of sample ``index`` after decoding every file (BadSampleError if not)."""
    paths, label = folder.samples[index]
    cls = folder.classes[label]
    rel = os.path.relpath(os.path.splitext(paths[folder.modalities[0]])[0], folder.folders[folder.modalities[0]])
    members = {'json': json.dumps({'name': rel.replace(os.sep, '/'), 'class': cls}).encode(),
               'cls': str(label).encode()}
    sizes = {}
    for m in folder.modalities:
        img = decode_file(paths[m], m, widen_uint16=False)
        sizes[m] = tuple(img.shape[-2:])
        enc = plan.encodings[m]
        if enc == 'orig':
            suffix = member_suffix(m, enc, os.path.splitext(paths[m])[1])
            with open(paths[m], 'rb') as f:
                members[suffix] = f.read()
            continue
        suffix = member_suffix(m, enc)
        data = encode_array(img, enc)
        back = decode_member(data, m, suffix, widen_uint16=False)
        if back.dtype != img.dtype or not torch.equal(back, img):
            raise BadSampleError(f"{m} file '{paths[m]}': the {enc} encoding does not decode to the same pixels")
        members[suffix] = data
    if len(set(sizes.values())) > 1:
        raise BadSampleError(f'sample {index} has modalities of different sizes (HxW): '
                             + ', '.join(f"{m} {s} ('{paths[m]}')" for m, s in sizes.items()))
    return members


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same input gives the same bytes
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, '', ''
    tar.addfile(info, io.BytesIO(data))


def write_shard(plan: ShardPlan, shard_id: int, indices: Sequence[int],
                folder: Optional[MultiModalImageFolder] = None) -> dict:
    """Write shard ``shard_id`` (the samples ``indices`` of the folder) atomically; its manifest record."""
    folder = folder or _open_folder(plan)
    name = f'{plan.prefix}-{shard_id:06d}.tar'
    path = os.path.join(plan.output_dir, name)
    written, skipped = [], []
    with atomic_open(path, 'wb', fsync=True) as f:
        with tarfile.open(fileobj=f, mode='w', format=tarfile.USTAR_FORMAT) as tar:
            for index in indices:
                try:
                    members = _sample_members(plan, folder, index)
                except BadSampleError as err:
                    if not plan.skip_bad:
                        raise BadSampleError(f'shard {name}, sample {index}: {err}') from err
                    sys.stderr.write(f'[make_shards] skipped sample {index}: {err}\n')
                    skipped.append({'index': int(index), 'error': str(err)})
                    continue
                for suffix, data in members.items():
                    _tar_member(tar, f'{sample_key(index)}.{suffix}', data)
                written.append(int(index))
    return {'name': name, 'indices': written, **file_checksums(path), 'bytes': os.path.getsize(path),
            'skipped': skipped}


_WORKER_FOLDER: Dict[str, MultiModalImageFolder] = {}


def _open_folder(plan: ShardPlan) -> MultiModalImageFolder:
    return MultiModalImageFolder(plan.data_path, plan.modalities, prefixes=plan.prefixes)


def _write_in_worker(plan: ShardPlan, shard_id: int, indices: Sequence[int]) -> dict:
    torch.set_num_threads(1)
    if plan.data_path not in _WORKER_FOLDER:  # scan the folder once per process, not once per shard
        _WORKER_FOLDER[plan.data_path] = _open_folder(plan)
    return write_shard(plan, shard_id, indices, _WORKER_FOLDER[plan.data_path])


def _finished_shards(plan: ShardPlan, shards: List[List[int]]) -> Dict[int, dict]:
    """Records of shards a previous run finished (listed in the partial manifest, sha256 matching)."""
    partial = os.path.join(plan.output_dir, PARTIAL_NAME)
    if not os.path.exists(partial):
        return {}
    with open(partial) as f:
        meta = json.load(f)
    if meta.get('plan') != plan.identity() or meta.get('num_samples') != sum(map(len, shards)):
        raise ValueError(f"'{partial}' was written with other arguments ({meta.get('plan')}, "
                         f"{meta.get('num_samples')} samples); rerun with those or use another --output_dir")
    done = {}
    for rec in meta['shards']:
        path = os.path.join(plan.output_dir, rec['name'])
        if os.path.exists(path) and os.path.getsize(path) == rec['bytes'] and file_sha256(path) == rec['sha256']:
            done[int(rec['id'])] = rec
        else:
            sys.stderr.write(f"[make_shards] {rec['name']}: missing or checksum mismatch, rewriting it\n")
    return done


def _save_manifest(plan: ShardPlan, folder: MultiModalImageFolder, records: Dict[int, dict], total: int,
                   complete: bool) -> str:
    meta = {'format': FORMAT, 'complete': complete, 'source': os.path.abspath(plan.data_path),
            'num_samples': total, 'plan': plan.identity(), 'modalities': plan.modalities,
            'encodings': plan.encodings, 'classes': folder.classes,
            'shards': [{'id': i, **records[i]} for i in sorted(records)]}
    name = MANIFEST_NAME if complete else PARTIAL_NAME
    path = os.path.join(plan.output_dir, name)
    atomic_write(path, json.dumps(meta, separators=(',', ':')).encode() + b'\n', fsync=True)
    return path


def make_shards(plan: ShardPlan, num_workers: int = 0, log: Callable[[str], None] = print,
                max_shards: Optional[int] = None) -> str:
    """Write (or finish writing) every shard of ``plan``; returns the path of ``manifest.json``.
    ``max_shards`` stops after that many new shards (the manifest stays partial)."""
    folder = _open_folder(plan)
    shards = plan_shards(len(folder), plan.shard_size, plan.seed)
    os.makedirs(plan.output_dir, exist_ok=True)
    records = _finished_shards(plan, shards)
    todo = [i for i in range(len(shards)) if i not in records][:max_shards]
    log(f'{len(folder)} samples -> {len(shards)} shards of {plan.shard_size} ({len(records)} already written); '
        f'encodings {plan.encodings}')
    t0, done_samples = time.perf_counter(), 0

    def finished(i: int, rec: dict) -> None:
        nonlocal done_samples
        records[i] = rec
        done_samples += len(shards[i])
        _save_manifest(plan, folder, records, len(folder), complete=False)
        rate = done_samples / max(time.perf_counter() - t0, 1e-9)
        log(f"{rec['name']}: {len(rec['indices'])} samples, {rec['bytes'] / 2 ** 20:.1f} MiB "
            f"({len(records)}/{len(shards)} shards, {rate:.0f} samples/s)")

    if num_workers <= 0:
        for i in todo:
            finished(i, write_shard(plan, i, shards[i], folder))
    else:
        with ProcessPoolExecutor(num_workers) as pool:
            futures = {pool.submit(_write_in_worker, plan, i, shards[i]): i for i in todo}
            for fut in as_completed(futures):
                finished(futures[fut], fut.result())
    if len(records) < len(shards):
        return os.path.join(plan.output_dir, PARTIAL_NAME)
    path = _save_manifest(plan, folder, records, len(folder), complete=True)
    partial = os.path.join(plan.output_dir, PARTIAL_NAME)
    if os.path.exists(partial):
        os.unlink(partial)
    skipped = sum(len(r['skipped']) for r in records.values())
    log(f"manifest: {path} ({sum(r['bytes'] for r in records.values()) / 2 ** 30:.2f} GiB, "
        f"{skipped} bad sample(s) left out)")
    return path


def verify_shards(manifest_path: str, log: Callable[[str], None] = print) -> List[str]:
    """Check every shard of a finished manifest (local files) against its size and checksums; the
    problems found, one line per shard ('' list: all good)."""
    with open(manifest_path) as f:
        meta = json.load(f)
    problems = []
    for rec in meta['shards']:
        path = os.path.join(os.path.dirname(os.path.abspath(manifest_path)), rec['name'])
        if not os.path.exists(path):
            problems.append(f"{rec['name']}: missing ('{path}')")
            continue
        got = {'bytes': os.path.getsize(path), **file_checksums(path)}
        bad = [f"{k} {got[k]} (manifest: {rec[k]})" for k in ('bytes', 'sha256', 'crc32', 'xxh3')
               if k in rec and k in got and got[k] != rec[k]]
        if bad:
            problems.append(f"{rec['name']}: " + ', '.join(bad))
    log(f"{len(meta['shards']) - len(problems)} of {len(meta['shards'])} shards match '{manifest_path}'"
        + ''.join(f'\n  {p}' for p in problems))
    return problems
