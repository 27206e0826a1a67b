"""Measurement primitives for ``tools/benchmark.py``: machine description, matmul peak, model FLOPs,
peak memory, interleaved step timing, training-step variants, and the published PIL input pipeline
that the project's pipeline is compared against.

Conventions (so numbers from different runs mean the same thing):

* *Model FLOPs* of a step are counted once, on the eager model with the explicit ``math`` attention
  (``torch.utils.flop_counter`` does not see inside CPU SDPA kernels), forward + backward. Every variant
  of the same model is credited with the same FLOPs, so recomputation (gradient checkpointing) or a
  fused kernel never inflates utilisation.
* *Peak* is the best of several large square GEMMs of the compute dtype on the same threads, measured
  in the same process as the steps. ``achieved / peak`` is the CPU analogue of MFU.
* *Step memory* is the peak of the tensor memory allocated during one step (activations, gradients,
  temporaries; model weights and optimizer state exist before): ``max_memory_allocated`` on CUDA, and on
  CPU the same quantity from the allocation records of ``torch.profiler`` (:func:`tensor_peak_bytes`).
  The peak resident memory of the step is reported beside it, but it depends on the heap's history:
  glibc serves a new tensor from a free heap chunk left by earlier steps before mapping fresh memory,
  and such a chunk stays resident when the tensor is freed again, so a step that frees its saved
  activations early (gradient checkpointing) looks no smaller than one that keeps them.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "machine_info", "matmul_peak", "count_flops", "attention_impl", "rss_bytes", "PeakMemory",
    "eager_memory_return", "tensor_peak_bytes",
    "sync_device", "time_interleaved", "summarize_times", "Variant", "BASELINE", "parse_variant",
    "PilPretrainPipeline", "write_benchmark_images",
]

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_fp16")


# ----------------------------------------------------------------------------------------------
# machine

def _cpu_model_and_flags() -> Tuple[str, List[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def machine_info(device: torch.device | str = "cpu") -> Dict[str, Any]:
    """CPU model, vector/matrix ISA flags relevant to the kernels, cores, threads, library versions, the
    load average (other processes distort timings) and the GPU name on CUDA."""
    import torchvision

    model, flags = _cpu_model_and_flags()
    info: Dict[str, Any] = {
        "cpu": model,
        "cpu_flags": [f for f in _CPU_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16": bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    device = torch.device(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------------------------
# compute

def sync_device(device: torch.device | str) -> None:
    """Wait for queued kernels (timing only; CPU ops are synchronous)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
                repeats: int = 8, clock: str = "wall") -> float:
    """Best achieved FLOP/s of an ``n x n @ n x n`` GEMM in ``dtype`` on the current threads.

    The maximum over ``repeats`` timings (after two warm-up products) estimates what the machine can do
    when nothing else disturbs it. ``clock='cpu'`` divides by the process CPU time instead of the wall
    time (the single-thread peak on a machine shared with other processes)."""
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    device = torch.device(device)
    timer = time.perf_counter if clock == "wall" else time.process_time
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    sync_device(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = timer()
        torch.mm(a, b)
        sync_device(device)
        best = min(best, timer() - t0)
    return 2.0 * n ** 3 / max(best, 1e-9)


@contextlib.contextmanager
def attention_impl(impl: str) -> Iterator[None]:
    """Temporarily select the process-wide attention implementation ('sdpa' or 'math')."""
    from multimae.multimae_utils import get_attention_impl, set_attention_impl

    previous = get_attention_impl()
    set_attention_impl(impl)
    try:
        yield
    finally:
        set_attention_impl(previous)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: each requested gradient (input, weight) costs as much as the
    forward convolution, ``2 * batch * prod(spatial) * prod(weight.shape)`` (``weight.shape`` already holds
    ``in_channels / groups``). torch's own formula ignores ``groups`` and counts a depthwise 7x7 backward
    about ``channels`` times too high (ConvNeXt heads)."""
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs (matmuls, convolutions, attention) that ``fn()`` executes, forward and backward,
    counted by ``torch.utils.flop_counter.FlopCounterMode`` with the explicit ``math`` attention (and a
    grouped-convolution-aware backward formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    fixes = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with attention_impl("math"), FlopCounterMode(display=False, custom_mapping=fixes) as counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# memory

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
# timing

def time_interleaved(fns: Mapping[str, Callable[[], Any]], iters: int, warmup: int = 1,
                     device: torch.device | str = "cpu", on_first_call: Optional[Callable[[str, float], None]] = None
                     ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Seconds per call of every function, measured round-robin: ``(wall_times, cpu_times)``.

    All functions run ``warmup`` times (the first call's duration goes to ``on_first_call``, e.g. the
    compile time), then ``iters`` rounds in which each runs once; the order rotates every round. Slow
    drifts of the machine's load therefore hit every variant alike, which makes the ratios trustworthy
    on a shared machine even when the absolute times are not. ``cpu_times`` is the CPU time of the whole
    process per call: with one thread it is close to the wall time on an idle machine even when other
    processes compete for the cores (with several threads, OpenMP spin-waiting inflates it).
    """
    names = list(fns)
    for w in range(warmup):
        for name in names:
            t0 = time.perf_counter()
            fns[name]()
            sync_device(device)
            if w == 0 and on_first_call is not None:
                on_first_call(name, time.perf_counter() - t0)
    wall: Dict[str, List[float]] = {name: [] for name in names}
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    for i in range(iters):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync_device(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def summarize_times(times: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and inter-quartile range of a list of durations (seconds)."""
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "iqr_s": q[2] - q[0]}


# ----------------------------------------------------------------------------------------------
# variants of a training step

_AMP_TOKENS = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class Variant:
    """How a training step is run: attention kernel, ``torch.compile``, autocast dtype, activation
    checkpointing, channels-last convolution weights/inputs and the fused (single-kernel) AdamW."""
    attention: str = "sdpa"
    compile: bool = False
    amp: str = "none"
    grad_ckpt: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False

    @property
    def name(self) -> str:
        parts = [self.attention]
        parts += ["compile"] if self.compile else []
        parts += [self.amp] if self.amp != "none" else []
        parts += ["ckpt"] if self.grad_ckpt else []
        parts += ["cl"] if self.channels_last else []
        parts += ["fused"] if self.fused_optimizer else []
        return "+".join(parts)


BASELINE = Variant(attention="math")  # the published formulation: explicit softmax attention, eager, fp32


def parse_variant(spec: str) -> Variant:
    """``'sdpa+compile+bf16+ckpt+cl+fused'`` -> :class:`Variant` (tokens in any order; ``baseline`` =
    ``math``, the published formulation)."""
    v = Variant()
    for token in [t for t in spec.strip().lower().split("+") if t]:
        if token in ("baseline", "math", "sdpa", "auto"):
            v = replace(v, attention="math" if token == "baseline" else token)
        elif token == "compile":
            v = replace(v, compile=True)
        elif token in _AMP_TOKENS or token in ("fp32",):
            v = replace(v, amp="none" if token == "fp32" else token)
        elif token in ("ckpt", "grad_ckpt"):
            v = replace(v, grad_ckpt=True)
        elif token in ("cl", "channels_last"):
            v = replace(v, channels_last=True)
        elif token == "fused":
            v = replace(v, fused_optimizer=True)
        else:
            raise ValueError(f"unknown variant token {token!r} in {spec!r}; expected '+'-joined tokens from "
                             f"baseline, math, sdpa, auto, compile, bf16, fp16, fp32, ckpt, cl, fused")
    return v


# ----------------------------------------------------------------------------------------------
# the published input pipeline (comparison baseline for the data benchmark)

class PilPretrainPipeline(Dataset):
    """The published pre-training pipeline (spec 6.2-6.3) over the samples of a multi-modal folder.

    Per sample: every modality is decoded at full size with PIL (rgb converted to RGB, semseg to
    palette mode), one ``RandomResizedCrop`` box and one flip decision are shared; each modality is
    cropped and resized to ``input_size`` with PIL (bicubic, nearest for semseg) and flipped; rgb
    becomes a normalised float tensor, depth ``float / 2**16`` ``(1, S, S)``, semseg is resized again to
    ``S / 4`` and becomes int64. ``__getitem__(i) -> (dict, class_index)`` like ``MultiModalImageFolder``.
    """

    def __init__(self, samples: Sequence[Tuple[Mapping[str, str], int]], input_size: int = 224,
                 hflip: float = 0.5, scale: Tuple[float, float] = (0.2, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), semseg_stride: int = 4,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.samples = [(dict(paths), int(label)) for paths, label in samples]
        self.size, self.hflip, self.scale, self.ratio = input_size, hflip, scale, ratio
        self.semseg_stride, self.mean, self.std = semseg_stride, list(mean), list(std)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _open(path: str, modality: str):
        from PIL import Image

        im = Image.open(path)
        if modality == "rgb":
            return im.convert("RGB")
        if "semseg" in modality:
            return im.convert("P")
        im.load()
        return im

    def __getitem__(self, index: int) -> Tuple[Dict[str, torch.Tensor], int]:
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF

        paths, label = self.samples[index]
        images = {m: self._open(p, m) for m, p in paths.items()}
        top, left, h, w = RandomResizedCrop.get_params(next(iter(images.values())), self.scale, self.ratio)
        flip = random.random() < self.hflip
        out: Dict[str, torch.Tensor] = {}
        for m, im in images.items():
            resample = Image.NEAREST if im.mode == "P" else Image.BICUBIC
            im = im.crop((left, top, left + w, top + h)).resize((self.size, self.size), resample)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            if m == "rgb":
                out[m] = TF.normalize(TF.to_tensor(im), self.mean, self.std)
            elif "semseg" in m:
                small = self.size // self.semseg_stride
                out[m] = torch.from_numpy(np.array(im.resize((small, small), Image.NEAREST))).long()
            else:
                out[m] = torch.from_numpy(np.array(im, dtype=np.float32) / 2 ** 16).unsqueeze(0)
        return out, label


def write_benchmark_images(root: str, num_images: int, image_size: int, unique: int = 32, seed: int = 0,
                           jpeg_quality: int = 90) -> str:
    """Write ``root/{rgb,depth,semseg}/scenes/img_<i>.{jpg,png,png}`` from synthetic scenes.

    rgb is JPEG (as ImageNet), depth a 16-bit PNG, semseg an 8-bit PNG. Only ``unique`` scenes are
    rendered (slow at large sizes) and repeated under different names; decoding cost does not depend on
    repetition. An existing complete folder (marker file) is reused. Returns ``root``.
    """
    from PIL import Image

    from utils.data.synthetic import render_scene

    marker = os.path.join(root, f".complete_{num_images}_{image_size}_{unique}_{seed}_{jpeg_quality}")
    if os.path.exists(marker):
        return root
    for m in ("rgb", "depth", "semseg"):
        os.makedirs(os.path.join(root, m, "scenes"), exist_ok=True)
    scenes = [render_scene((seed, 0, i), i % 4, image_size) for i in range(min(unique, num_images))]
    for i in range(num_images):
        arrays = scenes[i % len(scenes)]
        stem = f"img_{i:06d}"
        Image.fromarray(arrays["rgb"]).save(os.path.join(root, "rgb", "scenes", stem + ".jpg"), quality=jpeg_quality)
        Image.fromarray(arrays["depth"]).save(os.path.join(root, "depth", "scenes", stem + ".png"), compress_level=6)
        Image.fromarray(arrays["semseg"]).save(os.path.join(root, "semseg", "scenes", stem + ".png"), compress_level=6)
    with open(marker, "w") as f:
        f.write("ok\n")
    return root
