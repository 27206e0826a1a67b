"""The shard format: per-modality encodings, tar member names, the manifest and where shards are found.

A shard is a tar file of samples; every member of a sample shares one key, the sample's index in the
sorted multi-modal folder (``MultiModalImageFolder`` order), zero-padded to 9 digits::

    000001234.json          {"name": "<class>/<relative name>", "class": "<class>"}
    000001234.cls           class index as text
    000001234.rgb.jpg       encoding 'orig': the original file's bytes, unchanged (any image extension)
    000001234.depth.npy     encoding 'raw': the decoded array as a .npy file (uint8/uint16, (C, H, W))
    000001234.semseg.npy.zlib  encoding 'zlib': the same .npy file deflated (zlib level 1)

The manifest (``manifest.json`` beside the shards) lists every shard with its sample count, its sample
indices, its size and three checksums: xxh3-64 (``xxh3``, checked by the loader while it streams the shard:
0.02 ms per 320 px sample of 230 KB), CRC-32 (checked instead where the ``xxhash`` package is missing:
0.15 ms) and sha256 (checked by ``tools/make_shards.py --verify`` and when an interrupted run resumes),
plus the modalities, their encodings and the class names.

Public API: ENCODINGS, FAST_ENCODINGS, encode_array, decode_member, member_suffix, is_shard_source,
load_manifest -> Manifest, sibling_url, ShardError.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from utils.data.datasets import BadSampleError, ImageDecodeError, _decode_op, _pil_to_tensor
from utils.data.modalities import get_modality

__all__ = ['ENCODINGS', 'FAST_ENCODINGS', 'MANIFEST_NAME', 'FORMAT', 'ShardError', 'ShardInfo', 'Manifest',
           'encode_array', 'decode_member', 'member_suffix', 'sample_key', 'is_shard_source', 'load_manifest',
           'sibling_url']

FORMAT = 'multimae-shards/1'
MANIFEST_NAME = 'manifest.json'
ENCODINGS = ('orig', 'raw', 'zlib')
# Chosen by measurement (README, Performance): decoding a 16-bit depth PNG costs ~0.9 ms at 320 px, a .npy
# nothing, zlib ~0.55 ms; label maps deflate to PNG size and inflate in a third of the PNG time; JPEG stays.
FAST_ENCODINGS = {'rgb': 'orig', 'dense': 'raw', 'label': 'zlib', 'mask': 'zlib'}
_SUFFIX = {'raw': 'npy', 'zlib': 'npy.zlib'}


class ShardError(BadSampleError):
    """A shard cannot be read (missing, truncated, corrupt, checksum mismatch); the message names it."""


def sample_key(index: int) -> str:
    """Tar key of the sample with folder index ``index``."""
    return f'{int(index):09d}'


def member_suffix(modality: str, encoding: str, orig_ext: str = '') -> str:
    """Member suffix after the key: ``rgb.jpg`` (orig, with the file's extension), ``depth.npy``, ..."""
    if encoding == 'orig':
        return f'{modality}.{orig_ext.lstrip(".").lower()}'
    if encoding not in _SUFFIX:
        raise ValueError(f"unknown encoding '{encoding}' for modality '{modality}'; expected one of {ENCODINGS}")
    return f'{modality}.{_SUFFIX[encoding]}'


def encode_array(img: torch.Tensor, encoding: str) -> bytes:
    """A decoded (C, H, W) uint8/uint16/int32 image as the bytes of a ``raw`` or ``zlib`` member. int32
    (the widened 16-bit images) is stored as uint16 when its values fit, so nothing is lost."""
    arr = img.numpy()
    if arr.dtype == np.int32:
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f'values {arr.min()}..{arr.max()} do not fit a 16-bit image')
        arr = arr.astype(np.uint16)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getvalue()
    return zlib.compress(data, 1) if encoding == 'zlib' else data


def _decode_orig(data: bytes, colour: bool) -> torch.Tensor:
    """The bytes of an image file -> (C, H, W) tensor, exactly as ``MultiModalImageFolder`` decodes the file
    (torchvision's decoder, PIL for formats it lacks); 16-bit stays uint16."""
    try:
        if _decode_op is None or not data:
            raise RuntimeError('torchvision image decoding is not available' if data else 'empty member')
        return _decode_op(torch.frombuffer(bytearray(data), dtype=torch.uint8), 3 if colour else 0, False)
    except Exception as tv_err:
        try:
            return _pil_to_tensor(io.BytesIO(data), colour)
        except Exception as pil_err:
            raise ImageDecodeError(f'torchvision: {tv_err}; PIL: {pil_err}') from pil_err


# The header np.save writes for a C-ordered array; parsing it with a regular expression instead of
# np.load's ast.literal_eval saves ~0.1 ms per sample of two arrays. Anything else goes through np.load.
_NPY_HEADER = re.compile(rb"\{'descr': '([<|][uif][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}")


def _load_npy(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file's bytes (a writable copy)."""
    if data[:8] == b'\x93NUMPY\x01\x00' and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], 'little')
        match = _NPY_HEADER.match(data, 10, end)
        if match is not None:
            shape = tuple(int(d) for d in match.group(2).split(b',') if d.strip())
            dtype = np.dtype(match.group(1).decode())
            count = math.prod(shape)
            if len(data) - end == count * dtype.itemsize:
                return np.frombuffer(bytearray(memoryview(data)[end:]), dtype=dtype).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _decode_array(data: bytes, encoding: str) -> torch.Tensor:
    if encoding == 'zlib':
        data = zlib.decompress(data)
    arr = _load_npy(data)
    if arr.ndim != 3:
        raise ValueError(f'expected a (C, H, W) array, got shape {arr.shape}')
    return torch.from_numpy(arr)


def decode_member(data: bytes, modality: str, suffix: str, widen_uint16: bool = True) -> torch.Tensor:
    """Decode the member ``<key>.<suffix>`` of ``modality`` -> (C, H, W) tensor with the dtype the folder
    pipeline gives (uint8; 16-bit as int32, or uint16 when not ``widen_uint16``). Raises ImageDecodeError."""
    m = get_modality(modality)
    encoding = {'npy': 'raw', 'npy.zlib': 'zlib'}.get(suffix[len(modality) + 1:], 'orig')
    if encoding == 'orig':
        img = _decode_orig(data, colour=m.decoder == 'rgb')
        if m.decoder != 'rgb' and img.shape[0] != 1:
            raise ImageDecodeError(f'expected a single-channel image, got {img.shape[0]} channels')
    else:
        img = _decode_array(data, encoding)
    if m.bit_depth == 16 and img.dtype == torch.uint8:
        raise ImageDecodeError(f'{modality} is an 8-bit image; expected 16 bits (values are divided by '
                               f'{1 / m.value_scale:g})')
    if widen_uint16 and img.dtype == torch.uint16:
        img = img.to(torch.int32)
    return img


_BRACE = re.compile(r'\{\d+\.\.\d+\}')


def is_shard_source(data_path: Optional[str]) -> bool:
    """True when ``data_path`` names shards: a ``.tar`` path or URL, a brace pattern of them, a ``pipe:``
    command, or a shard manifest (``*.json``)."""
    if not data_path:
        return False
    p = str(data_path).strip()
    return (p.startswith('pipe:') or p.endswith('.tar') or p.endswith('.json') or bool(_BRACE.search(p))
            or bool(re.match(r'^[a-z][a-z0-9+]*://', p)) and not os.path.isdir(p))


def sibling_url(url: str, name: str) -> str:
    """``url`` with its last path component replaced by ``name`` (works for paths, URLs and ``pipe:``
    commands such as ``pipe:aws s3 cp s3://bucket/shards/manifest.json -``)."""
    if url.startswith('pipe:'):
        matches = list(re.finditer(r'[^\s/]+\.(?:json|tar)(?=\s|$)', url))
        if not matches:
            raise ValueError(f"cannot find a file name (*.json or *.tar) to replace in '{url}'")
        return url[:matches[-1].start()] + name + url[matches[-1].end():]
    head, sep, _ = url.rpartition('/')
    return f'{head}{sep}{name}'


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, how many samples it holds (their folder indices, in order), its sha256 and
    its CRC-32 and xxh3-64 (hex digits; '' in manifests written before they were recorded or without the
    ``xxhash`` package)."""
    url: str
    name: str
    indices: tuple
    sha256: str
    bytes: int
    crc32: str = ''
    xxh3: str = ''

    @property
    def num_samples(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest, restricted to the shards a data path selects."""
    source: str
    shards: List[ShardInfo]
    modalities: List[str]
    encodings: Dict[str, str]
    classes: List[str]

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _read_text(url: str) -> str:
    if os.path.exists(url):
        with open(url, encoding='utf-8') as f:
            return f.read()
    from webdataset.gopen import gopen  # local files, pipe: commands, http(s), and the schemes it knows
    with gopen(url, 'rb') as f:
        return f.read().decode('utf-8')


def load_manifest(data_path: str) -> Manifest:
    """The manifest of ``data_path``: the manifest itself (path or URL), or a shard path/URL/brace pattern
    whose ``manifest.json`` lies beside the first shard (then only the named shards are used)."""
    from braceexpand import braceexpand

    path = str(data_path).strip()
    if path.endswith('.json') or (path.startswith('pipe:') and '.json' in path):
        manifest_url, selected = path, None
    else:
        selected = list(braceexpand(path))
        manifest_url = sibling_url(selected[0], MANIFEST_NAME)
    try:
        meta = json.loads(_read_text(manifest_url))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot read the shard manifest '{manifest_url}' (for --data_path '{data_path}'): "
                                f"{err}; write it with tools/make_shards.py") from err
    if meta.get('format') != FORMAT or not meta.get('complete', False):
        raise ValueError(f"'{manifest_url}' is not a complete shard manifest (format {meta.get('format')!r}, "
                         f"complete={meta.get('complete')}); expected format '{FORMAT}' written by "
                         "tools/make_shards.py")
    by_name = {s['name']: s for s in meta['shards']}
    names = [s['name'] for s in meta['shards']]
    if selected is not None:
        names = [_shard_name(u, by_name) for u in selected]
    shards = [ShardInfo(url=sibling_url(manifest_url, n) if selected is None else selected[i], name=n,
                        indices=tuple(by_name[n]['indices']), sha256=by_name[n]['sha256'],
                        bytes=int(by_name[n]['bytes']), crc32=by_name[n].get('crc32', ''),
                        xxh3=by_name[n].get('xxh3', ''))
              for i, n in enumerate(names)]
    return Manifest(manifest_url, shards, list(meta['modalities']), dict(meta['encodings']), list(meta['classes']))


def _shard_name(url: str, by_name: Dict[str, dict]) -> str:
    found = [n for n in by_name if re.search(rf'(^|[/\s]){re.escape(n)}($|\s)', url)]
    if len(found) != 1:
        raise ValueError(f"shard '{url}' is not listed in its manifest (listed: {sorted(by_name)[:3]} ...)")
    return found[0]


def check_modalities(manifest: Manifest, modalities: Sequence[str]) -> None:
    """Raise ValueError when a requested modality is not in the shards."""
    missing = [m for m in modalities if m not in manifest.modalities]
    if missing:
        raise ValueError(f"shards of '{manifest.source}' hold {manifest.modalities}; modality(ies) {missing} "
                         f"are not in them (re-run tools/make_shards.py with --modalities including them)")
