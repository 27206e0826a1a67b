"""Tar shards: make_shards round trip, manifest, resumable writing, streaming split/resume, bad data."""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tools.lib.shard_writer import PARTIAL_NAME, ShardPlan, file_sha256, make_shards, resolve_encodings
from utils.data.datasets import BadSampleError, MultiModalImageFolder, decode_file
from utils.data.shard_format import decode_member, is_shard_source, load_manifest, sibling_url
from utils.data.shards import ShardLoader, ShardStream, shard_samples
from utils.data.transforms import PretrainTransform
from utils.pretrain.multimae import PerSampleSeed

REPO = Path(__file__).resolve().parents[1]
MODS = ['rgb', 'depth', 'semseg']
N = 32  # samples of the synthetic_root fixture's train split


def _plan(root, out, encoding, **kw):
    return ShardPlan(str(root / 'train'), str(out), MODS, resolve_encodings(MODS, encoding, {}), shard_size=5, **kw)


@pytest.fixture(scope='module')
def shards(synthetic_root, tmp_path_factory):
    out = {}
    for enc in ('orig', 'fast'):
        d = tmp_path_factory.mktemp(f'shards_{enc}')
        out[enc] = make_shards(_plan(synthetic_root, d, enc), log=lambda s: None)
    return out


def _members(tar_path):
    with tarfile.open(tar_path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def test_round_trip_and_manifest(synthetic_root, shards):
    folder = MultiModalImageFolder(str(synthetic_root / 'train'), MODS)
    for enc, manifest in shards.items():
        meta = json.loads(Path(manifest).read_text())
        assert meta['complete'] and meta['num_samples'] == N and len(meta['shards']) == 7  # ceil(32 / 5)
        indices = [i for s in meta['shards'] for i in s['indices']]
        assert sorted(indices) == list(range(N))
        for rec in meta['shards']:
            path = os.path.join(os.path.dirname(manifest), rec['name'])
            assert file_sha256(path) == rec['sha256'] and os.path.getsize(path) == rec['bytes']
            members = _members(path)
            for i in rec['indices']:
                paths = folder.samples_paths(i)
                for m in MODS:
                    (name,) = [k for k in members if k.startswith(f'{i:09d}.{m}.')]
                    if enc == 'orig':  # the original file, byte for byte
                        assert members[name] == Path(paths[m]).read_bytes()
                    got = decode_member(members[name], m, name.split('.', 1)[1])
                    want = decode_file(paths[m], m)
                    assert got.dtype == want.dtype and torch.equal(got, want)
                assert int(members[f'{i:09d}.cls']) == folder.samples[i][1]
    fast = _members(os.path.join(os.path.dirname(shards['fast']), 'train-000000.tar'))
    assert any(k.endswith('.depth.npy') for k in fast) and any(k.endswith('.semseg.npy.zlib') for k in fast)


def test_interrupted_then_resumed(synthetic_root, shards, tmp_path):
    plan = _plan(synthetic_root, tmp_path, 'fast')
    assert make_shards(plan, log=lambda s: None, max_shards=3).endswith(PARTIAL_NAME)
    assert not (tmp_path / 'manifest.json').exists()
    first = {p.name: p.stat().st_ino for p in tmp_path.glob('*.tar')}
    assert len(first) == 3
    broken = sorted(first)[2]
    (tmp_path / broken).write_bytes(b'garbage')  # a shard damaged after it was written is rewritten
    manifest = make_shards(plan, num_workers=2, log=lambda s: None)  # resumed in 2 processes
    after = {p.name: p.stat().st_ino for p in tmp_path.glob('*.tar')}
    assert all(after[n] == first[n] for n in sorted(first)[:2])  # finished shards were not rewritten
    assert after[broken] != first[broken]
    ref = json.loads(Path(shards['fast']).read_text())['shards']
    got = json.loads(Path(manifest).read_text())['shards']
    assert [s['sha256'] for s in got] == [s['sha256'] for s in ref]  # same bytes as an uninterrupted run
    other = tmp_path / 'other'
    make_shards(_plan(synthetic_root, other, 'fast'), log=lambda s: None, max_shards=1)
    with pytest.raises(ValueError, match='other arguments'):  # resuming with another shard size is refused
        make_shards(ShardPlan(**{**_plan(synthetic_root, other, 'fast').__dict__, 'shard_size': 4}), log=print)


def test_sources_and_urls(shards):
    m = shards['orig']
    d = os.path.dirname(m)
    assert is_shard_source(m) and is_shard_source(f'{d}/train-{{000000..000003}}.tar')
    assert is_shard_source('pipe:aws s3 cp s3://b/x/manifest.json -') and not is_shard_source(d)
    assert sibling_url('pipe:aws s3 cp s3://b/x/manifest.json -', 'a.tar') == 'pipe:aws s3 cp s3://b/x/a.tar -'
    sub = load_manifest(f'{d}/train-{{000001..000002}}.tar')
    assert [s.name for s in sub.shards] == ['train-000001.tar', 'train-000002.tar'] and sub.num_samples == 10
    piped = load_manifest(f'pipe:cat {m}')
    assert piped.shards[0].url == f"pipe:cat {os.path.join(d, 'train-000000.tar')}"
    batches = list(ShardStream(f'pipe:cat {m}', MODS, None, 4, shuffle_buffer=0))
    assert sorted(i for b in batches for i in b.indices) == list(range(N))


@pytest.mark.parametrize('enc', ['orig', 'fast'])
def test_same_tensors_as_folder_pipeline(synthetic_root, shards, enc):
    t = PretrainTransform(16, compact=True)
    stream = ShardStream(shards[enc], MODS, t, batch_size=4, seed=3)
    folder = PerSampleSeed(MultiModalImageFolder(str(synthetic_root / 'train'), MODS, transform=t), 3)
    stream.set_epoch(2)
    folder.set_epoch(2)
    batches = list(DataLoader(stream, batch_size=None, num_workers=0))
    assert len(batches) == N // 4
    for b in batches[:3]:
        for j, i in enumerate(b.indices):
            x, y = folder[i]
            assert int(b.data[1][j]) == y
            for k in MODS:
                assert b.data[0][k][j].dtype == x[k].dtype and torch.equal(b.data[0][k][j], x[k]), (enc, k, i)


def _epoch(stream, workers, skip=0):
    loader = ShardLoader(stream, num_workers=workers)
    loader.batch_sampler.skip_next(skip)
    return [b.indices for b in loader]


def test_split_shuffle_and_resume(shards):
    s = ShardStream(shards['fast'], MODS, None, batch_size=3, seed=1, rank=1, world_size=2)
    assert s.num_batches == 5 and len(ShardLoader(s)) == 5
    e0 = _epoch(s, 2)
    assert e0 == _epoch(s, 2)  # deterministic
    s.set_epoch(1)
    assert _epoch(s, 2) != e0  # reshuffled per epoch
    s.set_epoch(0)
    assert _epoch(s, 2, skip=3) == e0[3:]  # mid-epoch resume: the rest, nothing repeated or skipped
    assert _epoch(s, 2, skip=2) == e0[2:] and _epoch(s, 3, skip=4) == _epoch(s, 3)[4:]
    assert _epoch(s, 0, skip=2) == _epoch(s, 0)[2:]


DIST_WORKER = r'''
import argparse, json, sys
import torch.distributed as dist
from utils.dist import get_rank
from utils.pretrain.multimae import build_pretrain_loader
dist.init_process_group('gloo')
ns = argparse.Namespace(in_domains='rgb-depth', out_domains='rgb-depth-semseg', data_path=sys.argv[1], input_size=16,
                        hflip=0.5, train_interpolation='bicubic', imagenet_default_mean_and_std=True, seed=0,
                        batch_size=4, num_workers=2, pin_mem=False)
dataset, loader = build_pretrain_loader(ns)
out = {}
for epoch in (0, 1):
    dataset.set_epoch(epoch)
    out[epoch] = [i for b in loader for i in b.indices]
gathered = [None, None]
dist.all_gather_object(gathered, out)
if get_rank() == 0:
    json.dump({'batches': len(loader), 'gathered': gathered}, open(sys.argv[2], 'w'))
dist.destroy_process_group()
'''


def test_exactly_once_two_ranks_two_workers(shards, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(DIST_WORKER)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           str(script), shards['fast'], str(tmp_path / 'out.json')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / 'out.json').read_text())
    assert res['batches'] == 4  # 32 samples / 2 ranks / batch 4
    for epoch in ('0', '1'):
        seen = res['gathered'][0][epoch] + res['gathered'][1][epoch]
        assert sorted(seen) == list(range(N))  # every sample exactly once per epoch
    assert res['gathered'][0]['0'] != res['gathered'][0]['1']


def _rewrite(src, dst, drop=None, truncate=None):
    data = Path(src).read_bytes()
    if drop:
        with tarfile.open(src) as t, tarfile.open(dst, 'w') as out:
            for m in t.getmembers():
                if m.name != drop:
                    out.addfile(m, t.extractfile(m))
        return
    Path(dst).write_bytes(data[:int(len(data) * truncate)])  # truncate: the fraction kept


def _broken_copy(shards, tmp_path, **kw):
    src_dir = Path(shards['fast']).parent
    meta = json.loads(Path(shards['fast']).read_text())
    for rec in meta['shards']:
        (tmp_path / rec['name']).write_bytes((src_dir / rec['name']).read_bytes())
    (tmp_path / 'manifest.json').write_text(json.dumps(meta))
    first = meta['shards'][0]
    _rewrite(src_dir / first['name'], tmp_path / first['name'], **kw)
    return str(tmp_path / 'manifest.json'), first


def test_truncated_shard(shards, tmp_path, capsys):
    manifest, first = _broken_copy(shards, tmp_path, truncate=0.5)
    with pytest.raises(BadSampleError, match=r"train-000000\.tar' is missing, truncated or corrupt \(after key"):
        list(ShardStream(manifest, MODS, None, 4, shuffle_buffer=0))
    batches = list(ShardStream(manifest, MODS, None, 4, shuffle_buffer=0, on_bad_sample='skip'))
    bad = [m for b in batches for m in b.bad]
    assert len(batches) == N // 4 and all(len(b.indices) == 4 for b in batches)  # every batch still full
    used = {i for b in batches for i in b.indices}
    lost = len(set(first['indices']) - used)
    assert lost >= 1 and len(bad) == lost and 'train-000000.tar' in bad[0]
    assert capsys.readouterr().err.count('[bad sample] skipped') == len(bad)


def test_missing_modality_and_checksum(shards, tmp_path):
    manifest, first = _broken_copy(shards, tmp_path, drop=f"{first_key(shards)}.depth.npy")
    with pytest.raises(BadSampleError, match=rf"key '{first_key(shards)}': modality 'depth' is missing"):
        list(ShardStream(manifest, MODS, None, 4, shuffle_buffer=0, verify=False))
    batches = list(ShardStream(manifest, MODS, None, 4, shuffle_buffer=0, on_bad_sample='skip', verify=False))
    assert sum(len(b.bad) for b in batches) == 1
    assert int(first_key(shards)) not in {i for b in batches for i in b.indices}
    with pytest.raises(BadSampleError, match=r"train-000000\.tar': (xxh3|crc32) .* does not match"):
        list(ShardStream(manifest, ['rgb'], None, 4, shuffle_buffer=0))  # rgb alone decodes; the hash does not match


def test_verify_tool_and_checksum_fallbacks(shards, tmp_path, capsys, monkeypatch):
    """make_shards --verify checks size and checksums of every shard; the loader checks xxh3, else CRC-32 (no
    xxhash package), else sha256 (a manifest written before the others were recorded)."""
    import utils.data.shards as shards_module
    from tools.make_shards import main
    from utils.data.shards import stream_checksum
    assert main(['--verify', shards['fast']]) == shards['fast']
    assert '7 of 7 shards match' in capsys.readouterr().out
    manifest, first = _broken_copy(shards, tmp_path, truncate=0.9)
    with pytest.raises(SystemExit) as exc:
        main(['--verify', manifest])
    out = capsys.readouterr().out
    assert exc.value.code == 1 and '6 of 7 shards match' in out and f"{first['name']}: bytes " in out
    meta = json.loads(Path(manifest).read_text())
    assert all(stream_checksum(s)[0] == 'xxh3' for s in load_manifest(shards['fast']).shards)
    monkeypatch.setattr(shards_module, 'xxhash', None)
    assert all(stream_checksum(s)[0] == 'crc32' for s in load_manifest(shards['fast']).shards)
    for rec in meta['shards']:
        rec.pop('crc32')
    Path(manifest).write_text(json.dumps(meta))
    shutil.copyfile(Path(shards['fast']).parent / first['name'], tmp_path / first['name'])
    with open(tmp_path / first['name'], 'r+b') as f:  # one byte of the tar padding: every sample still decodes
        f.seek(-1, os.SEEK_END)
        f.write(b'\x01')
    with pytest.raises(BadSampleError, match=r"train-000000\.tar': sha256 .* does not match"):
        list(ShardStream(manifest, MODS, None, 4, shuffle_buffer=0))


def first_key(shards):
    return f"{json.loads(Path(shards['fast']).read_text())['shards'][0]['indices'][0]:09d}"


def test_pretrain_loader_and_vis_samples(shards):
    from utils.pretrain.multimae import build_pretrain_loader
    ns = argparse.Namespace(in_domains='rgb-depth', out_domains='rgb-depth-semseg', data_path=shards['orig'],
                            input_size=16, hflip=0.5, train_interpolation='bicubic', imagenet_default_mean_and_std=True,
                            seed=0, batch_size=8, num_workers=0, pin_mem=False)
    dataset, loader = build_pretrain_loader(ns)
    assert len(dataset) == N and len(loader) == 4 and dataset.modalities == MODS
    x, y = next(iter(loader)).data
    assert x['rgb'].shape == (8, 3, 16, 16) and x['rgb'].dtype == torch.uint8 and x['semseg'].shape == (8, 4, 4)
    pics = shard_samples(shards['orig'], MODS, PretrainTransform(16, hflip=0.0), 6)
    assert len(pics) == 6 and pics[0]['rgb'].dtype == torch.float32


def test_finetune_train_split(shards):
    from utils.config.job import RuntimeConfig
    from utils.data.shards import train_split_stream
    from utils.finetune.common import build_train_loader
    stream = train_split_stream(shards['orig'], 'train', ['rgb', 'depth'], None, batch_size=8, seed=0)
    loader = build_train_loader(stream, 8, RuntimeConfig(seed=0, num_workers=1, pin_mem=False))
    assert isinstance(loader, ShardLoader) and len(loader) == 4
    assert sorted(i for b in loader for i in b.indices) == list(range(N))
    with pytest.raises(ValueError, match='training split only'):
        train_split_stream(shards['orig'], 'val', ['rgb'], None, batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"modality\(ies\) \['mask_valid'\] are not in them"):
        ShardStream(shards['orig'], ['rgb', 'mask_valid'], None, 4)


@pytest.mark.slow
def test_pretraining_from_shards_resumes_mid_epoch_exactly(shards, tmp_path, monkeypatch):
    """run_pretraining_multimae.py on shards with 2 loader workers, killed mid-epoch after a periodic
    checkpoint and resumed: the same parameters as an uninterrupted run."""
    import run_pretraining_multimae as script
    from utils.config import parse_args
    from utils.engine.trainer import Trainer
    from utils.pretrain.multimae import validate_pretrain_args

    tiny = ["--model", "pretrain_multimae_tiny", "--input_size", "16", "--patch_size", "8", "--num_encoded_tokens",
            "6", "--decoder_dim", "32", "--decoder_depth", "0", "--decoder_num_heads", "2", "--batch_size", "8",
            "--epochs", "2", "--warmup_epochs", "1", "--num_workers", "2", "--device", "cpu", "--save_vis_freq", "1",
            "--num_vis", "2", "--save_ckpt_freq", "1", "--deterministic", "--save_every_steps", "5",
            "--data_path", shards['fast']]

    def run(out):
        args = parse_args(script.get_args_parser(), [*tiny, "--output_dir", str(out)], validate=validate_pretrain_args,
                          exit_on_error=False)
        return script.main(args)

    run(tmp_path / "full")
    original, calls = Trainer._forward_backward, []

    def killed(self, batch, last_micro):
        calls.append(1)
        if len(calls) == 7:  # epoch 1, step 3 (4 steps per epoch); the last checkpoint is after step 5
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, last_micro)

    monkeypatch.setattr(Trainer, "_forward_backward", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split")
    monkeypatch.setattr(Trainer, "_forward_backward", original)
    trainer = run(tmp_path / "split")  # resumes at epoch 1, step 1: one batch of 2 workers already trained on
    assert (trainer.start_epoch, trainer.start_step) == (1, 1)
    a = torch.load(tmp_path / "full" / "checkpoint-1.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint-1.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "split" / "vis" / "reconstruction_e0001.png").is_file()


def test_failing_pipe_command_names_the_shard(shards, tmp_path):
    (tmp_path / 'manifest.json').write_text(Path(shards['fast']).read_text())  # the shards are not beside it
    with pytest.raises(BadSampleError, match=r"shard 'pipe:cat .*/train-\d{6}\.tar' is missing, truncated or "
                                             r"corrupt \(before its first sample.*exit 1"):  # cat's exit status
        list(ShardStream(f"pipe:cat {tmp_path / 'manifest.json'}", MODS, None, 4, shuffle_buffer=0))


def test_cls_finetuning_trains_from_shards(synthetic_root, shards):
    """run_finetuning_cls.py's training split from shards: batches (images, labels) of the folder's
    transform (timm, on PIL images), labels and pixels as from the ImageFolder, the same every pass."""
    import random

    from PIL import Image
    from torchvision.datasets import ImageFolder

    from run_finetuning_cls import get_args_parser
    from utils.config import parse_args
    from utils.config.job import RuntimeConfig
    from utils.data.shards import sample_seed
    from utils.finetune.cls_data import ShardRgbTransform, build_cls_dataset, build_cls_transform_from_args
    from utils.finetune.common import build_train_loader

    classes = load_manifest(shards['orig']).classes
    argv = ['--data_path', shards['orig'], '--data_set', 'image_folder', '--nb_classes', str(len(classes)),
            '--input_size', '16', '--batch_size', '8', '--num_workers', '0', '--device', 'cpu', '--seed', '5']
    cfg = parse_args(get_args_parser(), argv, exit_on_error=False)
    ds = build_cls_dataset(cfg, True)
    loader = build_train_loader(ds, 8, RuntimeConfig(seed=5, num_workers=0, pin_mem=False))
    state = random.getstate()
    first, again = list(loader), list(loader)
    assert random.getstate() == state  # the global RNGs the augmentations use are put back
    assert len(first) == N // 8 and sorted(i for b in first for i in b.indices) == list(range(N))
    folder = ImageFolder(str(synthetic_root / 'train' / 'rgb'))
    assert folder.classes == classes
    x, y = first[0].data
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and torch.equal(x, again[0].data[0])
    wrap = ShardRgbTransform(build_cls_transform_from_args(cfg, True))
    for j, i in enumerate(first[0].indices[:3]):
        path, label = folder.samples[i]
        assert int(y[j]) == label
        with Image.open(path) as im:
            pixels = torch.from_numpy(np.asarray(im.convert('RGB')).copy()).permute(2, 0, 1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(5, 0, i))
            assert torch.equal(wrap({'rgb': pixels}), x[j])  # the folder's image through the same transform
    with pytest.raises(ValueError, match='--data_set CIFAR reads the CIFAR-100 files'):
        build_cls_dataset(parse_args(get_args_parser(), argv + ['--data_set', 'CIFAR'], exit_on_error=False), True)
