"""Messages for bad checkpoint files and full disks: they name the file, never pass on torch's advice to
load with ``weights_only=False``, and a save that runs out of space removes its partial file and says how much
room it needs and how much there is."""
import errno
import os
import pickle
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from utils.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from utils.io import DiskFullError, atomic_write
from utils.weights import load_weights_file


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("loader", [load_checkpoint, load_weights_file])
def test_pickled_payload_is_refused_without_torch_advice(tmp_path, loader):
    path = tmp_path / "payload.pth"
    torch.save({"model": {"w": torch.ones(1)}, "extra": _Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        loader(path)
    msg = str(info.value)
    assert str(path) in msg and "refusing to load" in msg and "posix.system" in msg
    # our safe mode may be named (weights_only=True); torch's advice to turn it off or allow-list must not be
    for advice in ("weights_only=False", "add_safe_globals", "safe_globals", "allowlist", "trust"):
        assert advice not in msg, msg


@pytest.mark.parametrize("seed", [4, 29, 41, 44, 45, 70, 281])  # IndexError, struct.error, UnicodeDecodeError, ...
def test_random_bytes_give_a_clear_error_naming_the_file(tmp_path, seed):
    r = random.Random(seed)
    data = bytes(r.getrandbits(8) for _ in range(r.choice([1, 10, 200, 3000])))
    path = tmp_path / "finetune.pth"
    path.write_bytes(data)
    for loader in (load_checkpoint, load_weights_file):
        with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*finetune\.pth .*not a PyTorch checkpoint"):
            loader(path)


def test_random_bytes_through_the_finetune_loader(tmp_path):
    from multimae import MultiViT, PatchedInputAdapter
    from utils.weights import load_finetune_weights

    path = tmp_path / "weights.pth"
    path.write_bytes(os.urandom(4096))
    model = MultiViT({"rgb": PatchedInputAdapter(3, 1, 8, image_size=16)}, None, dim_tokens=8, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match=r"weights\.pth"):
        load_finetune_weights(model, str(path))


# ---------------------------------------------------------------------------------------------- full disk
class _FailingFile:
    """A file whose writes raise ``error`` once ``limit`` bytes are in (the rest is the real file)."""

    def __init__(self, f, limit, error):
        self._f, self._limit, self._error, self._n = f, limit, error, 0

    def write(self, b):
        self._n += len(b)
        if self._n > self._limit:
            raise OSError(self._error, os.strerror(self._error))
        return self._f.write(b)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fill_after(monkeypatch, limit, error=errno.ENOSPC):
    """Files opened by ``atomic_open`` fail with ``error`` after ``limit`` bytes."""
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: _FailingFile(real(fd, *a, **kw), limit, error))


def test_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch):
    out = tmp_path / "run"
    old = save_checkpoint(out, 1, {"model": {"w": torch.zeros(10)}})
    old_bytes = old.read_bytes()
    _fill_after(monkeypatch, 100_000)
    state = {"model": {"w": torch.ones(1_000_000)}}  # 4 MB of tensors
    with pytest.raises(DiskFullError) as info:
        atomic_save(state, old)
    msg = str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert str(old) in msg and "3.8 MiB" in msg and "free" in msg and old.name in msg
    assert old.read_bytes() == old_bytes  # the previous checkpoint survives
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []  # no partial file left


def test_full_disk_in_a_plain_atomic_write(tmp_path, monkeypatch):
    _fill_after(monkeypatch, 10)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    with pytest.raises(DiskFullError, match=r"No space left on device while writing .*grid\.png"):
        atomic_write(tmp_path / "grid.png", b"x" * 100_000)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    _fill_after(monkeypatch, 0, errno.EIO)
    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "a.bin", b"x")
    assert not isinstance(info.value, DiskFullError) and info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_fs():
    """A 1 MiB tmpfs (root only); skipped where mounting is not permitted."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = Path(tempfile.mkdtemp(prefix="tinyfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        where.rmdir()
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip() or r.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def test_real_full_filesystem(tiny_fs):
    path = tiny_fs / "checkpoint-1.pth"
    atomic_save({"w": torch.zeros(50_000)}, path)  # 200 kB: fits
    before = path.read_bytes()
    with pytest.raises(DiskFullError) as info:
        atomic_save({"w": torch.zeros(300_000)}, path)  # 1.2 MB: cannot fit on 1 MiB
    msg = str(info.value)
    assert str(path) in msg and "1.1 MiB" in msg and "free" in msg
    assert path.read_bytes() == before
    assert [p.name for p in tiny_fs.iterdir()] == ["checkpoint-1.pth"]
