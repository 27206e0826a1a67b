#!/usr/bin/env python
"""Turn a sharded checkpoint of an ``--fsdp`` run (a DCP directory) into the usual single file.

    python tools/export_checkpoint.py output/pretrain/checkpoint-last.pth output/pretrain/checkpoint-export.pth

The file holds ``model``, ``optimizer``, the extra modules (``loss_balancer``), ``epoch``, ``args`` and the
rest of the trainer state, exactly as a DDP run would have written it: the converters
(tools/multimae2vit_converter.py), ``--finetune`` and ``--resume`` read it. Runs in one process on the CPU.
"""
from __future__ import annotations

import argparse
import sys

from utils.checkpoint import CheckpointError
from utils.engine.dcp import export_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="sharded checkpoint directory (e.g. <output_dir>/checkpoint-last.pth)")
    p.add_argument("output", help="single-file checkpoint to write (.pth)")
    args = p.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.output)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
