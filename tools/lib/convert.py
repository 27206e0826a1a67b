"""The load -> check -> convert -> verify -> save -> report steps both checkpoint converters share
(tools/multimae2vit_converter.py, tools/vit2multimae_converter.py)."""
import sys
from typing import Callable, Dict, List, Optional

import torch

from utils.io import save_weights_file
from utils.weights import load_weights_with_metadata

StateDict = Dict[str, torch.Tensor]


def convert_weights_file(src: str, dst: str, *, convert: Callable[[StateDict], StateDict],
                         is_converted: Callable[[StateDict], bool], converted_hint: str,
                         not_converted: Callable[[StateDict], List[str]],
                         build_matching: Optional[Callable[[StateDict], torch.nn.Module]],
                         src_kind: str, dst_kind: str, verified_into: str) -> None:
    """Convert the weights in `src` with `convert` and write them to `dst` (suffix picks the format),
    keeping the checkpoint's non-tensor entries.

    Exits with a message naming `src` when it already holds `dst_kind` weights (`is_converted`; the
    message adds `converted_hint`, e.g. the key prefixes seen) or when `convert` raises ValueError.
    `build_matching`, unless None, builds a model (on the meta device) that the result must load into
    with strict=True. Prints one line of counts, then the source keys `not_converted` lists, the
    checkpoint entries dropped and, when verified, what it was verified against (`verified_into`)."""
    sd, meta, dropped = load_weights_with_metadata(src)
    if is_converted(sd):
        sys.exit(f"{src} already holds {dst_kind} weights ({converted_hint}); nothing to convert")
    try:
        out = convert(sd)
    except ValueError as e:
        sys.exit(f"{src}: {e}")
    ignored = not_converted(sd)
    if build_matching is not None:
        build_matching(out).load_state_dict(out, strict=True, assign=True)
    save_weights_file(out, dst, extra=meta)
    print(f"{src}: {len(sd)} {src_kind} tensors -> {len(out)} {dst_kind} tensors in {dst}"
          + (f"\n  not converted (no {dst_kind} counterpart): {', '.join(ignored)}" if ignored else "")
          + (f"\n  checkpoint entries dropped: {', '.join(dropped)}" if dropped else "")
          + ("" if build_matching is None else f"\n  verified: loads with strict=True into {verified_into}"))
