"""Measurement primitives for ``tools/benchmark.py``: interleaved step timing and training-step variants here;
machine description, matmul peak and model FLOPs (:mod:`tools.lib.bench_machine`), peak memory
(:mod:`tools.lib.bench_memory`) and the published PIL input pipeline that the project's pipeline is compared
against (:mod:`tools.lib.bench_data`) re-exported from their modules.

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

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from tools.lib.bench_data import PilPretrainPipeline, write_benchmark_images
from tools.lib.bench_machine import attention_impl, count_flops, machine_info, matmul_peak, sync_device
from tools.lib.bench_memory import PeakMemory, eager_memory_return, rss_bytes, tensor_peak_bytes

__all__ = [
    "machine_info", "matmul_peak", "count_flops", "attention_impl", "rss_bytes", "PeakMemory",
    "eager_memory_return", "tensor_peak_bytes",
    "sync_device", "time_interleaved", "summarize_times", "Variant", "BASELINE", "parse_variant",
    "PilPretrainPipeline", "write_benchmark_images",
]


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


class ReferenceVariant(Variant):
    """The step of another implementation (``--reference_impl``): eager, fp32, plain AdamW."""

    @property
    def name(self) -> str:
        return "published"


REFERENCE = ReferenceVariant(attention="math")


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
