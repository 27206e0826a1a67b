"""utils.checkpoint: atomic writes, keep_last, auto-resume choice, safe loading, mismatch reports."""
import argparse
import io
import os
import pickle

import pytest
import torch
import torch.nn as nn

import utils.checkpoint as ckpt
from utils.checkpoint import (CheckpointError, atomic_open, atomic_save, find_resume_checkpoint,
                              load_checkpoint, load_model_state, resolve_resume, save_checkpoint,
                              state_dict_mismatch_report)


def test_atomic_save_failure_half_way_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    atomic_save({'w': torch.arange(4.0)}, path)
    real_save = torch.save
    written = {}

    def save_half_then_fail(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        written['bytes'] = os.path.getsize(f.name)
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(ckpt.torch, 'save', save_half_then_fail)
    with pytest.raises(OSError, match='No space left'):
        atomic_save({'w': torch.zeros(100_000)}, path)
    monkeypatch.undo()
    assert written['bytes'] > 200_000  # the failure really happened half-way through a large write
    assert torch.equal(load_checkpoint(path)['w'], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint-last.pth']  # no temp left behind


def test_atomic_open_failure_at_fsync_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'labels.txt'
    with atomic_open(path, 'w') as f:
        f.write('old')

    def full_disk(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(ckpt.os, 'fsync', full_disk)
    with pytest.raises(OSError):
        with atomic_open(path, 'w') as f:
            f.write('new content')
    assert path.read_text() == 'old'
    assert [p.name for p in tmp_path.iterdir()] == ['labels.txt']


def test_atomic_open_rejects_read_mode(tmp_path):
    with pytest.raises(ValueError, match="must contain 'w'"):
        with atomic_open(tmp_path / 'x', 'rb'):
            pass


def test_save_checkpoint_writes_tagged_and_last(tmp_path):
    state = {'model': {'w': torch.ones(2)}, 'epoch': 3, 'args': {'lr': 0.1}}
    path = save_checkpoint(tmp_path, 3, state)
    assert path == tmp_path / 'checkpoint-3.pth'
    last = load_checkpoint(tmp_path / 'checkpoint-last.pth')
    assert last['epoch'] == 3 and torch.equal(last['model']['w'], torch.ones(2))
    save_checkpoint(tmp_path, 4, {**state, 'epoch': 4})
    assert load_checkpoint(tmp_path / 'checkpoint-last.pth')['epoch'] == 4
    save_checkpoint(tmp_path, 'best', {**state, 'epoch': 2})  # best does not move "last"
    assert load_checkpoint(tmp_path / 'checkpoint-last.pth')['epoch'] == 4
    assert load_checkpoint(tmp_path / 'checkpoint-best.pth')['epoch'] == 2
    save_checkpoint(tmp_path, 'last', {**state, 'epoch': 5})  # mid-epoch save writes last directly
    assert load_checkpoint(tmp_path / 'checkpoint-last.pth')['epoch'] == 5
    assert load_checkpoint(tmp_path / 'checkpoint-4.pth')['epoch'] == 4


def test_keep_last(tmp_path):
    for epoch in range(6):
        save_checkpoint(tmp_path, epoch, {'epoch': epoch}, keep_last=2)
    save_checkpoint(tmp_path, 'best', {'epoch': 1}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ['checkpoint-4.pth', 'checkpoint-5.pth', 'checkpoint-best.pth', 'checkpoint-last.pth']
    assert load_checkpoint(tmp_path / 'checkpoint-last.pth')['epoch'] == 5


def test_find_resume_checkpoint(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    assert find_resume_checkpoint('') is None
    for epoch in (2, 10, 9):
        atomic_save({'epoch': epoch}, tmp_path / f'checkpoint-{epoch}.pth')
    atomic_save({'epoch': 99}, tmp_path / 'checkpoint-best.pth')
    assert find_resume_checkpoint(tmp_path) == tmp_path / 'checkpoint-10.pth'  # numeric, not lexical
    save_checkpoint(tmp_path, 11, {'epoch': 11})
    assert find_resume_checkpoint(tmp_path) == tmp_path / 'checkpoint-last.pth'
    (tmp_path / 'checkpoint-11.pth').unlink()  # dangling "last" link is ignored
    if (tmp_path / 'checkpoint-last.pth').is_symlink():
        assert find_resume_checkpoint(tmp_path) == tmp_path / 'checkpoint-10.pth'


def test_resolve_resume(tmp_path):
    save_checkpoint(tmp_path, 1, {'epoch': 1})
    ns = argparse.Namespace
    assert resolve_resume(ns(resume='x.pth', auto_resume=True, output_dir=str(tmp_path))) == 'x.pth'
    assert resolve_resume(ns(resume='', auto_resume=True, output_dir=str(tmp_path))) == str(
        tmp_path / 'checkpoint-last.pth')
    assert resolve_resume(ns(resume='', auto_resume=False, output_dir=str(tmp_path))) is None
    assert resolve_resume(ns(resume='', auto_resume=True, output_dir='')) is None


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': {'w': torch.ones(1)}, 'extra': Evil(marker)}, tmp_path / 'evil.pth')
    with open(tmp_path / 'evil_legacy.pth', 'wb') as f:
        pickle.dump({'extra': Evil(marker)}, f, protocol=2)
    for name in ('evil.pth', 'evil_legacy.pth'):
        with pytest.raises(CheckpointError, match=f'refusing to load checkpoint .*{name}'):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()
    # Sanity: the payload does run when unpickled without protection.
    with open(tmp_path / 'evil_legacy.pth', 'rb') as f:
        pickle.load(f)
    assert marker.exists()


def test_published_namespace_args_load_as_dict(tmp_path):
    torch.save({'model': {'w': torch.ones(2)}, 'epoch': 7,
                'args': argparse.Namespace(lr=0.1, in_domains='rgb-depth')}, tmp_path / 'pub.pth')
    obj = load_checkpoint(tmp_path / 'pub.pth')
    assert obj['args'] == {'lr': 0.1, 'in_domains': 'rgb-depth'} and obj['epoch'] == 7


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint file not found: .*missing.pth'):
        load_checkpoint(tmp_path / 'missing.pth')
    atomic_save({'w': torch.ones(1000)}, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'trunc.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='cannot read checkpoint .*trunc.pth'):
        load_checkpoint(tmp_path / 'trunc.pth')
    (tmp_path / 'bad.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(CheckpointError, match='cannot read safetensors checkpoint .*bad.safetensors'):
        load_checkpoint(tmp_path / 'bad.safetensors')


def test_safetensors_load(tmp_path):
    from safetensors.torch import save_file
    sd = {'encoder.0.weight': torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
          'global_tokens': torch.zeros(1, 1, 4)}
    save_file(sd, str(tmp_path / 'w.safetensors'))
    out = load_checkpoint(tmp_path / 'w.safetensors')
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


class TinyAdapters(nn.Module):
    def __init__(self, patch=16, grid=4, classes=10, sem_classes=133, dim=8):
        super().__init__()
        self.input_adapters = nn.ModuleDict({'rgb': nn.Module(), 'semseg': nn.Module()})
        self.input_adapters.rgb.proj = nn.Conv2d(3, dim, patch, patch)
        self.input_adapters.rgb.pos_emb = nn.Parameter(torch.zeros(1, dim, grid, grid))
        self.input_adapters.semseg.class_emb = nn.Embedding(sem_classes, 4)
        self.output_adapters = nn.ModuleDict({'cls': nn.Module()})
        self.output_adapters.cls.head = nn.Linear(dim, classes)


def test_mismatch_report_names_key_shapes_and_cause():
    model = TinyAdapters()
    assert state_dict_mismatch_report(model, model.state_dict()) == ''
    other = TinyAdapters(patch=8, grid=7, classes=5, sem_classes=134).state_dict()
    report = state_dict_mismatch_report(model, other).splitlines()
    by_key = {line.split("'")[1]: line for line in report}
    assert by_key['input_adapters.rgb.pos_emb'] == (
        "shape mismatch for 'input_adapters.rgb.pos_emb': checkpoint [1, 8, 7, 7] vs model [1, 8, 4, 4]; "
        'likely cause: other image size or patch size: position embedding 7x7 grid in the checkpoint vs '
        '4x4 grid in the model (interpolate it when fine-tuning)')
    assert 'likely cause: other patch size: 8x8 kernel in the checkpoint vs 16x16' in by_key[
        'input_adapters.rgb.proj.weight']
    assert 'checkpoint [134, 4] vs model [133, 4]; likely cause: other number of classes (134 vs 133 rows)' in by_key[
        'input_adapters.semseg.class_emb.weight']
    assert 'likely cause: other number of classes (5 vs 10)' in by_key['output_adapters.cls.head.weight']
    out_proj = state_dict_mismatch_report({'output_adapters.semseg.out_proj.weight': torch.zeros(2128, 256)},
                                          {'output_adapters.semseg.out_proj.weight': torch.zeros(2400, 256)})
    assert 'other number of output channels/classes or other patch size (2400 vs 2128' in out_proj


def test_mismatch_report_missing_and_unexpected():
    model = TinyAdapters()
    sd = dict(model.state_dict())
    sd.pop('output_adapters.cls.head.bias')
    sd['decoder.extra'] = torch.zeros(1)
    report = state_dict_mismatch_report(model, sd)
    assert "1 key(s) missing in checkpoint: output_adapters.cls.head.bias" in report
    assert "1 key(s) unexpected in checkpoint: decoder.extra" in report


def test_load_model_state(tmp_path):
    torch.manual_seed(0)
    src, dst = TinyAdapters(), TinyAdapters()
    nn.init.normal_(src.output_adapters.cls.head.weight)
    load_model_state(dst, src.state_dict())
    assert torch.equal(dst.output_adapters.cls.head.weight, src.output_adapters.cls.head.weight)
    with pytest.raises(CheckpointError, match="does not fit TinyAdapters:\nshape mismatch for 'output_adapters.cls.head.weight'"):
        load_model_state(dst, TinyAdapters(classes=3).state_dict(), strict=False)
    partial = {k: v for k, v in src.state_dict().items() if 'head' not in k}
    with pytest.raises(CheckpointError, match='missing in checkpoint'):
        load_model_state(dst, partial)
    missing, unexpected = load_model_state(dst, partial, strict=False)
    assert missing == ['output_adapters.cls.head.weight', 'output_adapters.cls.head.bias'] and unexpected == []
