#!/usr/bin/env python
"""Interactive MultiMAE demos in the browser, computed live by the model (or exported as a static page).

    python tools/demo_app.py --checkpoint output/demo/checkpoint-last.pth --data_path data/synthetic/val
    python tools/demo_app.py --checkpoint ckpt.pth --data_path data/synthetic/val --export output/demo_page

Four tabs: random Dirichlet masks (cycle images, resample), a slider for the number of visible tokens, a
slider per input modality for its share of the visible tokens, and a hue slider on one of two visible RGB
patches with the full depth map given. Each shows masked inputs, predictions with the visible patches
pasted back and references for every modality (tools/lib/demo_engine.py). An RGB image can be uploaded
with optional depth / semseg files; missing ones are pseudo-labelled when `--depth_labeller` /
`--semseg_labeller` give labeller weights (tools/lib/pseudo_labelers.py), otherwise the model runs
without them and the page says so.

The live app needs Gradio (requirements-dev.txt) and serves on 127.0.0.1 only, analytics off, no share
link. `--export DIR` needs no Gradio: it writes DIR/index.html with every slider position precomputed.
"""
import json
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from utils.config import create_parser, parse_args  # noqa: E402


def get_args_parser():
    p = create_parser("MultiMAE interactive demos (Gradio app or static page)")
    p.add_argument("--checkpoint", type=str, required=True, help="pre-training checkpoint (.pth / .safetensors)")
    p.add_argument("--data_path", type=str, default="", help="split root with rgb/ (and depth/, semseg/) folders")
    p.add_argument("--num_images", type=int, default=8, help="data-set images offered on the page")
    p.add_argument("--export", type=str, default="", metavar="DIR", help="write DIR/index.html instead of serving")
    p.add_argument("--num_random", type=int, default=4, help="precomputed random masks per image (export)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--tile_size", type=int, default=None,
                   help="pixels per picture tile (default: >= 128 in the app, the image size in --export)")
    p.add_argument("--depth_labeller", type=str, default="", help="weights of a depth pseudo-labeller")
    p.add_argument("--semseg_labeller", type=str, default="", help="weights of a semseg pseudo-labeller")
    p.add_argument("--labeller", type=str, default="finetuned", help="labeller kind (tools/pseudo_label.py)")
    p.add_argument("--labeller_kwargs", type=str, default="{}", help="extra labeller options as JSON")
    return p


def build_labellers(args, device):
    """{modality: Labeller} for the labeller weights given on the command line."""
    from tools.lib.pseudo_labelers import build_labeller

    kwargs = json.loads(args.labeller_kwargs)
    out = {}
    for task, weights in (("depth", args.depth_labeller), ("semseg", args.semseg_labeller)):
        if weights:
            out[task] = build_labeller(args.labeller, task, weights, **kwargs).to(device)
    return out


def dataset_files(data_path: str, num_images: int, domains: list) -> list:
    """[{modality: path}] for up to num_images images of the split (tools/visualize.py's pairing)."""
    import argparse

    from tools.visualize import collect_samples

    if not data_path:
        return []
    ns = argparse.Namespace(images=[], depth=[], semseg=[], data_path=data_path, num_images=num_images)
    return collect_samples(ns, domains)


def main(argv=None):
    from tools.lib.demo_engine import DemoEngine, DemoError
    from utils.dist import resolve_device

    args = parse_args(get_args_parser(), argv)
    device = resolve_device(args.device)
    try:
        engine = DemoEngine.from_checkpoint(args.checkpoint, device, labellers=build_labellers(args, device))
        if args.tile_size or args.export:  # the static page scales native-size pictures up in the browser
            engine.set_tile(args.tile_size or engine.cfg.input_size)
    except (DemoError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"demo_app: {e}") from None
    files = dataset_files(args.data_path, args.num_images, engine.domains)
    if args.export:
        from tools.lib.demo_export import export_page
        from tools.lib.demo_gradio import DemoState  # only for loading the samples; imports no Gradio

        samples = DemoState(engine, files, device).samples
        path = export_page(engine, samples, args.export, args.num_random)
        print(f"wrote {path} ({os.path.getsize(path) / 2 ** 20:.1f} MiB, {len(samples)} images)")
        return path
    from tools.lib.demo_gradio import DemoState, build_app, launch

    if not files:
        print("no --data_path images: upload one on the page", file=sys.stderr)
    state = DemoState(engine, files, device)
    print(f"MultiMAE demos on http://127.0.0.1:{args.port}/ (Ctrl+C stops)")
    launch(build_app(state), args.port)


if __name__ == "__main__":
    main()
