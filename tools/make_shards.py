#!/usr/bin/env python
"""Write a multi-modal split folder (``<split>/<modality>/<class>/<name>.<ext>``, e.g. the output of
tools/pseudo_label.py) as tar shards for streaming, with a manifest of sample counts and checksums (sha256,
CRC-32 and xxh3; the loader checks the xxh3 while streaming).

    python tools/make_shards.py --data_path /data/imagenet_pl/train --output_dir /data/shards/train \
        --modalities rgb-depth-semseg --encoding fast --shard_size 1000 --num_workers 16

Then train with ``--data_path /data/shards/train/manifest.json`` (or a brace pattern of the shards).
``--encoding orig`` keeps every file byte for byte (the loader decodes them exactly as the folder pipeline
does); ``fast`` stores 16-bit depth as a raw .npy and label maps as deflated .npy (see utils/data/shard_format.py
for what each costs). Interrupted? Run the same command again: shards whose checksums match are kept.

    python tools/make_shards.py --verify /data/shards/train/manifest.json   # re-check every shard's size and checksums
"""
import argparse
import sys

from tools.lib.shard_writer import ShardPlan, make_shards, resolve_encodings, verify_shards
from utils.data.modalities import parse_domains


def _pairs(text: str, option: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(','))):
        if ':' not in item:
            raise SystemExit(f"{option}: expected 'modality:value' items, got '{item}'")
        k, v = item.split(':', 1)
        out[k.strip()] = v.strip()
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--verify', default='', metavar='MANIFEST',
                   help='only check the shards of this manifest (size and checksums); exit status 1 on a mismatch')
    p.add_argument('--data_path', help='split folder holding <modality>/<class>/<files>')
    p.add_argument('--output_dir', help='folder for the shards and manifest.json')
    p.add_argument('--modalities', default='rgb-depth-semseg', help="e.g. 'rgb-depth-semseg'")
    p.add_argument('--prefixes', default='', help="folder prefixes, e.g. 'depth:pseudo_' reads pseudo_depth/")
    p.add_argument('--encoding', default='fast', choices=['orig', 'fast'])
    p.add_argument('--encodings', default='', help="per-modality overrides, e.g. 'depth:zlib,semseg:orig'")
    p.add_argument('--shard_size', type=int, default=1000, help='samples per shard (ImageNet: ~0.3-0.5 GB)')
    p.add_argument('--prefix', default='train', help='shard file names: <prefix>-000000.tar, ...')
    p.add_argument('--seed', type=int, default=0, help='seed of the sample order across shards')
    p.add_argument('--num_workers', type=int, default=0, help='processes writing shards (0: this one)')
    p.add_argument('--skip_bad', action='store_true',
                   help='leave unreadable samples out (listed in the manifest) instead of stopping')
    args = p.parse_args(argv)
    if args.verify:
        if verify_shards(args.verify):
            sys.exit(1)
        return args.verify
    if not args.data_path or not args.output_dir:
        p.error('--data_path and --output_dir are required (or --verify MANIFEST)')
    modalities = parse_domains(args.modalities)
    plan = ShardPlan(args.data_path, args.output_dir, modalities,
                     resolve_encodings(modalities, args.encoding, _pairs(args.encodings, '--encodings')),
                     prefixes=_pairs(args.prefixes, '--prefixes'), shard_size=args.shard_size, seed=args.seed,
                     prefix=args.prefix, skip_bad=args.skip_bad)
    return make_shards(plan, num_workers=args.num_workers)


if __name__ == '__main__':
    main()
