#!/usr/bin/env python
"""Demo figures of a pre-trained MultiMAE from the command line: masked reconstruction, cross-modal
prediction and a colour edit, as PNGs.

    python tools/visualize.py --checkpoint output/demo/checkpoint-last.pth \
        --data_path data/synthetic/val --num_images 4 --output_dir output/vis
    python tools/visualize.py --checkpoint ckpt.pth --images photo1.jpg photo2.jpg --depth depth_folder/

Figures (one row per image; hidden patches grey; depth colour-mapped near = bright, semseg as palette):
* masked.png      -- masked input / prediction / reference per modality, for `--num_visible` visible tokens
                     split across the modalities by a Dirichlet(`--alphas`) draw (as in pre-training) or
                     fixed per-modality counts (`--visible_per_modality rgb=8 depth=8 semseg=0`).
* from_<m>.png    -- every other modality predicted from modality m alone (RGB from depth, depth from RGB,
                     RGB from semseg, ...).
* hue_edit.png    -- full depth + `--hue_num_visible` RGB patches; the hue of one visible RGB patch (the most
                     saturated one, or `--hue_patch X Y`) is shifted by each of `--hue_shifts` and the RGB
                     prediction follows the edit over the surface that depth says belongs to it.
Predictions show the visible input patches pasted back (`--no_paste` to see the raw output). Modalities
without a given file are fed as fully hidden placeholders, so they are predicted but have no reference.

The model is rebuilt from the checkpoint's stored config (`run_pretraining_multimae.py` checkpoints) or,
for a bare state dict / .safetensors file, inferred from the weight shapes (then pass
`--decoder_num_heads` if the decoders did not use the default 8 heads: head counts leave no trace in
the shapes).
"""
import argparse
import math
import os
import sys


import numpy as np
import torch

from utils.config import add_bool_arg, create_parser, parse_args
from utils.data.constants import IMG_EXTENSIONS

FIGURES = ("masked", "single", "hue")
GREY = 128
_PUBLISHED_DEFAULTS = dict(  # pre-training options that shape the model, for checkpoints without a config
    model="pretrain_multimae_base", in_domains="rgb-depth-semseg", out_domains="rgb-depth-semseg", patch_size=16,
    input_size=224, num_global_tokens=1, decoder_dim=256, decoder_depth=2, decoder_num_heads=8,
    decoder_use_task_queries=True, decoder_use_xattn=True, extra_norm_pix_loss=True, drop_path=0.0,
    encoder_depth=None, encoder_dim=None, encoder_num_heads=None, standardize_depth=True,
    imagenet_default_mean_and_std=True, num_encoded_tokens=98)
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


# ------------------------------------------------------------------------------------------- model loading
def config_from_state_dict(sd: dict) -> dict:
    """Pre-training options inferred from MultiMAE weight shapes (domains, sizes, decoder layout)."""
    from utils.data.modalities import get_modality

    ins = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("input_adapters.")))
    outs = list(dict.fromkeys(k.split(".")[1] for k in sd if k.startswith("output_adapters.")))
    if not ins or "global_tokens" not in sd:
        raise ValueError("not a MultiMAE state dict (no input_adapters.* / global_tokens)")
    first = ins[0]
    kernel = sd[f"input_adapters.{first}.proj.weight"].shape[-1]
    patch = kernel * get_modality(first).stride_level
    dim, depth = sd["global_tokens"].shape[-1], 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("encoder."))
    cfg = dict(in_domains="-".join(ins), out_domains="-".join(o for o in outs if o != "norm_rgb"),
               extra_norm_pix_loss="norm_rgb" in outs, patch_size=patch, num_global_tokens=sd["global_tokens"].shape[1],
               input_size=sd[f"input_adapters.{first}.pos_emb"].shape[-1] * patch)
    size = _SIZES.get(dim)
    cfg["model"] = f"pretrain_multimae_{size or 'base'}"
    if size is None or depth != (24 if size == "large" else 12):
        cfg.update(encoder_dim=dim, encoder_depth=depth, encoder_num_heads=max(1, dim // 64))
    if outs:
        o = outs[0]
        cfg["decoder_dim"] = sd[f"output_adapters.{o}.proj_context.weight"].shape[0]
        prefix = f"output_adapters.{o}.decoder_transformer."
        cfg["decoder_depth"] = len({k.split(".")[3] for k in sd if k.startswith(prefix)})
        cfg["decoder_use_task_queries"] = any(k.startswith(f"output_adapters.{o}.task_embeddings") for k in sd)
        cfg["decoder_use_xattn"] = f"output_adapters.{o}.decoder.q.weight" in sd
    return cfg


def load_pretrained_multimae(path: str, device: torch.device, overrides: dict | None = None
                             ) -> tuple[torch.nn.Module, argparse.Namespace]:
    """(eval-mode MultiMAE with decoders, its config) from a pre-training checkpoint or bare weights."""
    from utils.checkpoint import load_checkpoint, load_model_state
    from utils.pretrain.multimae import build_pretrain_model
    from utils.weights import extract_state_dict

    ckpt = load_checkpoint(path)
    sd = extract_state_dict(ckpt, path)
    stored = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else None
    cfg = {**_PUBLISHED_DEFAULTS, **(stored if stored is not None else config_from_state_dict(sd))}
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not any(k.startswith("output_adapters.") for k in sd):
        raise SystemExit(f"{path} has no decoders (output_adapters.*): the demos need a pre-training checkpoint "
                         "with its decoders, not a fine-tuning / MultiViT one")
    args = argparse.Namespace(**cfg)
    model = build_pretrain_model(args)
    load_model_state(model, sd, strict=True, source=path)
    return model.to(device).eval(), args


# ------------------------------------------------------------------------------------------- inputs
def _files(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                out += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
        elif os.path.isfile(item):
            out.append(item)
        else:
            raise SystemExit(f"image path '{item}' does not exist")
    return out


def _by_stem(paths: list[str], what: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in found:
            raise SystemExit(f"two {what} files named '{stem}': '{found[stem]}' and '{p}'")
        found[stem] = p
    return found


def collect_samples(args: argparse.Namespace, domains: list[str]) -> list[dict[str, str]]:
    """[{modality: path}] for up to `num_images` RGB images, other modalities paired by file stem."""
    sources = {"rgb": list(args.images), "depth": list(args.depth), "semseg": list(args.semseg)}
    if args.data_path:
        for m in ["rgb"] + domains:
            folder = os.path.join(args.data_path, m)
            if os.path.isdir(folder) and not sources.get(m):
                sources[m] = [folder]
    rgb = _files(sources["rgb"])
    if not rgb:
        raise SystemExit("no RGB images: pass --images FILES/FOLDERS or --data_path with an rgb/ folder")
    others = {m: _by_stem(_files(v), m) for m, v in sources.items() if m != "rgb" and v and m in domains}
    step = max(1, len(rgb) // args.num_images)  # spread over the folder (classes are sub-folders)
    samples = []
    for p in rgb[::step][:args.num_images]:
        stem = os.path.splitext(os.path.basename(p))[0]
        samples.append({"rgb": p, **{m: f[stem] for m, f in others.items() if stem in f}})
    return samples


def load_batch(samples: list[dict[str, str]], cfg: argparse.Namespace, domains: list[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """Centre square crop + resize (the pre-training pipeline without randomness) of every sample.

    Returns the batch {modality: (B, ...)} with zero placeholders for missing files, and which
    modalities have a reference for every sample.
    """
    from utils.data.datasets import decode_file
    from utils.data.depth import robust_standardize
    from utils.data.transforms import PretrainTransform

    tf = PretrainTransform(cfg.input_size, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                           imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std)
    present = {m: all(m in s for s in samples) for m in domains}
    items = []
    for s in samples:
        items.append(tf({m: decode_file(p, m) for m, p in s.items() if m == "rgb" or present.get(m)}))
    batch = {m: torch.stack([it[m] for it in items]) for m in items[0]}
    size = cfg.input_size
    for m in domains:
        if m not in batch:  # fully hidden placeholder
            from utils.data.modalities import get_modality
            mod = get_modality(m)
            h = size // mod.stride_level
            batch[m] = (torch.zeros(len(samples), h, h, dtype=torch.long) if mod.kind == "label"
                        else torch.zeros(len(samples), mod.num_channels, size, size))
    if cfg.standardize_depth and present.get("depth"):
        batch["depth"] = robust_standardize(batch["depth"])
    return batch, present


# ------------------------------------------------------------------------------------------- masks
def visible_counts(rng: np.random.Generator, n_visible: int, alphas: list[float], capacity: list[int]) -> list[int]:
    """Split `n_visible` tokens over tasks by a Dirichlet(alphas) draw: exact total, at most `capacity`."""
    share = rng.dirichlet(alphas) * n_visible
    counts = [min(int(v), c) for v, c in zip(np.floor(share), capacity)]
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    while sum(counts) < min(n_visible, sum(capacity)):
        for i in order:
            if sum(counts) < n_visible and counts[i] < capacity[i]:
                counts[i] += 1
    return counts


def random_masks(rng: np.random.Generator, counts: dict[str, int], sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """{task: (N_task,) int64} masks, 1 = hidden, with `counts[task]` random visible positions."""
    masks = {}
    for t, n in sizes.items():
        m = torch.ones(n, dtype=torch.long)
        m[torch.from_numpy(rng.permutation(n)[:counts.get(t, 0)])] = 0
        masks[t] = m
    return masks


# ------------------------------------------------------------------------------------------- drawing
class Painter:
    """Turns one sample of one modality into uint8 tiles (masked input, prediction, reference)."""

    def __init__(self, cfg: argparse.Namespace, tile: int, paste: bool = True):
        from utils.data.transforms import PretrainTransform

        tf = PretrainTransform(cfg.input_size, imagenet_default_mean_and_std=cfg.imagenet_default_mean_and_std)
        self.mean, self.std, self.tile, self.paste = tf.mean, tf.std, tile, paste

    def render(self, m: str, x: torch.Tensor, vrange: tuple[float, float] | None = None) -> np.ndarray:
        from utils.data.modalities import get_modality
        from utils.vis import colorize_depth, colorize_semseg, denormalize_rgb

        kind = get_modality(m).kind
        if kind == "rgb":
            return denormalize_rgb(x, self.mean, self.std)
        if kind == "label":
            return colorize_semseg(x)
        if x.shape[0] == 1:
            lo, hi = vrange or np.percentile(x.float().numpy(), [2, 98])
            return colorize_depth(x, vmin=float(lo), vmax=float(hi))
        return (x[:3].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)

    def up(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((self.tile, self.tile), Image.NEAREST))

    def tiles(self, m: str, x: torch.Tensor, pred: torch.Tensor | None, mask: torch.Tensor, has_ref: bool
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """x: input (C, h, w) or labels (h, w); pred: (C, h, w) output; mask: (N,) 1 = hidden."""
        from utils.vis import patch_mask_to_pixels

        h, w = x.shape[-2:]
        hidden = torch.from_numpy(patch_mask_to_pixels(mask, h, w))
        vrange = None
        if x.dim() == 3 and x.shape[0] == 1:
            vrange = tuple(np.percentile((x if has_ref else pred).float().numpy(), [2, 98]))
        masked = self.render(m, x, vrange)
        masked[hidden.numpy()] = GREY
        shown = None
        if pred is not None:
            p = pred.argmax(0) if x.dim() == 2 else pred.float()
            if self.paste:
                p = torch.where(hidden, p, x) if x.dim() == 2 else torch.where(hidden[None], p, x)
            shown = self.up(self.render(m, p, vrange))
        return self.up(masked), shown, self.up(self.render(m, x, vrange)) if has_ref else None


def compose(rows: list[list[np.ndarray | None]], col_titles: list[str], row_titles: list[str], tile: int,
            groups: list[int] | None = None) -> np.ndarray:
    """Grid figure: `rows` of equally sized tiles (None = 'n/a'), column titles above, row titles left;
    `groups` (column counts) adds wider gaps between groups of columns."""
    from PIL import Image, ImageDraw

    gap, group_gap, header, left = 2, 10, 14, 84 if any(row_titles) else 0
    groups = groups or [len(col_titles)]
    xs, x = [], left
    for g in groups:
        for _ in range(g):
            xs.append(x)
            x += tile + gap
        x += group_gap - gap
    canvas = Image.new("RGB", (x - group_gap + gap, header + len(rows) * (tile + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(col_titles):
        draw.text((xs[c] + 2, 1), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        y = header + r * (tile + gap)
        draw.text((2, y + 2), row_titles[r][:13] if r < len(row_titles) else "", fill=(0, 0, 0))
        for c, t in enumerate(row):
            if t is None:
                draw.rectangle([xs[c], y, xs[c] + tile - 1, y + tile - 1], fill=(235, 235, 235))
                draw.text((xs[c] + tile // 2 - 8, y + tile // 2 - 5), "n/a", fill=(120, 120, 120))
            else:
                canvas.paste(Image.fromarray(t), (xs[c], y))
    return np.asarray(canvas)


# ------------------------------------------------------------------------------------------- demos
class Demo:
    """Holds the model, the batch and the figure settings; one method per figure."""

    def __init__(self, model: torch.nn.Module, cfg: argparse.Namespace, batch: dict, present: dict,
                 names: list[str], args: argparse.Namespace, device: torch.device):
        self.model, self.cfg, self.batch, self.present, self.names = model, cfg, batch, present, names
        self.args, self.device = args, device
        self.inputs = list(model.input_adapters)
        self.outputs = [o for o in model.output_adapters if o != "norm_rgb"]
        self.n_tokens = (cfg.input_size // cfg.patch_size) ** 2
        side = cfg.input_size
        self.painter = Painter(cfg, args.tile_size or side * max(1, math.ceil(128 / side)), args.paste)
        self.rng = np.random.default_rng(args.seed)

    @torch.no_grad()
    def predict(self, x: dict, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """masks {task: (B, N)} -> predictions on the CPU as float32."""
        x = {t: x[t].to(self.device) for t in self.inputs}
        preds, _ = self.model(x, task_masks={t: m.to(self.device) for t, m in masks.items()})
        return {k: v.float().cpu() for k, v in preds.items()}

    def _masks_for(self, per_sample: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {t: torch.stack([m[t] for m in per_sample]) for t in self.inputs}

    def masked(self) -> np.ndarray:
        sizes = {t: self.n_tokens for t in self.inputs}
        capacity = [self.n_tokens if self.present.get(t) else 0 for t in self.inputs]
        per_sample = []
        for _ in self.names:
            if self.args.visible_per_modality:
                counts = parse_counts(self.args.visible_per_modality, self.inputs, self.present, self.n_tokens)
            else:
                alphas = self.args.alphas * len(self.inputs) if len(self.args.alphas) == 1 else self.args.alphas
                if len(alphas) != len(self.inputs):
                    raise SystemExit(f"--alphas: give 1 value or one per input modality {self.inputs}")
                counts = dict(zip(self.inputs, visible_counts(self.rng, self.args.num_visible or
                                                              self.cfg.num_encoded_tokens, alphas, capacity)))
            per_sample.append(random_masks(self.rng, counts, sizes))
        masks = self._masks_for(per_sample)
        preds = self.predict(self.batch, masks)
        shown = [t for t in self.outputs if t in self.batch]
        rows = []
        for i in range(len(self.names)):
            row = []
            for t in shown:
                mask = masks[t][i] if t in masks else torch.ones(self.n_tokens, dtype=torch.long)
                row += self.painter.tiles(t, self.batch[t][i], preds[t][i], mask, self.present.get(t, False))
            rows.append(row)
        titles = [f"{t} {c}" for t in shown for c in ("masked", "pred", "reference")]
        return compose(rows, titles, self.names, self.painter.tile, groups=[3] * len(shown))

    def single(self, source: str) -> np.ndarray:
        """Every other output predicted from `source` alone (all its tokens visible)."""
        B = len(self.names)
        masks = {t: torch.full((B, self.n_tokens), int(t != source), dtype=torch.long) for t in self.inputs}
        preds = self.predict(self.batch, masks)
        targets = [t for t in self.outputs if t != source]
        rows = []
        for i in range(B):
            row = [self.painter.tiles(source, self.batch[source][i], None, masks[source][i], True)[0]]
            for t in targets:
                _, p, ref = self.painter.tiles(t, self.batch[t][i], preds[t][i], torch.ones(self.n_tokens),
                                               self.present.get(t, False))
                row += [p, ref]
            rows.append(row)
        titles = [f"{source} input"] + [f"{t} {c}" for t in targets for c in ("pred", "reference")]
        return compose(rows, titles, self.names, self.painter.tile, groups=[1] + [2] * len(targets))

    def hue(self) -> np.ndarray:
        """Full depth + a few RGB patches; one visible RGB patch recoloured by each of `--hue_shifts`."""
        P, side, shifts = self.cfg.patch_size, self.cfg.input_size // self.cfg.patch_size, self.args.hue_shifts
        rows = []
        for i in range(len(self.names)):
            counts = {"rgb": self.args.hue_num_visible, "depth": self.n_tokens}
            masks = random_masks(self.rng, counts, {t: self.n_tokens for t in self.inputs})
            rgb = self.batch["rgb"][i]
            px, py = self.args.hue_patch or self._most_saturated_visible(rgb, masks["rgb"], P, side)
            masks["rgb"][py * side + px] = 0
            if int((masks["rgb"] == 0).sum()) > self.args.hue_num_visible:  # keep the visible count fixed
                others = [j for j in torch.nonzero(masks["rgb"] == 0).flatten().tolist() if j != py * side + px]
                masks["rgb"][others[0]] = 1
            x = {t: self.batch[t][i:i + 1].repeat(len(shifts), *[1] * (self.batch[t].dim() - 1)) for t in self.inputs}
            x["rgb"] = recolour_patch(rgb, (px, py), P, shifts, self.painter.mean, self.painter.std)
            preds = self.predict(x, {t: m[None].expand(len(shifts), -1) for t, m in masks.items()})
            row = [self.painter.tiles("depth", x["depth"][0], None, masks["depth"], True)[0]]
            for k in range(len(shifts)):
                masked, pred, _ = self.painter.tiles("rgb", x["rgb"][k], preds["rgb"][k], masks["rgb"], True)
                row += [self._outline(masked, px, py, side), pred]
            rows.append(row)
        titles = ["depth input"] + [f"{c} hue{s:+.2f}" for s in shifts for c in ("rgb in", "rgb pred")]
        return compose(rows, titles, self.names, self.painter.tile, groups=[1] + [2] * len(shifts))

    @staticmethod
    def _most_saturated_visible(rgb: torch.Tensor, mask: torch.Tensor, P: int, side: int) -> tuple[int, int]:
        """(x, y) of the visible patch with the highest mean saturation (so the hue change is visible)."""
        patches = rgb.unfold(1, P, P).unfold(2, P, P)  # (3, side, side, P, P), normalised values
        sat = (patches.amax(0) - patches.amin(0)).mean((-1, -2)).flatten()
        sat[mask != 0] = -1
        j = int(sat.argmax())
        return j % side, j // side

    def _outline(self, tile: np.ndarray, px: int, py: int, side: int) -> np.ndarray:
        out, s = tile.copy(), self.painter.tile // side
        y0, x0 = py * s, px * s
        out[y0, x0:x0 + s] = out[y0 + s - 1, x0:x0 + s] = out[y0:y0 + s, x0] = out[y0:y0 + s, x0 + s - 1] = 255
        return out


def recolour_patch(rgb: torch.Tensor, patch_xy: tuple[int, int], patch_size: int, shifts: list[float],
                   mean, std) -> torch.Tensor:
    """(3, H, W) normalised image -> (len(shifts), 3, H, W) copies whose patch (x, y) has its hue rotated by
    each shift (fraction of the colour circle, in [-0.5, 0.5]); everything else is unchanged."""
    from torchvision.transforms.v2.functional import adjust_hue

    px, py = patch_xy
    ys, xs = slice(py * patch_size, (py + 1) * patch_size), slice(px * patch_size, (px + 1) * patch_size)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    out = rgb[None].repeat(len(shifts), 1, 1, 1)
    patch = (rgb[:, ys, xs] * std + mean).clamp(0, 1)
    for k, s in enumerate(shifts):
        if s:
            out[k, :, ys, xs] = (adjust_hue(patch, s) - mean) / std
    return out


def parse_counts(items: list[str], inputs: list[str], present: dict, n_tokens: int) -> dict[str, int]:
    """['rgb=8', 'depth=8'] -> {'rgb': 8, 'depth': 8}, checked against the model's inputs."""
    counts = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in inputs or not value.isdigit():
            raise SystemExit(f"--visible_per_modality: '{item}' must be <input modality>=<count>, inputs {inputs}")
        if int(value) and not present.get(name):
            raise SystemExit(f"--visible_per_modality: {name} has no input files, so no {name} token can be visible")
        counts[name] = min(int(value), n_tokens)
    if not sum(counts.values()):
        raise SystemExit("--visible_per_modality: at least one token must be visible")
    return counts


# ------------------------------------------------------------------------------------------- entry point
def get_args_parser() -> argparse.ArgumentParser:
    p = create_parser("MultiMAE demo figures (masked reconstruction, single-modality prediction, hue edit)")
    p.add_argument("--checkpoint", type=str, required=True, help="pre-training checkpoint (.pth / .safetensors)")
    p.add_argument("--data_path", type=str, default="", help="split root with rgb/ (and depth/, semseg/) folders")
    p.add_argument("--images", type=str, nargs="*", default=[], help="RGB image files or folders")
    p.add_argument("--depth", type=str, nargs="*", default=[], help="16-bit depth files/folders (paired by name)")
    p.add_argument("--semseg", type=str, nargs="*", default=[], help="semseg label files/folders (paired by name)")
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--output_dir", type=str, default="output/vis")
    p.add_argument("--figures", type=str, nargs="+", default=list(FIGURES), choices=FIGURES)
    p.add_argument("--num_visible", type=int, default=None, help="visible tokens (default: the training value)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0], help="Dirichlet concentration(s)")
    p.add_argument("--visible_per_modality", type=str, nargs="*", default=[], help="fixed counts, e.g. rgb=8 depth=4")
    p.add_argument("--sources", type=str, nargs="*", default=[], help="single-modality figures (default: all)")
    p.add_argument("--hue_num_visible", type=int, default=12, help="visible RGB patches in the hue edit")
    p.add_argument("--hue_shifts", type=float, nargs="+", default=[0.0, 0.33, -0.33], help="in [-0.5, 0.5]")
    p.add_argument("--hue_patch", type=int, nargs=2, default=None, metavar=("X", "Y"), help="patch to recolour")
    p.add_argument("--tile_size", type=int, default=None)
    add_bool_arg(p, "paste", True, "paste the visible input patches back into the predictions (--no_paste: raw)")
    p.add_argument("--standardize_depth", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="override the checkpoint's depth standardisation (true/false)")
    p.add_argument("--decoder_num_heads", type=int, default=None, help="for checkpoints without a stored config")
    p.add_argument("--device", type=str, default="cuda")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> dict[str, str]:
    """Writes the requested figures; returns {figure name: PNG path}."""
    from utils.dist import resolve_device
    from utils.io import save_png
    from utils.data.modalities import ordered_domains, parse_domains

    args = parse_args(get_args_parser(), argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, cfg = load_pretrained_multimae(args.checkpoint, device, {"standardize_depth": args.standardize_depth,
                                                                    "decoder_num_heads": args.decoder_num_heads})
    domains = ordered_domains(parse_domains(cfg.in_domains), parse_domains(cfg.out_domains))
    samples = collect_samples(args, domains)
    batch, present = load_batch(samples, cfg, domains)
    names = [os.path.splitext(os.path.basename(s["rgb"]))[0] for s in samples]
    demo = Demo(model, cfg, batch, present, names, args, device)
    figures: dict[str, np.ndarray] = {}
    if "masked" in args.figures:
        figures["masked"] = demo.masked()
    if "single" in args.figures:
        for src in args.sources or [t for t in demo.inputs if present.get(t)]:
            if src not in demo.inputs or not present.get(src):
                raise SystemExit(f"--sources: '{src}' needs to be a model input {demo.inputs} with input files")
            figures[f"from_{src}"] = demo.single(src)
    if "hue" in args.figures:
        if "rgb" in demo.inputs and "depth" in demo.inputs and present.get("depth"):
            figures["hue_edit"] = demo.hue()
        else:
            print("hue edit skipped: it needs rgb and depth inputs (model inputs and depth files)")
    paths = {}
    for name, img in figures.items():
        paths[name] = os.path.join(args.output_dir, f"{name}.png")
        save_png(paths[name], img)
    print(f"{len(samples)} images ({', '.join(t for t in domains if present.get(t))} given) -> "
          + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
