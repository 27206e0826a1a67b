"""Whole-file writes that never leave a torn file behind: images (8/16-bit PNG), JSON, weights files.

Every writer goes through `atomic_write`: the bytes go to a hidden temporary file in the destination
folder (its name ends in `.tmp`, so image-folder scanners never pick it up) which is then renamed over
the destination (`os.replace`, atomic on POSIX). A killed process therefore leaves either the old file,
the new file, or no file -- never a partial one. `fsync=True` also survives power loss, at the price
of one disk flush per file (worth it for checkpoints, not for a million pseudo labels).

Public API:
    atomic_open(path, mode="wb", fsync=True)      context manager behind every writer below
    atomic_write(path, data: bytes, fsync=False)
    encode_png(array, palette=None) -> bytes        uint8 (H,W)/(H,W,3)/(H,W,4) or uint16 (H,W)
    save_png(path, array, fsync=False, palette=None) atomic `encode_png`
    label_dtype(num_classes) -> np.dtype            uint8 up to 255 classes, else uint16
    save_json(path, obj, fsync=True) / load_json(path)
    save_weights_file(state_dict, path, extra=None) `.pth`/`.pt` (torch.save) or `.safetensors`
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import numpy as np
import torch
from PIL import Image

__all__ = ["DiskFullError", "atomic_open", "atomic_write", "fsync_dir", "encode_png", "save_png", "label_dtype", "save_json", "load_json",
           "save_weights_file", "WEIGHTS_SUFFIXES"]

WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _file_mode(path: Path) -> int:
    """Permission bits for a new version of `path`: those of the existing file, else 0666 minus umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a folder, so a rename in it survives power loss (not possible everywhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """The file system filled up while a file was written atomically (the previous file is untouched)."""


def _disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc``: torch.save re-raises a failed write as a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _disk_full_error(path: Path, written: int, size_hint: int | None, cause: OSError) -> DiskFullError:
    """Called after the partial file was removed, so ``free`` is what the next attempt would have."""
    old = path.stat().st_size if path.exists() else 0
    needed = max(written, size_hint or 0)
    free = shutil.disk_usage(path.parent if str(path.parent) else ".").free
    keep = f" besides the existing {path.name} ({_mib(old)}), which is kept until the new file is complete" if old else ""
    return DiskFullError(cause.errno, f"No space left on device while writing {path}: the new file needs at least "
                                      f"{_mib(needed)}{keep}; {_mib(free)} free after removing the partial "
                                      f"file ({_mib(written)} had been written). Free some space or write elsewhere")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", fsync: bool = True,
                size_hint: int | None = None) -> Iterator[IO]:
    """Open a hidden temporary file next to `path` for writing; on success it is flushed (and fsynced
    when `fsync`) and renamed onto `path` (`os.replace`); on any exception it is deleted and `path`
    keeps its previous content. Parent folders are created. A full disk (ENOSPC/EDQUOT, also behind the
    RuntimeError of ``torch.save``) raises one :class:`DiskFullError` naming the file, the room needed
    (at least ``size_hint`` bytes, if given) and the free space::

        with atomic_open(out / "grid.png") as f:
            image.save(f, format="PNG")
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes whole files; mode must contain 'w', got {mode!r}")
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would have
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _file_mode(path))
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        cause = _disk_full_cause(exc)
        written = os.stat(tmp).st_size if cause is not None and os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if cause is not None:
            raise _disk_full_error(path, written, size_hint, cause) from None
        raise
    if fsync:
        fsync_dir(directory)


def atomic_write(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    """Write `data` to `path` through `atomic_open` (parent folders are created)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write expects bytes for {path}, got {type(data).__name__}")
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def encode_png(array: np.ndarray | torch.Tensor, compress_level: int = 6,
               palette: np.ndarray | None = None) -> bytes:
    """PNG bytes of a uint8 (H, W), (H, W, 3), (H, W, 4) image or a uint16 (H, W) single-channel image
    (stored as a true 16-bit greyscale PNG). Other dtypes are rejected rather than silently cast.
    `palette` ((K, 3) uint8) writes a uint8 (H, W) label map as a palette PNG: the stored values stay the
    class ids (what the data loaders read) and image viewers show colours."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    a = np.ascontiguousarray(array)
    if a.dtype == np.uint16:
        if a.ndim != 2:
            raise ValueError(f"16-bit PNGs must be single-channel (H, W), got shape {a.shape}")
        img = Image.fromarray(a)  # mode 'I;16'
    elif a.dtype == np.uint8:
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f"8-bit PNGs must be (H, W), (H, W, 3) or (H, W, 4), got shape {a.shape}")
        img = Image.fromarray(a)
        if palette is not None:
            if a.ndim != 2:
                raise ValueError(f"a palette PNG needs a single-channel (H, W) array, got shape {a.shape}")
            img.putpalette(np.asarray(palette, np.uint8)[:256].reshape(-1).tolist())
    else:
        raise ValueError(f"PNG arrays must be uint8 or uint16, got {a.dtype} (convert explicitly: the value "
                         "range decides the scale)")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def save_png(path: str | os.PathLike, array: np.ndarray | torch.Tensor, fsync: bool = False,
             compress_level: int = 6, palette: np.ndarray | None = None) -> None:
    """Atomically write `array` (see `encode_png`) as a PNG file."""
    atomic_write(path, encode_png(array, compress_level, palette), fsync=fsync)


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest PNG dtype holding class ids 0..num_classes-1 (and the ignore value 255 below 256 classes)."""
    return np.dtype(np.uint8) if num_classes <= 255 else np.dtype(np.uint16)


def save_json(path: str | os.PathLike, obj: Any, fsync: bool = True) -> None:
    """Atomically write `obj` as indented JSON (keys in insertion order)."""
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode(), fsync=fsync)


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a syntax error names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e}") from e


def save_weights_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      extra: Mapping[str, Any] | None = None) -> None:
    """Write a state dict atomically: `.safetensors` (flat tensors; `extra` values are stored as string
    metadata) or `.pth`/`.pt`/`.bin` (`{'model': state_dict, **extra}` when `extra` is not None -- even
    empty --, else the bare state dict). `extra` must hold plain containers only, so that
    `torch.load(weights_only=True)` reads it."""
    path = Path(path)
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise ValueError(f"cannot tell the weights format of '{path}': expected one of {WEIGHTS_SUFFIXES}")
    # safetensors refuses shared or non-contiguous storage; cloning also detaches from the source model
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save as st_save

        meta = {"format": "pt", **{str(k): v if isinstance(v, str) else json.dumps(v, default=str)
                                   for k, v in (extra or {}).items()}}
        atomic_write(path, st_save(tensors, metadata=meta), fsync=True)
        return
    buf = io.BytesIO()
    torch.save({"model": tensors, **dict(extra)} if extra is not None else tensors, buf)
    atomic_write(path, buf.getvalue(), fsync=True)
