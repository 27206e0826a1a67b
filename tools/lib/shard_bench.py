"""Shard pipelines of ``tools/benchmark.py --mode data``: the training loader over tar shards of the benchmark
folder, with the original files (``shard-orig``), the fast encodings (``shard-fast``: raw 16-bit depth, deflated
label maps, JPEG) or everything array-like deflated (``shard-zlib``: depth too)."""
from __future__ import annotations

import os
import shutil
from argparse import Namespace
from typing import Any, Callable, Optional, Tuple

from tools.lib.shard_writer import ShardPlan, make_shards, resolve_encodings
from utils.data.shard_format import MANIFEST_NAME, load_manifest
from utils.data.shards import stream_checksum

__all__ = ['SHARD_PIPELINES', 'write_benchmark_shards', 'shard_loader']

SHARD_PIPELINES = ('shard-orig', 'shard-fast', 'shard-zlib')
MODALITIES = ['rgb', 'depth', 'semseg']


def write_benchmark_shards(root: str, encoding: str, shard_size: int = 64) -> str:
    """Shards of the benchmark folder ``root`` beside it (``<root>_shards_<encoding>/``), written once."""
    out = f'{os.path.normpath(root)}_shards_{encoding}'
    manifest = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(manifest) and stream_checksum(load_manifest(manifest).shards[0])[0] == 'sha256':
        shutil.rmtree(out)  # written before the manifest recorded fast checksums: the loader would check sha256
    if not os.path.exists(manifest):
        encodings = resolve_encodings(MODALITIES, 'fast', {'depth': 'zlib'}) if encoding == 'zlib' else \
            resolve_encodings(MODALITIES, encoding, {})
        plan = ShardPlan(root, out, MODALITIES, encodings, shard_size=shard_size)
        manifest = make_shards(plan, log=lambda s: None)
    return manifest


def shard_loader(pipeline: str, root: str, args: Namespace, workers: int) -> Tuple[Any, Optional[Callable]]:
    """The pre-training loader over shards (persistent workers, like the other timed pipelines) and the
    device-side finishing of its compact batches."""
    from utils.pretrain.multimae import build_pretrain_loader

    manifest = write_benchmark_shards(root, pipeline.split('-', 1)[1])
    ns = Namespace(in_domains='rgb-depth-semseg', out_domains='rgb-depth-semseg', data_path=manifest,
                   input_size=args.input_size, hflip=0.5, train_interpolation='bicubic',
                   imagenet_default_mean_and_std=True, seed=args.seed, batch_size=args.batch_size,
                   num_workers=workers, pin_mem=True)
    dataset, loader = build_pretrain_loader(ns)
    loader.persist()
    finish = dataset.transform.finish
    return loader, lambda batch: finish(batch.data)
