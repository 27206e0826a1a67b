#!/usr/bin/env python
"""Turn the ADE20K scene-parsing release (ADEChallengeData2016) into the multi-modal folder layout.

    python tools/prepare_ade20k.py --source /data/ADEChallengeData2016 --save_path /data/ade20k [--link]

Source: `ADEChallengeData2016.zip` (about 0.9 GB; 20,210 training and 2,000 validation images) from the
MIT Scene Parsing Benchmark (SceneParsing / ADE20K project pages), unpacked::

    ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_NNNNNNNN.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_NNNNNNNN.png
        8-bit single-channel labels: 0 = other / void, 1..150 = the 150 classes

Writes (training -> train, validation -> val; the files themselves are unchanged)::

    save_path/{train,val}/rgb/data/ADE_..._NNNNNNNN.jpg
    save_path/{train,val}/semseg/data/ADE_..._NNNNNNNN.png

The ADE20K configs (cfgs/finetune/semseg/ade/) set `num_classes: 150` and `seg_reduce_zero_label: True`:
label 0 is ignored and 1..150 become 0..149 at load time, so the labels are kept as released. Every image
must have its annotation (and the other way round) and every annotation must be an 8-bit single-channel
PNG (the header is checked); all checks run before anything is written. `--link` makes symbolic links to
the release instead of copies.
"""
from __future__ import annotations

import os

from tools.lib.prepare import PrepareError, place_file, prepare_parser, require_dirs, run_jobs

SPLITS = {"training": "train", "validation": "val"}


def _stems(folder: str, ext: str) -> dict[str, str]:
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(ext)}


def check_annotation(path: str) -> None:
    """Stop unless ``path`` is an 8-bit single-channel (grey or palette) PNG."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, fmt = im.mode, im.format
    except Exception as e:  # PIL raises many types for unreadable files
        raise PrepareError(f"annotation '{path}' cannot be read as an image: {e}") from e
    if fmt != "PNG" or mode not in ("L", "P"):
        raise PrepareError(f"annotation '{path}' is a {fmt} image of mode {mode}; expected an 8-bit "
                           "single-channel PNG of class ids (0 = other, 1..150)")


def collect(source: str) -> dict[str, list[tuple[str, str]]]:
    """{'train': [(image path, annotation path), ...], 'val': [...]} after checking the release layout."""
    require_dirs([os.path.join(source, kind, split) for kind in ("images", "annotations") for split in SPLITS],
                 hint=f"expected the unpacked ADEChallengeData2016 release under --source '{source}': "
                      "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png")
    pairs = {}
    for split, out_split in SPLITS.items():
        images = _stems(os.path.join(source, "images", split), ".jpg")
        labels = _stems(os.path.join(source, "annotations", split), ".png")
        if not images:
            raise PrepareError(f"no .jpg images in '{os.path.join(source, 'images', split)}'")
        for missing, present, kind in ((images.keys() - labels.keys(), images, "annotation"),
                                       (labels.keys() - images.keys(), labels, "image")):
            if missing:
                example = present[sorted(missing)[0]]
                raise PrepareError(f"{len(missing)} {split} file(s) without their {kind}, e.g. '{example}' "
                                   f"(expected the same name under {'annotations' if kind == 'annotation' else 'images'}"
                                   f"/{split}/)")
        pairs[out_split] = [(images[s], labels[s]) for s in sorted(images)]
    return pairs


def prepare(source: str, save_path: str, link: bool = False, num_threads: int = 8) -> dict[str, int]:
    """Check the whole release, then place every image and annotation; returns images per split."""
    pairs = collect(source)
    run_jobs(check_annotation, ((lab,) for split in pairs.values() for _, lab in split), num_threads)
    counts = {}
    for split, items in pairs.items():
        root = os.path.join(save_path, split)
        jobs = [(src, os.path.join(root, modality, "data", os.path.basename(src)), link)
                for img, lab in items for src, modality in ((img, "rgb"), (lab, "semseg"))]
        run_jobs(place_file, jobs, num_threads)
        counts[split] = len(items)
        print(f"{split}: {len(items)} images -> {root}")
    return counts


def main(argv=None) -> dict[str, int]:
    p = prepare_parser(__doc__, {"--source": "the unpacked ADEChallengeData2016 folder"},
                       "output root; train/ and val/ are created inside", "parallel file checks and copies", link=True)
    args = p.parse_args(argv)
    return prepare(args.source, args.save_path, args.link, args.num_threads)


if __name__ == "__main__":
    main()
