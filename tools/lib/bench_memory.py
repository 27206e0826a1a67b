"""Memory measurement for the benchmark: resident set size and its peak (:class:`PeakMemory`), an allocator
that returns freed memory eagerly (:func:`eager_memory_return`), and the peak tensor memory of a call
(:func:`tensor_peak_bytes`, from ``torch.profiler`` on CPU, ``max_memory_allocated`` on CUDA), and both
measured for the training steps of the model modes.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["rss_bytes", "PeakMemory", "eager_memory_return", "tensor_peak_bytes"]


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (``VmRSS``; ``ru_maxrss`` where /proc is missing)."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap(collect: bool = False) -> None:
    """Return freed heap pages to the OS, so the next measurement starts from live memory only."""
    if collect:  # a full collection takes ~0.5 s in a process that imported torch._dynamo
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def eager_memory_return(threshold: int = 256 * 1024) -> Iterator[bool]:
    """Inside the block glibc serves allocations of ``threshold`` bytes or more with their own ``mmap``
    (returned to the OS on free) and trims the heap above that much free space, so the resident size
    follows the live tensors instead of the allocator's cached free chunks (allocations get slower: use it
    for memory measurements, not timing). Yields False where glibc's ``mallopt`` is unavailable.

    On exit the thresholds are set to the values glibc's dynamic adjustment converges to (32 MiB mmap,
    64 MiB trim); the dynamic adjustment itself stays off for the rest of the process.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield False
        return
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    try:
        yield ok
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
        mallopt(M_TRIM_THRESHOLD, 64 * 2 ** 20)


class PeakMemory:
    """Context manager measuring the peak memory of the enclosed code.

    After exit: ``start_bytes`` (live memory before), ``peak_bytes`` (peak during) and ``delta_bytes``
    (``peak - start``). CPU: resident set size with the high-water mark reset on entry (``exact`` is
    False when the reset is unavailable: the peak is then the process lifetime peak). CUDA:
    ``memory_allocated`` / ``max_memory_allocated``. ``collect=True`` runs the cyclic garbage collector
    first (tensors are normally freed by reference counting already).
    """

    def __init__(self, device: torch.device | str = "cpu", collect: bool = False):
        self.device = torch.device(device)
        self.start_bytes = self.peak_bytes = 0
        self.exact, self.collect = True, collect

    def __enter__(self) -> "PeakMemory":
        _release_free_heap(self.collect)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = rss_bytes()
            self.exact = _reset_peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            self.peak_bytes = max(hwm * 1024 if hwm is not None else 0, rss_bytes())

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


# what libkineto writes to stderr around every CPU-only profile (start/stop markers; no GPU found)
_PROFILER_CHATTER = ("SyncActivityProfilerHandler.cpp", "gpuGetDeviceCount failed")


@contextlib.contextmanager
def _without_profiler_chatter() -> Iterator[None]:
    """Route the process's stderr (file descriptor 2, where the profiler's C++ logging goes) to a temporary
    file inside the block and pass on every line but the profiler's routine messages."""
    import sys
    import tempfile
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(noise in line for noise in _PROFILER_CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def tensor_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> Tuple[int, int]:
    """``(peak, end)``: the most tensor memory allocated at any moment while ``fn()`` runs, and what is
    still allocated when it returns, both counted from the start of the call (``peak >= 0``; ``end`` is
    negative when the call frees more than it allocates). The CPU analogue of ``max_memory_allocated`` minus
    ``memory_allocated`` at the start (which is what CUDA uses): it reads the allocation records of
    ``torch.profiler`` (``profile_memory=True``), so it sees every tensor the torch allocator hands out
    (including inside compiled graphs and autograd) and nothing of the heap's fragmentation.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak, live


# ----------------------------------------------------------------------------------------------
# the step memory of the model modes

def _measure_step_memory(runners: Dict[str, Callable[[], None]], device: torch.device) -> Dict[str, Dict[str, Any]]:
    """Per variant: ``tensor_peak`` (bytes; peak tensor memory allocated during one step, see
    ``tensor_peak_bytes``) and ``rss`` (a :class:`PeakMemory` of another step: resident memory, which also
    counts the allocator's free-but-resident heap and so depends on what ran before)."""
    memory: Dict[str, Dict[str, Any]] = {}
    for name, run in runners.items():
        memory[name] = {"tensor_peak": tensor_peak_bytes(run, device)[0]}
    for name, run in runners.items():
        memory[name]["rss"] = _step_rss(run, device)
    return memory


def _step_rss(run: Callable[[], None], device: torch.device) -> PeakMemory:
    """Peak memory of one ``run()``, the allocator returning freed memory eagerly (see ``eager_memory_return``)."""
    with eager_memory_return():
        with PeakMemory(device) as pm:
            run()
    return pm
