"""Console progress lines, JSON-lines log files and optional Weights & Biases logging.

Training loop use::

    ml = MetricLogger()
    for batch in ml.log_every(loader, print_freq=print_freq, header=f'Epoch [{epoch}]',
                              batch_size=batch_size):
        loss, logs = step_fn(model, batch)
        ml.update(loss=loss, lr=lr, grad_norm=grad_norm, **logs)   # tensors welcome: no sync here
    ml.synchronize_between_processes()                               # collective, all ranks
    append_log_txt(output_dir, {**{f'[Epoch] {k}': v for k, v in ml.global_avg().items()},
                                     'epoch': epoch})

Public API:
    SmoothedValue(window_size=20, fmt=None)    .update(value, n=1) accepts floats or 1-element
        tensors (kept on their device, converted only when read); .median .avg .global_avg .max
        .value .count .total; .synchronize_between_processes() (collective)
    MetricLogger(delimiter='  ', window_size=20, printer=None)
        .update(**values) (None values ignored), .add_meter(name, meter), .meters,
        .log_every(iterable, print_freq=10, header='', batch_size=None, total=None) -> generator,
        .global_avg() -> dict[str, float], .synchronize_between_processes() (collective), str(logger),
        .state() -> {name: [total, count]}, .restore(state) (mid-epoch resume)
    append_log_txt(output_dir, record, filename='log.txt')      one JSON object per line, rank 0 only
    JsonLogger(output_dir, filename='log.txt').log(record)
    WandbLogger(settings, config, output_dir)   rank 0 and ``--log_wandb`` only, ``wandb`` imported lazily;
        .log(metrics, step=None), .log_image(key, image, step=None, caption=None), .finish(), .enabled

Per-step values should stay tensors: only the print interval converts them (one host sync per line).
Log to W&B at the print interval too, since ``WandbLogger.log`` converts tensors to numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from utils.dist import all_gather_object, all_reduce_sum, get_world_size, is_main_process

__all__ = ['SmoothedValue', 'MetricLogger', 'append_log_txt', 'JsonLogger', 'WandbLogger']

_VALUE_FMT = {'lr': '{value:.3e}', 'min_lr': '{value:.3e}', 'weight_decay': '{value:.4f}',
              'loss_scale': '{value:.1f}'}


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == 'mps' else torch.float64


class SmoothedValue:
    """A series of scalars: sliding-window statistics plus the global average.

    Tensor values are accumulated on their own device without synchronisation; they are turned into
    Python floats the first time a statistic is read.
    """

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.count = 0
        self._total = 0.0
        self._total_t: torch.Tensor | None = None
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float | torch.Tensor, n: int = 1) -> None:
        """Add ``value`` (a number or a 1-element tensor) observed ``n`` times."""
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f'SmoothedValue takes scalars, got a tensor of shape {tuple(value.shape)}')
            v = value.detach().reshape(()).to(_acc_dtype(value.device))
            self.deque.append(v)
            self._total_t = v * n if self._total_t is None else self._total_t + v * n
        else:
            self.deque.append(float(value))
            self._total += float(value) * n
        self.count += n

    def _materialize(self) -> None:
        tensors = [v for v in self.deque if isinstance(v, torch.Tensor)]
        if self._total_t is not None:
            tensors.append(self._total_t)
        if not tensors:
            return
        device = tensors[0].device
        values = iter(torch.stack([t.to(device) for t in tensors]).tolist())  # the one host sync
        self.deque = deque((next(values) if isinstance(v, torch.Tensor) else v for v in self.deque),
                           maxlen=self.deque.maxlen)
        if self._total_t is not None:
            self._total += next(values)
            self._total_t = None

    @property
    def total(self) -> float:
        self._materialize()
        return self._total

    def _window(self) -> list[float]:
        self._materialize()
        return list(self.deque)

    @property
    def median(self) -> float:
        w = sorted(self._window())
        return w[(len(w) - 1) // 2] if w else math.nan

    @property
    def avg(self) -> float:
        w = self._window()
        return sum(w) / len(w) if w else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        w = self._window()
        return max(w) if w else math.nan

    @property
    def value(self) -> float:
        w = self._window()
        return w[-1] if w else math.nan

    def restore(self, total: float, count: int) -> None:
        """Continue a series from a saved ``(total, count)`` (e.g. a mid-epoch checkpoint); the window
        starts with the saved average."""
        self._total_t, self._total, self.count = None, float(total), int(count)
        self.deque.clear()
        if count:
            self.deque.append(self._total / self.count)

    def synchronize_between_processes(self) -> None:
        """Sum ``count`` and ``total`` over ranks (collective; the window stays local)."""
        if get_world_size() == 1:
            return
        t = all_reduce_sum(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count, self._total = int(t[0].item()), float(t[1].item())

    def __str__(self) -> str:
        self._materialize()
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class MetricLogger:
    """Named SmoothedValues plus a progress line every ``print_freq`` steps."""

    def __init__(self, delimiter: str = '  ', window_size: int = 20,
                 printer: Callable[[str], None] | None = None):
        self.delimiter = delimiter
        self.window_size = window_size
        self.meters: dict[str, SmoothedValue] = defaultdict(self._new_meter)
        # Looked up at call time so the rank-0 print set by utils.dist applies.
        self.printer = printer or (lambda line: print(line, flush=True))

    def _new_meter(self) -> SmoothedValue:
        return SmoothedValue(self.window_size)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **values: float | torch.Tensor | None) -> None:
        """Record one value per name; tensors stay on device until the next printed line."""
        for name, value in values.items():
            if value is None:
                continue
            if name not in self.meters and name in _VALUE_FMT:
                self.meters[name] = SmoothedValue(self.window_size, _VALUE_FMT[name])
            self.meters[name].update(value)

    def __getattr__(self, name: str) -> SmoothedValue:
        meters = self.__dict__.get('meters', {})
        if name in meters:
            return meters[name]
        raise AttributeError(f"'{type(self).__name__}' has no meter or attribute '{name}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def state(self) -> dict[str, list[float]]:
        """``{name: [total, count]}`` of every meter (this rank only), for checkpoints."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.items()}

    def restore(self, state: Mapping[str, Sequence[float]]) -> None:
        """Continue the meters from :meth:`state` (mid-epoch resume)."""
        for name, (total, count) in state.items():
            if name not in self.meters and name in _VALUE_FMT:
                self.meters[name] = SmoothedValue(self.window_size, _VALUE_FMT[name])
            self.meters[name].restore(total, int(count))

    def global_avg(self) -> dict[str, float]:
        """``{name: global average}`` of every meter (call synchronize_between_processes first)."""
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def synchronize_between_processes(self) -> None:
        """All-reduce every meter's count and total in one collective (all ranks must call it).
        Meters that exist on some ranks only are included with zeros elsewhere."""
        if get_world_size() == 1:
            return
        names = sorted(set().union(*all_gather_object(sorted(self.meters))))
        rows = [[self.meters[n].count, self.meters[n].total] if n in self.meters else [0.0, 0.0] for n in names]
        summed = all_reduce_sum(torch.tensor(rows, dtype=torch.float64)).tolist()
        for name, (count, total) in zip(names, summed):
            meter = self.meters[name]
            meter._materialize()
            meter.count, meter._total = int(round(count)), float(total)

    def log_every(self, iterable: Iterable, print_freq: int = 10, header: str = '',
                  batch_size: int | None = None, total: int | None = None, start: int = 0) -> Iterator:
        """Yield from ``iterable``, printing a progress line every ``print_freq`` steps and at the end:
        ``header [ i/N]  eta  <meters>  img/s  time  data  [max mem]``. ``img/s`` counts all ranks
        (``batch_size`` per rank x world size); ``max mem`` appears only when CUDA was used.
        ``start``: steps of the epoch already done (a resumed epoch counts on from ``[start/N]``, ``total``
        being the whole epoch's N); ``iterable`` then holds the remaining ``N - start`` items."""
        n = total if total is not None else len(iterable) + start  # type: ignore[arg-type]
        print_freq = max(1, int(print_freq))
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(n))
        t0 = end = time.time()
        i = first = int(start)
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                parts = [f'{header} [{i:>{width}}/{n}]'.strip(), f'eta: {_hms(iter_time.global_avg * (n - i - 1))}']
                parts += [f'{name}: {meter}' for name, meter in self.meters.items()]
                if batch_size:
                    parts.append(f'img/s: {batch_size * get_world_size() / max(iter_time.avg, 1e-9):.1f}')
                parts += [f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB')
                self.printer(self.delimiter.join(parts))
            i += 1
            end = time.time()
        elapsed = time.time() - t0
        self.printer(f'{header} Total time: {_hms(elapsed)} ({elapsed / max(i - first, 1):.4f} s / it)'.strip())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)  # strict JSON has no NaN/Infinity
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, torch.Tensor):
        return _jsonable(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, argparse.Namespace):
        return _jsonable(vars(value))
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, 'item'):  # numpy scalars
        return _jsonable(value.item())
    if hasattr(value, 'tolist'):
        return _jsonable(value.tolist())
    return str(value)


def append_log_txt(output_dir: str | os.PathLike | None, record: Mapping[str, Any],
                   filename: str = 'log.txt') -> Path | None:
    """Append ``record`` as one JSON line to ``output_dir/filename`` (main process only; no-op when
    ``output_dir`` is empty). Tensors/numpy values become numbers, non-finite floats strings.

    The file is rewritten atomically (old content + the new line to a temporary file, then renamed), so a
    crash or a full disk never leaves a torn last line: the log is either the old one or the new one.
    It holds one line per epoch, so rewriting it costs nothing next to an epoch."""
    if not output_dir or not is_main_process():
        return None
    from utils.checkpoint import atomic_open  # lazy: utils.checkpoint imports torch.nn

    path = Path(output_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(_jsonable(dict(record)), allow_nan=False)
    old = path.read_bytes() if path.is_file() else b''
    if old and not old.endswith(b'\n'):
        old += b'\n'  # a line torn by an older, non-atomic writer stays separate from the new one
    with atomic_open(path, 'wb') as f:
        f.write(old + line.encode('utf-8') + b'\n')
    return path


class JsonLogger:
    """``append_log_txt`` bound to one file."""

    def __init__(self, output_dir: str | os.PathLike | None, filename: str = 'log.txt'):
        self.output_dir, self.filename = output_dir, filename

    def log(self, record: Mapping[str, Any]) -> Path | None:
        return append_log_txt(self.output_dir, record, self.filename)


class WandbLogger:
    """Weights & Biases run on the main process when ``settings.log_wandb`` (or ``enabled``) is true;
    every method is a no-op otherwise. Works offline (``WANDB_MODE=offline``).

    ``settings``: a :class:`utils.config.job.WandbConfig`; ``config``: the run's plain config dict (shown
    in W&B); ``output_dir``: where the local run folder goes (unless ``WANDB_DIR`` is set)."""

    def __init__(self, settings: Any, config: Mapping[str, Any] | None = None, output_dir: str = '',
                 enabled: bool | None = None):
        flag = getattr(settings, 'log_wandb', False) if enabled is None else enabled
        self.enabled = bool(flag) and is_main_process()
        self.run = None
        if not self.enabled:
            return
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f'--log_wandb is set but wandb cannot be imported ({exc}); '
                              f'install wandb or pass --no_log_wandb') from None
        self._wandb = wandb
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        self.run = wandb.init(
            config=_plain_config(config or {}),
            project=getattr(settings, 'wandb_project', None),
            entity=getattr(settings, 'wandb_entity', None),
            group=getattr(settings, 'wandb_group', None) or None,
            name=getattr(settings, 'wandb_run_name', None),
            dir=None if os.environ.get('WANDB_DIR') else (output_dir or None),
        )

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalars (tensors are converted here, i.e. this synchronises)."""
        if self.run is None:
            return
        self.run.log({k: _jsonable(v) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()},
                     step=step)

    def log_image(self, key: str, image: Any, step: int | None = None, caption: str | None = None) -> None:
        """Log a picture: a file path, PIL image or HxWxC array."""
        if self.run is None:
            return
        if isinstance(image, os.PathLike):
            image = os.fspath(image)
        self.run.log({key: self._wandb.Image(image, caption=caption)}, step=step)

    def finish(self) -> None:
        """Finish the run and reset wandb's process-wide settings, so that a later run in the same process
        (tests, notebooks, sweeps) honours its own ``WANDB_DIR``/mode instead of the first run's."""
        if self.run is not None:
            self.run.finish()
            self.run = None
            self._wandb.teardown()


def _plain_config(config: Mapping[str, Any]) -> dict:
    # Lists, not tuples, so W&B shows opt_betas as [0.9, 0.95] whatever the caller passed.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
