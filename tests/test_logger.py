"""utils.logger: smoothed statistics without per-step sync, progress lines, log.txt JSON lines, W&B offline."""
import argparse

from utils.config.job import WandbConfig
import json
import math
import re
import time

import pytest
import torch

import utils.logger as logger_mod
from utils.logger import JsonLogger, MetricLogger, SmoothedValue, WandbLogger, append_log_txt


def test_smoothed_value_statistics():
    m = SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 6.0, 4.0]:
        m.update(v)
    assert m.value == 4.0 and m.max == 6.0 and m.median == 4.0
    assert m.avg == pytest.approx(4.0)                 # window [2, 6, 4]
    assert m.global_avg == pytest.approx(13.0 / 4)
    m.update(10.0, n=4)
    assert m.count == 8 and m.total == pytest.approx(53.0)
    assert str(m) == f'6.0000 ({53 / 8:.4f})'          # median of [6, 4, 10]
    assert math.isnan(SmoothedValue().global_avg)


def test_tensor_updates_do_not_synchronise(monkeypatch):
    m = SmoothedValue(window_size=2)

    def no_sync(*a, **k):
        raise AssertionError('host sync during update')

    with monkeypatch.context() as mp:
        for name in ('item', 'tolist', '__float__', 'cpu'):
            mp.setattr(torch.Tensor, name, no_sync)
        for v in [1.0, 2.0, 3.0]:
            m.update(torch.tensor(v, requires_grad=True) * 1)   # also detaches
        m.update(5.0)
    assert isinstance(m.deque[0], torch.Tensor)
    assert m.global_avg == pytest.approx(11.0 / 4) and m.count == 4
    assert list(m.deque) == [3.0, 5.0]                 # converted once, on read
    with pytest.raises(ValueError, match='scalars'):
        m.update(torch.ones(2))


def test_metric_logger_line_format():
    lines = []
    ml = MetricLogger(printer=lines.append)
    losses = [1.0, 3.0, 2.0, 5.0, 4.0]
    for i, _ in enumerate(ml.log_every(range(5), print_freq=2, header='Epoch: [0]', batch_size=8)):
        ml.update(loss=torch.tensor(losses[i]), lr=1e-4 * (i + 1), grad_norm=None)
    assert len(lines) == 4                              # steps 0, 2, 4 and the total line
    pattern = (r'Epoch: \[0\] \[2/5\]  eta: \d+:\d\d:\d\d  loss: 2\.0000 \(2\.0000\)  lr: 3\.000e-04  '
               r'img/s: [\d.]+  time: [\d.]+  data: [\d.]+$')
    assert re.match(pattern, lines[1]), lines[1]
    assert lines[2].startswith('Epoch: [0] [4/5]') and 'loss: 3.0000 (3.0000)' in lines[2]
    assert 'max mem' not in lines[2]                    # CPU run
    assert re.match(r'Epoch: \[0\] Total time: \d+:\d\d:\d\d \([\d.]+ s / it\)$', lines[3])
    assert ml.global_avg() == pytest.approx({'loss': 3.0, 'lr': 3e-4})
    assert 'grad_norm' not in ml.meters
    assert ml.loss.count == 5
    assert str(ml).startswith('loss: 3.0000 (3.0000)')


def test_metric_logger_single_process_sync_is_noop():
    ml = MetricLogger()
    ml.update(loss=2.0)
    ml.synchronize_between_processes()
    assert ml.global_avg() == {'loss': 2.0}
    with pytest.raises(AttributeError, match="no meter or attribute 'nope'"):
        ml.nope


def test_append_log_txt_json_lines(tmp_path):
    append_log_txt(tmp_path, {'[Epoch] loss': torch.tensor(0.5), 'epoch': 0, 'bad': float('nan')})
    JsonLogger(tmp_path).log({'[Epoch] loss': 0.25, 'epoch': 1, 'sizes': (1, 2)})
    lines = (tmp_path / 'log.txt').read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {'[Epoch] loss': 0.5, 'epoch': 0, 'bad': 'nan'},
        {'[Epoch] loss': 0.25, 'epoch': 1, 'sizes': [1, 2]}]
    assert append_log_txt('', {'a': 1}) is None


def test_append_log_txt_only_on_main_process(tmp_path, monkeypatch):
    monkeypatch.setattr(logger_mod, 'is_main_process', lambda: False)
    assert append_log_txt(tmp_path, {'a': 1}) is None
    assert not (tmp_path / 'log.txt').exists()


def test_wandb_disabled_is_a_noop():
    w = WandbLogger(WandbConfig(log_wandb=False))
    assert not w.enabled and w.run is None
    w.log({'loss': 1.0}, step=1)
    w.log_image('x', 'missing.png')
    w.finish()


def test_wandb_offline_smoke(tmp_path, monkeypatch):
    pytest.importorskip('wandb')
    from PIL import Image

    monkeypatch.setenv('WANDB_MODE', 'offline')
    monkeypatch.setenv('WANDB_DIR', str(tmp_path))
    monkeypatch.setenv('WANDB_SILENT', 'true')
    img = tmp_path / 'grid.png'
    Image.new('RGB', (8, 8), (255, 0, 0)).save(img)
    settings = WandbConfig(log_wandb=True, wandb_project='multimae-test', wandb_entity=None,
                           wandb_run_name='smoke', wandb_group='')
    w = WandbLogger(settings, config={'opt_betas': (0.9, 0.95)}, output_dir=str(tmp_path / 'out'))
    assert w.enabled
    assert dict(w.run.config)['opt_betas'] == [0.9, 0.95]
    w.log({'train/loss': torch.tensor(0.75), 'lr': 1e-4}, step=3)
    w.log_image('recon', img, step=3, caption='epoch 0')
    w.finish()
    runs = list((tmp_path / 'wandb').glob('offline-run-*'))
    assert len(runs) == 1
    record = next(runs[0].glob('*.wandb'))
    deadline = time.time() + 10  # the wandb service process may still be flushing after finish()
    while not (b'train/loss' in record.read_bytes() and b'recon' in record.read_bytes()) and time.time() < deadline:
        time.sleep(0.1)
    data = record.read_bytes()
    assert b'train/loss' in data and b'recon' in data
