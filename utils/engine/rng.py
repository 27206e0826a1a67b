"""The random generator states of one process, as checkpointable tensors and plain containers."""
from __future__ import annotations

import random
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> dict:
    """Python, numpy, torch (CPU) and CUDA generator states of this process, as tensors and plain
    containers (loadable with ``torch.load(weights_only=True)``)."""
    version, keys, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only: resumable on fewer GPUs
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys.numpy(), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        _set_cuda_rng_state(state["cuda"])


def _set_cuda_rng_state(saved: Tensor | Sequence[Tensor]) -> None:
    """Restore the current device's generator from one state (this process's device) or from a list with
    one per visible GPU (older checkpoints); warn, restoring nothing, when the list has no entry for it."""
    if isinstance(saved, Tensor):
        torch.cuda.set_rng_state(saved)
        return
    index = torch.cuda.current_device()
    if index < len(saved):
        torch.cuda.set_rng_state(saved[index])
    else:
        warnings.warn(f"checkpoint holds CUDA RNG states for {len(saved)} device(s), none for cuda:{index}; "
                      f"its generator is not restored (resume is not bit-identical)")
