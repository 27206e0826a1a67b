#!/usr/bin/env python
"""Turn the Taskonomy release into the multi-modal folder layout, by copies or symbolic links.

    python tools/prepare_taskonomy.py --source /data/taskonomy --split_csv train_val_test_tiny.csv \
        --save_path /data/taskonomy_mm --link

Source: the Taskonomy data set (Taskonomy project page; hundreds of GB for the "tiny" split over all
domains, terabytes for the full set: fetch only the domains you need), downloaded with the Omnidata
download tool into one folder per domain and building::

    <source>/<domain>/taskonomy/<building>/point_<p>_view_<v>_domain_<domain>.png
        domain in rgb, depth_zbuffer, depth_euclidean, normal, principal_curvature, reshading, edge_texture,
        edge_occlusion, keypoints2d, keypoints3d, segment_unsup2d, segment_unsup25d, mask_valid, ...

(`--subfolder ''` when the buildings sit directly below the domain folders), and the split file of the
Taskonomy repository (`train_val_test_{tiny,medium,full,fullplus}.csv`: one row per building, columns
id, train, val, test holding 1 or 0). Writes, for every building of a split and every sample (point and
view) present in `rgb`::

    save_path/{train,val,test}/<task>/<building>/point_<p>_view_<v>.png

The files are unchanged (16-bit depth in 1/512 m, 8-bit normals, ...): the Taskonomy configs' `taskonomy`
augmentation scales each task (`TASKONOMY_SCALING` in utils/data/finetune_transforms.py). A `mask_valid`
file may carry the domain name `mask_valid` or `depth_zbuffer` in its name; both are accepted.

Nothing is written before every input is checked: every domain folder of every building of the selected
splits and every file of every sample must exist, else the tool stops naming what is missing, so `--link`
never leaves a dangling link. `--skip_missing_buildings` leaves out buildings with no folder in any task
(a partial download); `--skip_incomplete` leaves out samples missing in some task. Both say how many.
"""
from __future__ import annotations

import argparse
import os
import re

from tools.lib.prepare import PrepareError, place_file, prepare_parser, read_csv, require_dirs, run_jobs

DEFAULT_TASKS = ("rgb", "mask_valid", "normal", "principal_curvature", "depth_zbuffer", "edge_texture",
                 "edge_occlusion", "keypoints2d", "keypoints3d", "reshading")
SPLITS = ("train", "val", "test")
_RGB_NAME = re.compile(r"^(point_\d+_view_\d+)_domain_rgb\.png$")
# Domain names a task's files may carry (first found wins).
FILE_DOMAINS = {"mask_valid": ("mask_valid", "depth_zbuffer")}


def split_buildings(rows: list[dict], splits) -> dict[str, list[str]]:
    """{split: [building, ...]} from the rows of a Taskonomy split CSV (columns id, train, val, test)."""
    out: dict[str, list[str]] = {s: [] for s in splits}
    for i, row in enumerate(rows, start=2):
        for s in splits:
            if row[s] not in ("0", "1"):
                raise PrepareError(f"split CSV line {i}: column {s!r} is {row[s]!r}; expected 1 or 0")
            if row[s] == "1":
                out[s].append(row["id"])
    return out


def building_dir(source: str, subfolder: str, task: str, building: str) -> str:
    return os.path.join(source, task, subfolder, building) if subfolder else os.path.join(source, task, building)


def _present(buildings: dict[str, list[str]], source: str, subfolder: str, tasks, skip: bool) -> dict[str, list[str]]:
    """Drop (with ``skip``) the buildings absent from every task; stop naming any other missing folder."""
    wanted = sorted({b for bs in buildings.values() for b in bs})
    absent = {b for b in wanted if not any(os.path.isdir(building_dir(source, subfolder, t, b)) for t in tasks)}
    if absent and skip:
        print(f"skipping {len(absent)} building(s) of the split CSV absent under {source}: "
              f"{', '.join(sorted(absent)[:5])}{' ...' if len(absent) > 5 else ''}")
        buildings = {s: [b for b in bs if b not in absent] for s, bs in buildings.items()}
    require_dirs([building_dir(source, subfolder, t, b) for b in wanted if not (skip and b in absent) for t in tasks],
                 hint=f"expected <source>/<task>/{subfolder + '/' if subfolder else ''}<building>/ for every task "
                      f"and every building of the split CSV; --skip_missing_buildings leaves out buildings "
                      "that have no folder at all")
    return buildings


def _source_file(source: str, subfolder: str, task: str, building: str, sample: str) -> str | None:
    folder = building_dir(source, subfolder, task, building)
    for domain in FILE_DOMAINS.get(task, (task,)):
        path = os.path.join(folder, f"{sample}_domain_{domain}.png")
        if os.path.isfile(path):
            return path
    return None


def collect(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(source file, destination file) of every task of every sample, after every check."""
    tasks = list(dict.fromkeys(["rgb", *args.tasks]))
    require_dirs([args.source], hint="--source: the folder holding one folder per domain")
    buildings = split_buildings(read_csv(args.split_csv, ["id", *args.splits]), args.splits)
    buildings = _present(buildings, args.source, args.subfolder, tasks, args.skip_missing_buildings)
    pairs, missing, dropped = [], [], 0
    for split, names in buildings.items():
        for b in names:
            rgb_dir = building_dir(args.source, args.subfolder, "rgb", b)
            for sample in sorted(m.group(1) for m in map(_RGB_NAME.match, os.listdir(rgb_dir)) if m):
                found = {t: _source_file(args.source, args.subfolder, t, b, sample) for t in tasks}
                absent = [t for t, p in found.items() if p is None]
                if absent:
                    dropped += 1
                    missing += [os.path.join(building_dir(args.source, args.subfolder, t, b),
                                             f"{sample}_domain_{FILE_DOMAINS.get(t, (t,))[0]}.png") for t in absent]
                    continue
                pairs += [(p, os.path.join(args.save_path, split, t, b, f"{sample}.png")) for t, p in found.items()]
    if missing and not args.skip_incomplete:
        raise PrepareError(f"{len(missing)} file(s) missing, e.g. {', '.join(repr(m) for m in missing[:3])} "
                           f"(every task needs the file of every rgb sample; --skip_incomplete leaves out the "
                           f"{dropped} incomplete sample(s))")
    if dropped:
        print(f"skipping {dropped} sample(s) missing in some task")
    if not pairs:
        raise PrepareError(f"no complete sample found for splits {list(args.splits)} under --source '{args.source}'")
    return pairs


def prepare(args: argparse.Namespace) -> dict[str, int]:
    """Check everything, then copy or link every file; returns the number of samples per split."""
    pairs = collect(args)
    run_jobs(place_file, ((src, dst, args.link) for src, dst in pairs), args.num_threads)
    counts = {}
    for split in args.splits:
        rgb_root = os.path.join(args.save_path, split, "rgb") + os.sep
        counts[split] = sum(dst.startswith(rgb_root) for _, dst in pairs)
        print(f"{split}: {counts[split]} samples -> {os.path.join(args.save_path, split)}")
    return counts


def main(argv=None) -> dict[str, int]:
    p = prepare_parser(__doc__, {"--source": "folder holding one folder per domain (rgb/, normal/, ...)",
                                 "--split_csv": "Taskonomy split file: columns id, train, val, test (1/0)"},
                       "output root; one folder per split is created inside", "parallel copies", link=True)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="domains to prepare (rgb always)")
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--subfolder", default="taskonomy", help="folder between domain and building ('' = none)")
    p.add_argument("--skip_missing_buildings", action="store_true", help="leave out buildings not downloaded")
    p.add_argument("--skip_incomplete", action="store_true", help="leave out samples missing in some task")
    return prepare(p.parse_args(argv))


if __name__ == "__main__":
    main()
