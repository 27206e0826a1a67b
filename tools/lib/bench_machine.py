"""The machine side of the benchmark: what the machine is (CPU model and vector extensions, threads, device),
its matmul peak, and the model FLOPs of a step.

*Model FLOPs* of a step are counted once, on the eager model with the explicit ``math`` attention
(``torch.utils.flop_counter`` does not see inside CPU SDPA kernels), forward + backward. *Peak* is the best
of several large square GEMMs of the compute dtype on the same threads (see :mod:`tools.lib.benchmark`).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

__all__ = ["machine_info", "sync_device", "matmul_peak", "attention_impl", "count_flops"]

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
