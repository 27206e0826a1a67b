#!/usr/bin/env python
"""Write the synthetic multi-modal scene dataset (rgb, depth, semseg, mask_valid[, normal]).

Example: python tools/make_synthetic_dataset.py --output_dir data/synthetic --num_train 512 --num_val 64
         python tools/make_synthetic_dataset.py --layout taskonomy --output_dir data/synthetic_taskonomy
(--layout taskonomy: the published Taskonomy layout, one folder per task and tiny_{train,val,test}.csv in the
output folder, for run_finetuning_taskonomy.py --data_path; see utils/data/synthetic_taskonomy.py.)
See utils/data/synthetic.py for what the scenes contain and the depth units.
"""
import argparse
import os
import sys


from utils.data.synthetic import make_synthetic_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--output_dir', required=True, help='dataset root; train/ and val/ are created inside')
    parser.add_argument('--layout', default='folders', choices=['folders', 'taskonomy'],
                        help="folders: <split>/<modality>/<class>/; taskonomy: the published Taskonomy layout")
    parser.add_argument('--num_test', type=int, default=64, help='--layout taskonomy: test views')
    parser.add_argument('--num_train', type=int, default=512)
    parser.add_argument('--num_val', type=int, default=64)
    parser.add_argument('--image_size', type=int, default=96)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--normals', action='store_true', help='also write a camera-frame normal modality')
    parser.add_argument('--preview', default='', help='write a PNG of the first 8 training scenes here')
    args = parser.parse_args(argv)
    if args.layout == 'taskonomy':
        from utils.data.synthetic_taskonomy import make_taskonomy_dataset
        counts = make_taskonomy_dataset(args.output_dir, args.num_train, args.num_val, args.num_test,
                                        args.image_size, seed=args.seed)
        print(f"wrote {counts} Taskonomy-layout views of {args.image_size}px to {args.output_dir}")
        return
    info = make_synthetic_dataset(args.output_dir, args.num_train, args.num_val, args.image_size,
                                  seed=args.seed, with_normals=args.normals, verbose=True)
    print(f"wrote {args.num_train} train + {args.num_val} val scenes ({', '.join(info['modalities'])}) "
          f"of {args.image_size}px to {args.output_dir} in {info['seconds']:.1f}s")
    if args.preview:
        from utils.data.datasets import MultiModalImageFolder
        from utils.vis import dataset_grid, save_png_atomic
        if args.normals:  # not a built-in modality; register it so the folder can be read back
            from utils.data.synthetic import register_normal_modality
            register_normal_modality()
        ds = MultiModalImageFolder(os.path.join(args.output_dir, 'train'), info['modalities'])
        save_png_atomic(dataset_grid([ds.load(i) for i in range(min(8, len(ds)))]), args.preview)
        print(f'preview: {args.preview} (columns: {", ".join(info["modalities"])})')


if __name__ == '__main__':
    main()
