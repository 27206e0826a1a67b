"""Name helpers of the configuration layer: hyphen lists and "did you mean" suggestions."""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence

__all__ = ["split_list", "closest"]


def split_list(value: str | Sequence[str] | None, sep: str = '-') -> list[str]:
    """Hyphen-separated lists: ``'rgb-depth-semseg' -> ['rgb', 'depth', 'semseg']``; ``''``/None -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split(sep) if v]
    return list(value)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (difflib), or None when nothing is similar."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
