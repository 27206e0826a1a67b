"""utils.dist: launcher detection, single-process helpers, a real 2-process gloo run (torchrun and SLURM)."""
import argparse
import builtins
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.dist as dist_utils
from utils.dist import (all_gather_object, all_reduce_mean, all_reduce_sum, barrier, destroy_distributed,
                        detect_launch_env, get_rank, get_world_size, init_distributed, is_main_process,
                        resolve_device, seed_everything, set_deterministic, setup_for_distributed)

REPO = Path(__file__).resolve().parents[1]


def ns(**kw):
    base = dict(device='cpu', dist_url='env://', dist_on_itp=False, dist_backend=None, local_rank=-1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_detect_torchrun_env():
    env = {'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'}
    assert tuple(detect_launch_env(ns(), env)) == (3, 8, 1, 'torchrun')


def test_detect_slurm_reads_world_size():
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '8', 'SLURM_LOCALID': '1'}
    assert tuple(detect_launch_env(ns(), env)) == (5, 8, 1, 'slurm')
    env['SLURM_STEP_NUM_TASKS'] = '6'  # the srun step, not the allocation
    assert detect_launch_env(ns(), env).world_size == 6


def test_detect_openmpi_and_precedence():
    env = {'OMPI_COMM_WORLD_RANK': '2', 'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_LOCAL_RANK': '0',
           'RANK': '9', 'WORLD_SIZE': '16'}
    assert tuple(detect_launch_env(ns(dist_on_itp=True), env)) == (2, 4, 0, 'itp')
    assert tuple(detect_launch_env(ns(), env))[:2] == (9, 16)  # torchrun when --dist_on_itp is off
    with pytest.raises(RuntimeError, match='OMPI_COMM_WORLD_RANK is not set'):
        detect_launch_env(ns(dist_on_itp=True), {})
    with pytest.raises(RuntimeError, match="RANK='x' is not an integer"):
        detect_launch_env(ns(), {'RANK': 'x', 'WORLD_SIZE': '2'})


def test_detect_none_without_launcher():
    assert detect_launch_env(ns(), {}) is None


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID'):
        monkeypatch.delenv(var, raising=False)
    args = ns(world_size=4)
    try:
        ctx = init_distributed(args, 'cpu')
        assert ctx.device == torch.device('cpu')
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.backend) == (0, 1, 0, False, None)
        assert not torch.distributed.is_initialized()
        assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
        barrier()
        x = torch.tensor([1, 2, 3])
        assert torch.equal(all_reduce_sum(x), x)
        mean = all_reduce_mean(x)
        assert mean.dtype == torch.float64 and torch.equal(mean, x.double())
        assert all_gather_object({'a': 1}) == [{'a': 1}]
    finally:
        destroy_distributed()


def test_cuda_request_falls_back_to_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert resolve_device('cuda') == torch.device('cpu')
    assert "device 'cuda' requested but CUDA is not available; using cpu" in capsys.readouterr().err
    args = ns(device='cuda')
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('SLURM_PROCID', raising=False)
    try:
        assert init_distributed(args, 'cuda').device.type == 'cpu'
    finally:
        destroy_distributed()
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        resolve_device('gpu0')


def test_rank_print(capsys):
    try:
        setup_for_distributed(False)
        print('hidden')
        print('shown', force=True)
        setup_for_distributed(True)
        print('master')
    finally:
        destroy_distributed()
    assert capsys.readouterr().out == 'shown\nmaster\n'
    assert builtins.print is dist_utils._BUILTIN_PRINT  # destroy_distributed restores print


def test_seed_everything_seeds_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    assert seed_everything(5, rank=2) == 7
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(5, rank=3)
    assert draw() != a


def test_set_deterministic_toggles_torch_flags():
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1:]


WORKER = r'''
import argparse, json, sys, torch
from utils.dist import *
from utils.logger import MetricLogger
args = argparse.Namespace(device='cpu', dist_url='env://', dist_on_itp=False, dist_backend=None, local_rank=-1)
ctx = init_distributed(args, 'cpu')
r = get_rank()
mean = all_reduce_mean(torch.tensor([float(r), 10.0 * r + 1]))
total = all_reduce_sum(torch.tensor([r + 1], dtype=torch.int64))
ml = MetricLogger()
for v in range(r + 1):                     # rank 0 logs [0], rank 1 logs [1, 2] -> global mean 1.0
    ml.update(loss=torch.tensor(float(r + v)))
if r == 1:
    ml.update(only_rank1=torch.tensor(4.0))
ml.synchronize_between_processes()
gathered = all_gather_object({'rank': r})
print('silenced on rank 1')
out = dict(rank=r, world=ctx.world_size, distributed=ctx.distributed, backend=ctx.backend, gpu=ctx.local_rank,
           mean=mean.tolist(), total=total.tolist(), total_dtype=str(total.dtype), loss=ml.loss.global_avg,
           count=ml.loss.count, only=ml.only_rank1.global_avg, gathered=gathered)
with open(sys.argv[1] + f'.{r}.json', 'w') as f:
    json.dump(out, f)
destroy_distributed()
'''


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def check_results(prefix, launcher_world=2):
    results = [json.loads(Path(f'{prefix}.{r}.json').read_text()) for r in range(launcher_world)]
    for r, res in enumerate(results):
        assert res['rank'] == r and res['world'] == 2 and res['distributed'] and res['backend'] == 'gloo'
        assert res['gpu'] == r
        assert res['mean'] == [0.5, 6.0]
        assert res['total'] == [3] and res['total_dtype'] == 'torch.int64'
        assert res['loss'] == pytest.approx(1.0) and res['count'] == 3
        assert res['only'] == pytest.approx(4.0)
        assert res['gathered'] == [{'rank': 0}, {'rank': 1}]


def worker_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'OMPI_')) and k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS='1')
    return env


def test_two_process_gloo_with_torchrun(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           str(script), str(tmp_path / 'out')]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_results(tmp_path / 'out')
    assert 'silenced on rank 1' in proc.stdout and proc.stdout.count('silenced on rank 1') == 1


def test_two_process_gloo_with_slurm_env(tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    port = str(free_port())
    procs = []
    for r in range(2):
        env = worker_env()
        env.update(SLURM_PROCID=str(r), SLURM_NTASKS='2', SLURM_LOCALID=str(r),
                   SLURM_LAUNCH_NODE_IPADDR='127.0.0.1', MASTER_PORT=port)
        env.pop('MASTER_ADDR', None)
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / 'out')], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
    check_results(tmp_path / 'out')


def test_slurm_rendezvous_from_environment():
    launch = dist_utils.LaunchEnv(1, 4, 1, 'slurm')
    env = {'SLURM_LAUNCH_NODE_IPADDR': '10.0.0.7', 'SLURM_JOB_ID': '123456'}
    dist_utils._export_rendezvous(launch, env)
    assert env['MASTER_ADDR'] == '10.0.0.7' and env['MASTER_PORT'] == str(15000 + 123456 % 20000)
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK']) == ('1', '4', '1')
    env = {'MASTER_ADDR': 'node0', 'MASTER_PORT': '1234', 'SLURM_LAUNCH_NODE_IPADDR': '10.0.0.7'}
    dist_utils._export_rendezvous(launch, env)
    assert (env['MASTER_ADDR'], env['MASTER_PORT']) == ('node0', '1234')
    with pytest.raises(RuntimeError, match='set MASTER_ADDR'):
        dist_utils._export_rendezvous(launch, {})
    with pytest.raises(RuntimeError, match='itp launch: environment variable MASTER_ADDR is not set'):
        dist_utils._export_rendezvous(dist_utils.LaunchEnv(0, 2, 0, 'itp'), {})
