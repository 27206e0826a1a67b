"""Process groups, ranks, seeding and device choice for single-process, torchrun, SLURM and OpenMPI runs.

Typical script start::

    ctx = init_distributed(cfg.dist, cfg.runtime.device)   # rank, world size, local rank, device
    seed_everything(cfg.runtime.seed, ctx.rank)
    set_deterministic(cfg.runtime.deterministic)

Public API:
    resolve_device(name) -> torch.device             'cuda' without CUDA -> cpu with a one-line warning
    init_distributed(dist_cfg, device) -> DistContext  detects the launcher; single process = no group
    setup_for_distributed(is_master)                 print() only on rank 0 (``print(..., force=True)``)
    destroy_distributed()                            tear the process group down (if any)
    is_dist_avail_and_initialized() -> bool
    get_rank() -> int; get_world_size() -> int; is_main_process() -> bool; barrier()
    all_reduce_mean(tensor) -> Tensor                mean over ranks (float), on the tensor's device
    all_reduce_sum(tensor) -> Tensor                 sum over ranks, same dtype and device
    all_gather_object(obj) -> list                   one entry per rank
    seed_everything(seed, rank=0) -> int             python, numpy and torch seeded with seed + rank
    set_deterministic(enabled)                       deterministic algorithms / cudnn settings
    set_tf32(enabled)                                TF32 matmuls/convs (on for CUDA unless --no_tf32)
    ddp_find_unused_parameters(model, requested)     DDP's unused-parameter search only where needed
    collective_timeout_s() -> float                  the process group's timeout (``--dist_timeout``)
    describe_collective_failure(exc) -> CollectiveFailure | None   which ranks a failed collective waited for

Launchers, in order of precedence:
    ``--dist_on_itp``: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}, MASTER_ADDR/MASTER_PORT from the env.
    torchrun: RANK, WORLD_SIZE, LOCAL_RANK (MASTER_ADDR/PORT set by torchrun).
    SLURM (``srun``): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID; master
        address from MASTER_ADDR or SLURM_LAUNCH_NODE_IPADDR, port from MASTER_PORT or derived from
        SLURM_JOB_ID.
A world size of 1 never creates a process group. Backend: ``--dist_backend`` if set, else NCCL when
the device is CUDA and gloo otherwise (CPU runs, tests).

Timeouts: every collective of the process group gives up after ``--dist_timeout`` minutes (default 30,
torch's own default for gloo; NCCL's watchdog uses the same value). A rank that is stopped, hung or dead
then makes the others fail instead of blocking them; :func:`describe_collective_failure` asks the
rendezvous store which ranks are still there and names the missing ones.
"""
from __future__ import annotations

import builtins
import os
import random
import sys
import time
from datetime import timedelta
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    'resolve_device', 'init_distributed', 'DistContext', 'setup_for_distributed', 'destroy_distributed',
    'is_dist_avail_and_initialized', 'get_rank', 'get_world_size', 'is_main_process', 'barrier',
    'all_reduce_mean', 'all_reduce_sum', 'all_gather_object', 'seed_everything', 'set_deterministic',
    'LaunchEnv', 'detect_launch_env', 'local_device_index', 'set_tf32', 'ddp_find_unused_parameters',
    'collective_timeout_s', 'CollectiveFailure', 'describe_collective_failure',
]

_BUILTIN_PRINT = builtins.print
DEFAULT_TIMEOUT_MIN = 30.0
_timeout_s = DEFAULT_TIMEOUT_MIN * 60  # of the process group made by init_distributed


# ----------------------------------------------------------------------------------------------
# devices

def resolve_device(name: str | torch.device = 'cuda') -> torch.device:
    """The device to run on. A CUDA (or MPS) request on a machine without it falls back to cpu with
    a one-line warning on stderr, because every published config says ``device: cuda``."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid device '{name}'; expected e.g. 'cuda', 'cuda:1', 'cpu' or 'mps'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.stderr.write(f"warning: device '{name}' requested but CUDA is not available; using cpu\n")
        return torch.device('cpu')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        sys.stderr.write(f"warning: device '{name}' requested but MPS is not available; using cpu\n")
        return torch.device('cpu')
    return device


# ----------------------------------------------------------------------------------------------
# launch

class LaunchEnv(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # 'itp' | 'torchrun' | 'slurm'


def _int_env(environ: Mapping[str, str], *names: str) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ''):
            try:
                return int(value)
            except ValueError:
                raise RuntimeError(f'environment variable {name}={value!r} is not an integer') from None
    raise RuntimeError(f"environment variable {' or '.join(names)} is not set")


class DistContext(NamedTuple):
    """Runtime facts of this process, decided by the launcher (never part of the configuration)."""
    rank: int
    world_size: int
    local_rank: int
    distributed: bool
    backend: str | None
    device: torch.device
    amp: str = 'none'  # the resolved mixed precision of the run ('bf16' | 'fp16' | 'none')

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch_env(cfg: Any, environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Rank, world size and local rank from the launcher's environment; None when not launched by one.
    ``cfg``: a :class:`utils.config.job.DistConfig` (``dist_on_itp``, ``local_rank``)."""
    env = os.environ if environ is None else environ
    if getattr(cfg, 'dist_on_itp', False):
        return LaunchEnv(_int_env(env, 'OMPI_COMM_WORLD_RANK'), _int_env(env, 'OMPI_COMM_WORLD_SIZE'),
                         _int_env(env, 'OMPI_COMM_WORLD_LOCAL_RANK'), 'itp')
    if 'RANK' in env and 'WORLD_SIZE' in env:
        rank = _int_env(env, 'RANK')
        if env.get('LOCAL_RANK', '') != '':
            local = _int_env(env, 'LOCAL_RANK')
        else:
            local = cfg.local_rank if getattr(cfg, 'local_rank', -1) >= 0 else rank
        return LaunchEnv(rank, _int_env(env, 'WORLD_SIZE'), local, 'torchrun')
    if 'SLURM_PROCID' in env:
        rank = _int_env(env, 'SLURM_PROCID')
        # SLURM_STEP_NUM_TASKS describes the srun step we run in; SLURM_NTASKS the whole allocation.
        world = _int_env(env, 'SLURM_STEP_NUM_TASKS', 'SLURM_NTASKS', 'SLURM_NPROCS')
        if env.get('SLURM_LOCALID', '') != '':
            local = _int_env(env, 'SLURM_LOCALID')
        else:
            local = rank % max(1, torch.cuda.device_count())
        return LaunchEnv(rank, world, local, 'slurm')
    return None


def _export_rendezvous(launch: LaunchEnv, environ: dict) -> None:
    """Put RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* into the environment so ``env://`` works everywhere."""
    environ['RANK'] = str(launch.rank)
    environ['WORLD_SIZE'] = str(launch.world_size)
    environ['LOCAL_RANK'] = str(launch.local_rank)
    if launch.launcher == 'slurm':
        if not environ.get('MASTER_ADDR'):
            addr = environ.get('SLURM_LAUNCH_NODE_IPADDR')
            if not addr:
                raise RuntimeError('SLURM launch: set MASTER_ADDR (SLURM_LAUNCH_NODE_IPADDR is not set either)')
            environ['MASTER_ADDR'] = addr
        if not environ.get('MASTER_PORT'):
            # Derived from the job id so two jobs sharing a node do not fight over one port.
            job = environ.get('SLURM_JOB_ID', '')
            environ['MASTER_PORT'] = str(15000 + int(job) % 20000) if job.isdigit() else '29500'
    for name in ('MASTER_ADDR', 'MASTER_PORT'):
        if not environ.get(name):
            raise RuntimeError(f'{launch.launcher} launch: environment variable {name} is not set')


def local_device_index(launch: LaunchEnv, visible: int) -> int:
    """The CUDA device index of this process among the ``visible`` GPUs.

    Normally the local rank. SLURM clusters often give each task only its own GPU(s)
    (``--gpus-per-task`` / one ``CUDA_VISIBLE_DEVICES`` entry per task): then a task sees fewer GPUs than
    there are tasks on the node and its device is ``local_rank % visible`` (0 when it sees one).
    """
    if visible < 1:
        raise RuntimeError(f'{launch.launcher} launch: local rank {launch.local_rank} sees no GPU '
                           f'(check CUDA_VISIBLE_DEVICES)')
    if launch.local_rank < visible:
        return launch.local_rank
    if launch.launcher == 'slurm':
        return launch.local_rank % visible
    raise RuntimeError(f'local rank {launch.local_rank} has no GPU: only {visible} visible '
                       f'(check --nproc_per_node / CUDA_VISIBLE_DEVICES)')


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (Ampere and newer; about 8x
    the fp32 throughput, ~1e-3 relative precision). On by default for CUDA runs, off with
    ``--no_tf32``. CPU runs never call it, so their numerics are unchanged."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def init_distributed(cfg: Any, device: str = 'cuda', tf32: bool = True) -> DistContext:
    """Set up the process group (when launched with more than one process); return this process's facts.

    ``cfg``: a :class:`utils.config.job.DistConfig`; ``device``: the requested device ('cuda' falls back
    to the CPU when CUDA is missing); ``tf32``: TF32 matmuls on CUDA. On CUDA the local GPU becomes the
    current device.
    """
    dev = resolve_device(device)
    if dev.type == 'cuda':
        set_tf32(tf32)
    launch = detect_launch_env(cfg)
    if launch is None or launch.world_size <= 1:
        setup_for_distributed(True)
        return DistContext(0, 1, launch.local_rank if launch is not None else 0, False, None, dev)

    _export_rendezvous(launch, os.environ)
    backend = getattr(cfg, 'dist_backend', None) or ('nccl' if dev.type == 'cuda' else 'gloo')
    if dev.type == 'cuda':
        gpu = local_device_index(launch, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        dev = torch.device('cuda', gpu)
    url = getattr(cfg, 'dist_url', 'env://') or 'env://'
    global _timeout_s
    _timeout_s = float(getattr(cfg, 'dist_timeout', DEFAULT_TIMEOUT_MIN)) * 60
    _BUILTIN_PRINT(f'| distributed init ({launch.launcher}): rank {launch.rank}/{launch.world_size}, '
                   f'local rank {launch.local_rank}, backend {backend}, {url}, timeout {_timeout_s:g} s', flush=True)
    dist.init_process_group(backend=backend, init_method=url, world_size=launch.world_size, rank=launch.rank,
                            timeout=timedelta(seconds=_timeout_s))
    barrier()
    setup_for_distributed(launch.rank == 0)
    return DistContext(launch.rank, launch.world_size, launch.local_rank, True, backend, dev)


def setup_for_distributed(is_master: bool) -> None:
    """Make ``print`` silent on non-master ranks; ``print(..., force=True)`` always prints."""
    def rank_print(*a: Any, force: bool = False, **kw: Any) -> None:
        if is_master or force:
            _BUILTIN_PRINT(*a, **kw)
    builtins.print = rank_print


def destroy_distributed() -> None:
    """Destroy the process group (if one exists) and restore the normal ``print``."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    builtins.print = _BUILTIN_PRINT


# ----------------------------------------------------------------------------------------------
# queries and collectives

def is_dist_avail_and_initialized() -> bool:
    """True when a torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the process that prints, logs and saves."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    if is_dist_avail_and_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == 'nccl':
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (new tensor, same dtype/device as the input). Collective: every
    rank must call it. The communication happens on the backend's device (CUDA for NCCL)."""
    out = tensor.detach().clone()
    if get_world_size() == 1:
        return out
    buf = out.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, as a floating tensor on the input's device (integer inputs are
    converted to float64, or float32 on MPS). Collective: every rank must call it."""
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32 if tensor.device.type == 'mps' else torch.float64)
    world = get_world_size()
    out = all_reduce_sum(tensor)
    return out / world if world > 1 else out


def all_gather_object(obj: Any) -> list:
    """Picklable ``obj`` from every rank, ordered by rank (``[obj]`` without a process group)."""
    if get_world_size() == 1:
        return [obj]
    out: list = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# reproducibility

def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python ``random``, numpy and torch (all devices) with ``seed + rank``; returns it."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


_CUBLAS_DETERMINISTIC = (':4096:8', ':16:8')  # the workspace sizes cuBLAS is reproducible with


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels when ``enabled`` (bit-exact resume); otherwise cudnn autotuning
    (``benchmark=True``), the faster choice when a resume need not be bit-exact.

    With CUDA, a kernel without a deterministic implementation raises (it would break the promise of
    a bit-identical resume); without CUDA it only warns, as the CPU kernels concerned are few and slow
    paths. Call it before the first CUDA matmul: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` once.
    """
    if enabled:
        if os.environ.get('CUBLAS_WORKSPACE_CONFIG') not in _CUBLAS_DETERMINISTIC:
            os.environ['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'
        torch.use_deterministic_algorithms(True, warn_only=not torch.cuda.is_available())
    else:
        torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


# ----------------------------------------------------------------------------------------------
# DDP options

def ddp_find_unused_parameters(model: torch.nn.Module, requested: bool = False) -> bool:
    """Whether DDP must search for parameters without a gradient (an extra graph traversal each step).

    True when ``requested`` or when ``model`` holds a head that leaves parameters unused in every
    forward: the DPT head (its coarsest fusion block gets no skip input, so that block's first residual
    unit never runs). Pre-training and the other heads use every parameter.
    """
    if requested:
        return True
    from multimae import DPTOutputAdapter  # multimae is below utils: no cycle

    return any(isinstance(m, DPTOutputAdapter) for m in model.modules())


# ----------------------------------------------------------------------------------------------
# failed collectives

# How gloo reports a peer that does not answer (timeout) or went away (closed socket).
_GLOO_FAILURES = ('Timed out waiting', 'Connection closed by peer', 'Connection reset by peer', 'Socket Timeout',
                  'Application timeout caused pair closure')


def collective_timeout_s() -> float:
    """Seconds after which a collective of the process group gives up (``--dist_timeout`` x 60)."""
    return _timeout_s


class CollectiveFailure(RuntimeError):
    """A collective failed because other ranks did not take part; the message names them."""


def _missing_ranks(store: Any, rank: int, world: int, wait_s: float) -> list[int]:
    store.set_timeout(timedelta(seconds=wait_s))
    store.set(f'collective_failure/{rank}', '1')
    deadline = time.monotonic() + wait_s
    keys = {r: f'collective_failure/{r}' for r in range(world)}
    while True:
        missing = [r for r, k in keys.items() if not store.check([k])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _where(exc: BaseException) -> str:
    """The innermost frame of ``exc``'s traceback in this project's code ('utils/engine/trainer.py:255 in
    _forward_backward'), or ''."""
    tb, where = exc.__traceback__, ''
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace(os.sep, '/')
        for top in ('/utils/', '/multimae/', '/tools/'):
            if top in path:
                where = f"{top[1:]}{path.rsplit(top, 1)[1]}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return where


def describe_collective_failure(exc: BaseException, wait_s: float = 10.0) -> CollectiveFailure | None:
    """When ``exc`` is a collective that failed for want of a peer (gloo timeout or closed connection),
    the error to show instead: every rank that fails this way reports to the rendezvous store, and
    those that have not reported within ``wait_s`` seconds are named (stopped, hung, dead, or blocked
    elsewhere). None for any other error, or without a process group."""
    text = str(exc)
    if not is_dist_avail_and_initialized() or not any(m in text for m in _GLOO_FAILURES):
        return None
    rank, world = get_rank(), get_world_size()
    wait_s = min(wait_s, _timeout_s)
    where = _where(exc)
    head = (f'rank {rank}: a collective {"at " + where + " " if where else ""}failed waiting for the other ranks '
            f'(--dist_timeout {_timeout_s / 60:g} min)')
    try:
        missing = _missing_ranks(dist.distributed_c10d._get_default_store(), rank, world, wait_s)
    except Exception:  # the store itself does not answer: it lives in rank 0 unless torchrun's agent holds it
        return CollectiveFailure(f'{head}; the rendezvous store does not answer either (it runs in rank 0 '
                                 f'unless torchrun hosts it): rank 0 is likely stopped, hung or dead. ({text})')
    if not missing:
        return CollectiveFailure(f'{head}; every rank is still there, the collective itself failed ({text})')
    return CollectiveFailure(f'{head}: waited for rank(s) {", ".join(map(str, missing))}, which did not answer '
                             f'within {wait_s:g} s more either (stopped, hung or dead); this rank stops without '
                             f'saving, the checkpoints on disk are intact. ({text})')
