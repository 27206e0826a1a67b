"""Multi-modal image folders: ``root/<prefix><modality>/<class>/<name>.<ext>``, paired by file name.

Files of different modalities are paired by their path relative to the modality folder without
extension, never by sorted position (one missing or extra file would shift every later pair), and every
mismatch is reported with the offending path and modality.
"""
from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

try:  # torchvision's image decoders are deprecated since 0.29 (superseded by torchcodec); PIL is the fallback
    from torchvision.io import ImageReadMode
    # The registered op itself: the Python wrapper logs API usage and issues a deprecation warning on
    # every call (~0.1 ms per sample of three files, as much as decoding the semseg PNG).
    _decode_op = torch.ops.image.decode_image
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - depends on the installed torchvision
    _decode_op = None

from utils.data.constants import IMG_EXTENSIONS
from utils.data.modalities import get_modality

__all__ = ['MultiModalImageFolder', 'decode_file', 'check_label_range', 'DECODERS', 'BadSampleError',
           'ImageDecodeError']


class BadSampleError(ValueError):
    """One sample cannot be used: a file is unreadable, of the wrong kind, or inconsistent with the other
    modalities. The message names the file and what was expected. ``--on_bad_sample skip`` catches
    exactly this type (a bug elsewhere in the data pipeline still stops the run)."""


class ImageDecodeError(BadSampleError, RuntimeError):
    """A file could not be read or decoded as the expected kind of image."""


def _pil_to_tensor(path: str, colour: bool) -> torch.Tensor:
    with Image.open(path) as im:
        if colour:
            im = im.convert('RGB')
        elif im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N'):
            im = im.convert('I')
        arr = np.array(im)
    if arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.unsqueeze(0)


def _read_bytes(path: str) -> torch.Tensor:
    """The file as a 1-D uint8 tensor (a plain read: cheaper than ``torchvision.io.read_file``)."""
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    if not data:
        raise ValueError('empty file')
    return torch.frombuffer(data, dtype=torch.uint8)


def _decode(path: str, colour: bool, widen_uint16: bool = True) -> torch.Tensor:
    """Decode with torchvision (uint8/uint16), falling back to PIL for formats it lacks (e.g. JPX, TIFF).
    16-bit images come out int32 unless ``widen_uint16`` is False (then uint16, as decoded)."""
    try:
        if _decode_op is None:
            raise RuntimeError('torchvision image decoding is not available')
        mode = ImageReadMode.RGB if colour else ImageReadMode.UNCHANGED
        img = _decode_op(_read_bytes(path), mode.value, False)
    except Exception as tv_err:  # unsupported format, corrupt file, or a warning turned into an error
        try:
            img = _pil_to_tensor(path, colour)
        except Exception as pil_err:  # PIL raises many exception types for bad files
            raise ImageDecodeError(f"torchvision: {tv_err}; PIL: {pil_err}") from pil_err
    if widen_uint16 and img.dtype == torch.uint16:  # few torch ops support uint16; int32 holds it losslessly
        img = img.to(torch.int32)
    return img


def _decode_rgb(path: str) -> torch.Tensor:
    return _decode(path, colour=True)


def _decode_single(path: str, widen_uint16: bool = True) -> torch.Tensor:
    img = _decode(path, colour=False, widen_uint16=widen_uint16)
    if img.shape[0] != 1:
        raise ImageDecodeError(f"expected a single-channel image, got {img.shape[0]} channels")
    return img


DECODERS: Dict[str, Callable[[str], torch.Tensor]] = {
    'rgb': _decode_rgb, 'gray': _decode_single, 'label': _decode_single, 'mask': _decode_single,
}


def decode_file(path: str, modality: str, widen_uint16: bool = True) -> torch.Tensor:
    """Load ``path`` as ``modality`` -> (C, H, W) tensor: uint8 for 8-bit files, int32 for 16-bit files
    (``widen_uint16=False``: single-channel 16-bit files decoded by torchvision stay uint16, for a
    consumer that converts them itself, e.g. ``PretrainTransform`` after cropping).

    Raises ImageDecodeError naming the modality and path if the file is missing, corrupt or of the
    wrong kind.
    """
    m = get_modality(modality)
    decoder = DECODERS[m.decoder] if isinstance(m.decoder, str) else m.decoder
    if not widen_uint16 and m.decoder == 'gray':
        decoder = partial(_decode_single, widen_uint16=False)
    try:
        img = decoder(path)
    except Exception as err:
        raise ImageDecodeError(f"cannot read {modality} file '{path}': {err}") from err
    if m.bit_depth == 16 and img.dtype == torch.uint8:
        raise ImageDecodeError(f"{modality} file '{path}' is an 8-bit image; expected a 16-bit single-channel "
                               f"PNG (values are divided by {1 / m.value_scale:g}, so 8-bit data would come out "
                               "256x too small)")
    return img


def check_label_range(img: torch.Tensor, path: str, modality: str, num_classes: int,
                      allowed: Sequence[int] = ()) -> None:
    """Raise BadSampleError when the label map ``img`` holds an id outside ``0..num_classes-1`` and
    ``allowed`` (e.g. the ignore value 255)."""
    if int(img.max()) < num_classes:  # the common case, one reduction instead of a mask per allowed id
        return
    bad = img >= num_classes
    for value in allowed:
        bad &= img != value
    if bool(bad.any()):
        ids = sorted({int(v) for v in img[bad].unique()[:5]})
        extra = f" (or {', '.join(map(str, allowed))})" if allowed else ''
        raise BadSampleError(f"{modality} file '{path}' holds class id(s) {ids} out of range; expected ids "
                             f"0..{num_classes - 1}{extra} for {num_classes} classes")


def _scan_modality(folder: str, classes: Sequence[str], modality: str) -> Dict[Tuple[str, str], str]:
    """Map (class, relative path without extension) -> file path for every image under ``folder``."""
    found: Dict[Tuple[str, str], str] = {}
    for cls in classes:
        cls_dir = os.path.join(folder, cls)
        if not os.path.isdir(cls_dir):
            continue
        for dirpath, dirnames, filenames in os.walk(cls_dir, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in IMG_EXTENSIONS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, stem), cls_dir).replace(os.sep, '/')
                path = os.path.join(dirpath, fname)
                if (cls, rel) in found:
                    raise ValueError(f"two {modality} files for sample '{cls}/{rel}': "
                                     f"'{found[(cls, rel)]}' and '{path}'")
                found[(cls, rel)] = path
    return found


def _describe_missing(missing, modality: str, folder: str, found: Dict[str, Dict]) -> str:
    examples = []
    for cls, rel in sorted(missing)[:3]:
        other, path = next((o, f[(cls, rel)]) for o, f in found.items() if (cls, rel) in f)
        examples.append(f"'{folder}/{cls}/{rel}.*' (the {other} file is '{path}')")
    return f"{len(missing)} {modality} file(s) missing, e.g. {', '.join(examples)}"


class MultiModalImageFolder(Dataset):
    """Multi-modal folder dataset; ``__getitem__(i) -> (dict modality -> Tensor, class_index)``.

    Layout ``root/<prefix><modality>/<class>/<name>.<ext>``; classes are the sorted
    sub-folders of the first modality. Without ``transform`` the tensors are the decoded files
    ((C, H, W), uint8 or int32 for 16-bit).

    Args:
        root: split folder, e.g. ``data/synthetic/train``.
        modalities: registered modality names; the first one defines the classes.
        transform: callable on the dict of tensors (e.g. ``PretrainTransform``).
        max_images: keep this many samples, chosen by a fixed permutation (seed 0, as published)
            without touching the global numpy RNG.
        prefixes: folder prefix per modality, e.g. ``{'depth': 'pseudo_'}`` reads ``pseudo_depth/``.
        strict: if True every sample must exist in every modality (else ValueError naming the missing
            files); if False, samples missing in some modality are dropped with a warning.
        label_ranges: ``{modality: (num_classes, allowed_extra_ids)}`` -- label maps are checked at load
            time, e.g. ``{'semseg': (133, ())}`` when semseg feeds an embedding of 133 rows.

    Per-sample problems (unreadable file, 8-bit depth, label id out of range, modalities of different
    sizes) raise :class:`BadSampleError` naming the file at load time; folder problems (missing modality
    folder or file, empty folder) raise at construction.
    """

    def __init__(self, root: str, modalities: Sequence[str], transform: Optional[Callable] = None,
                 max_images: Optional[int] = None, prefixes: Optional[Dict[str, str]] = None,
                 strict: bool = True, label_ranges: Optional[Dict[str, Tuple[int, Sequence[int]]]] = None):
        if not modalities:
            raise ValueError('MultiModalImageFolder needs at least one modality')
        self.root, self.modalities, self.transform = root, list(modalities), transform
        self.label_ranges = {m: (int(n), tuple(extra)) for m, (n, extra) in (label_ranges or {}).items()
                             if m in modalities}
        prefixes = prefixes or {}
        for m in self.modalities:
            get_modality(m)
        self.folders = {m: os.path.join(root, prefixes.get(m, '') + m) for m in self.modalities}
        for m, folder in self.folders.items():
            if not os.path.isdir(folder):
                present = sorted(os.listdir(root)) if os.path.isdir(root) else []
                raise FileNotFoundError(f"folder for modality '{m}' not found: '{folder}' "
                                        f"(present in '{root}': {present or 'nothing'})")
        ref = self.modalities[0]
        self.classes = sorted(e.name for e in os.scandir(self.folders[ref]) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"no class sub-folders in '{self.folders[ref]}' (modality '{ref}')")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        found = {m: _scan_modality(self.folders[m], self.classes, m) for m in self.modalities}
        for m in self.modalities:
            if not found[m]:
                raise FileNotFoundError(f"no image files ({', '.join(IMG_EXTENSIONS)}) for modality '{m}' "
                                        f"under '{self.folders[m]}/<class>/'")
        keys = self._pair(found, strict)
        if max_images is not None and max_images < len(keys):
            keys = [keys[i] for i in np.random.RandomState(0).permutation(len(keys))[:max_images]]
        self.samples: List[Tuple[Dict[str, str], int]] = [
            ({m: found[m][k] for m in self.modalities}, self.class_to_idx[k[0]]) for k in keys]
        self.targets = [t for _, t in self.samples]
        # A transform that converts dense modalities (depth) to float right after cropping says so
        # (``accepts_uint16_dense``, e.g. PretrainTransform): widening the whole decoded image to int32
        # first would be a wasted pass.
        narrow = bool(getattr(transform, 'accepts_uint16_dense', False))
        self._narrow = frozenset(m for m in self.modalities if narrow and get_modality(m).kind == 'dense')

    def _pair(self, found: Dict[str, Dict], strict: bool) -> List[Tuple[str, str]]:
        all_keys = set().union(*(found[m].keys() for m in self.modalities))
        problems = [_describe_missing(all_keys - found[m].keys(), m, self.folders[m], found)
                    for m in self.modalities if all_keys - found[m].keys()]
        if problems:
            if strict:
                raise ValueError(f"modalities under '{self.root}' do not pair up by file name: "
                                 + '; '.join(problems))
            warnings.warn(f"dropping samples that are not present in every modality: {'; '.join(problems)}")
            all_keys = set.intersection(*(set(found[m]) for m in self.modalities))
            if not all_keys:
                raise ValueError(f"no sample under '{self.root}' exists in all of {self.modalities}")
        return sorted(all_keys)

    def __len__(self) -> int:
        return len(self.samples)

    def samples_paths(self, index: int) -> Dict[str, str]:
        """File path of every modality of sample ``index``."""
        return dict(self.samples[index][0])

    def load(self, index: int) -> Dict[str, torch.Tensor]:
        """Decoded, untransformed tensors of sample ``index`` after checking that their sizes agree."""
        paths, _ = self.samples[index]
        sample = {m: decode_file(p, m, widen_uint16=m not in self._narrow) for m, p in paths.items()}
        sizes = {m: tuple(t.shape[-2:]) for m, t in sample.items()}
        if len(set(sizes.values())) > 1:
            detail = ', '.join(f"{m} {h}x{w} ('{paths[m]}')" for m, (h, w) in sizes.items())
            raise BadSampleError(f"sample {index} has modalities of different sizes (HxW): {detail}; "
                                 f"expected the same size in every modality")
        for m, (num_classes, extra) in self.label_ranges.items():
            check_label_range(sample[m], paths[m], m, num_classes, extra)
        return sample

    def __getitem__(self, index: int) -> Tuple[Dict[str, torch.Tensor], int]:
        sample = self.load(index)
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, self.samples[index][1]
