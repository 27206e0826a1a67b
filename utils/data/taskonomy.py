"""The Taskonomy data layout of the published fine-tuning script, read as is.

One data root with a folder per task, then per building, and one PNG per view::

    <data_root>/<task>/<building>/point_<point>_view_<view>_domain_<task>.png

``mask_valid`` files live in ``mask_valid/<building>/`` but are named with domain ``depth_zbuffer``. The
samples of a split are the rows of ``<split_dir>/<variant>_<split>.csv`` (columns ``building``, ``point``,
``view``; variant ``tiny`` by default), in file order; ``max_images`` keeps the first N rows.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from utils.data.datasets import decode_file

__all__ = ["SPLIT_COLUMNS", "read_split_csv", "taskonomy_file", "TaskonomyDataset"]

SPLIT_COLUMNS = ("building", "point", "view")


def read_split_csv(path: str) -> list[tuple[str, str, str]]:
    """The (building, point, view) rows of a split CSV; a missing file or column is an error naming it."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        present = sorted(f for f in os.listdir(folder) if f.endswith(".csv")) if os.path.isdir(folder) else []
        raise FileNotFoundError(f"Taskonomy split file '{path}' not found (CSV files in '{folder}': "
                                f"{present or 'none'}); set --split_dir to the folder with <variant>_<split>.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"Taskonomy split file '{path}' lacks column(s) {missing}; expected columns "
                             f"{list(SPLIT_COLUMNS)}, found {reader.fieldnames}")
        return [(r["building"], r["point"], r["view"]) for r in reader]


def taskonomy_file(data_root: str, task: str, building: str, point: str, view: str) -> str:
    """Path of one view of ``task`` (``mask_valid`` files carry the domain ``depth_zbuffer`` in their name)."""
    domain = "depth_zbuffer" if task == "mask_valid" else task
    return os.path.join(data_root, task, building, f"point_{point}_view_{view}_domain_{domain}.png")


class TaskonomyDataset(Dataset):
    """``__getitem__(i) -> (dict task -> Tensor, 0)``: the decoded files of row ``i`` after ``transform``
    (e.g. :class:`utils.data.finetune_transforms.DenseRegressionTransform`); without it (C, H, W) uint8 or
    int32 (16-bit) tensors. The constant 0 stands in for a class index (the dense jobs' batch format).

    Args:
        data_root: the folder holding one sub-folder per task.
        tasks: registered modality names to load (e.g. ``['rgb', 'normal', 'mask_valid']``).
        split: 'train', 'val' or 'test'.
        split_dir: folder of the split CSVs (None: ``data_root``).
        variant: split variant in the file name (``tiny``: the one every Taskonomy config uses).
        max_images: keep the first N rows (None: all).
    """

    def __init__(self, data_root: str, tasks: Sequence[str], split: str, split_dir: str | None = None,
                 variant: str = "tiny", transform: Callable[[Mapping[str, torch.Tensor]], dict] | None = None,
                 max_images: int | None = None):
        if not tasks:
            raise ValueError("TaskonomyDataset needs at least one task")
        self.data_root, self.tasks, self.transform = data_root, list(tasks), transform
        rows = read_split_csv(os.path.join(split_dir or data_root, f"{variant}_{split}.csv"))
        self.rows = rows[:max_images] if max_images is not None else rows
        if not self.rows:
            raise ValueError(f"Taskonomy split '{variant}_{split}' under '{split_dir or data_root}' has no rows")
        for task in self.tasks:  # the first row of every task, so a wrong root or task fails here, not mid-epoch
            path = self.path(0, task)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Taskonomy file for task '{task}' not found: '{path}' (layout "
                                        f"<data_root>/<task>/<building>/point_<p>_view_<v>_domain_<task>.png)")

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, index: int, task: str) -> str:
        """File of ``task`` for row ``index``."""
        return taskonomy_file(self.data_root, task, *self.rows[index])

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Decoded, untransformed tensors of row ``index``."""
        return {t: decode_file(self.path(index, t), t) for t in self.tasks}

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        sample = self.load(index)
        return (self.transform(sample) if self.transform is not None else sample), 0
