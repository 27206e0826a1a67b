"""What the interactive demos compute: samples, masks for every control position, and the pictures.

One ``DemoEngine`` holds a pre-trained MultiMAE (rebuilt by ``tools/visualize.py``'s loader) and turns a
sample plus a control position into one grid picture: for every output modality its masked input
(hidden patches grey), the prediction with the visible input patches pasted back, and the reference
(``n/a`` where the sample has none). The live app (``tools/lib/demo_gradio.py``) and the static page
(``tools/lib/demo_export.py``) both draw through it, so what a page shows for a slider position is what
``engine.view(...)`` returns for it::

    engine = DemoEngine.from_checkpoint("output/demo/checkpoint-last.pth", torch.device("cpu"))
    sample = engine.load_sample({"rgb": "img.png", "depth": "img_depth.png"})
    grid, caption = engine.view(sample, "visible", 24)      # (H, W, 3) uint8, one line of text

Demos (``DEMOS``) and their control values:
* ``random``  -- a seed: visible tokens (the training count) split over the inputs by a Dirichlet draw,
                 positions at random, as in pre-training.
* ``visible`` -- the number of visible tokens, split evenly over the inputs that have data; positions come
                 from one fixed random order per modality, so moving the slider reveals or hides patches.
* ``share``   -- a weight per input modality (``{m: 0..SHARE_LEVELS-1}``): the training count of visible
                 tokens split in proportion to the weights, same fixed orders.
* ``hue``     -- a hue shift in [-0.5, 0.5] applied to one of two visible RGB patches, the full depth map
                 visible: the prediction spreads the new colour over the surface the depth map outlines.
"""
from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from tools import visualize

DEMOS = ("random", "visible", "share", "hue")
TITLES = {"random": "Random masks", "visible": "Number of visible tokens", "share": "Share per modality",
          "hue": "Hue edit"}
SHARE_LEVELS = 3  # weights 0, 1, 2 per modality: 19 distinct splits for three modalities
HUE_STEPS = [round(-0.5 + 0.1 * i, 2) for i in range(11)]
HUE_VISIBLE_PATCHES = 2


class DemoError(ValueError):
    """A problem the page reports to the user as one sentence (bad upload, unusable checkpoint, ...)."""


@dataclass
class Sample:
    """One image prepared for the model: ``batch`` {modality: (1, ...)} (zeros where absent), which
    modalities have data (``present``), a display ``name`` and ``notes`` for the page."""
    batch: dict[str, torch.Tensor]
    present: dict[str, bool]
    name: str
    notes: list[str] = field(default_factory=list)
    orders: dict[str, np.ndarray] = field(default_factory=dict)  # fixed random token order per input


def largest_remainder(total: int, weights: list[float], capacity: list[int]) -> list[int]:
    """Integer counts proportional to ``weights`` summing to min(total, capacity sum), each <= capacity."""
    w = np.asarray(weights, float) * (np.asarray(capacity) > 0)
    if w.sum() <= 0:
        return [0] * len(weights)
    share = w / w.sum() * total
    counts = [min(int(v), c) for v, c in zip(np.floor(share), capacity)]
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    target = min(total, sum(capacity))
    while sum(counts) < target:
        for i in order:
            if sum(counts) < target and counts[i] < capacity[i] and w[i] > 0:
                counts[i] += 1
        if all(counts[i] >= capacity[i] or w[i] <= 0 for i in range(len(w))):
            break
    return counts


def share_positions(inputs: list[str]) -> list[dict[str, int]]:
    """Every weight combination of the share sliders (not all zero), in slider order."""
    combos = itertools.product(range(SHARE_LEVELS), repeat=len(inputs))
    return [dict(zip(inputs, c)) for c in combos if any(c)]


class DemoEngine:
    """A pre-trained MultiMAE plus the drawing settings; ``view`` computes one picture."""

    def __init__(self, model: torch.nn.Module, cfg: argparse.Namespace, device: torch.device,
                 tile: int | None = None, labellers: Mapping[str, Any] | None = None):
        self.model, self.cfg, self.device = model, cfg, device
        self.inputs = list(model.input_adapters)
        self.outputs = [o for o in model.output_adapters if o != "norm_rgb"]
        self.domains = list(dict.fromkeys(self.inputs + self.outputs))
        self.n_tokens = (cfg.input_size // cfg.patch_size) ** 2
        self.side = cfg.input_size // cfg.patch_size
        self.painter = visualize.Painter(cfg, tile or cfg.input_size * max(1, math.ceil(128 / cfg.input_size)))
        self.labellers = dict(labellers or {})

    def set_tile(self, tile: int) -> None:
        """Draw tiles of ``tile`` pixels (a multiple of the image size keeps patches crisp)."""
        self.painter.tile = int(tile)

    @classmethod
    def from_checkpoint(cls, path: str, device: torch.device, **kwargs: Any) -> "DemoEngine":
        """Raises DemoError (one sentence) when ``path`` is not a usable MultiMAE pre-training checkpoint."""
        try:
            model, cfg = visualize.load_pretrained_multimae(path, device)
        except SystemExit as e:  # the loader's messages for the command line
            raise DemoError(str(e)) from None
        except Exception as e:  # noqa: BLE001 -- any unreadable file becomes one message on the page
            raise DemoError(f"cannot use '{path}' as a MultiMAE pre-training checkpoint: {e}") from None
        return cls(model, cfg, device, **kwargs)

    # ------------------------------------------------------------------------------------ samples
    def load_sample(self, files: Mapping[str, str], name: str | None = None, seed: int = 0) -> Sample:
        """{modality: file path} (rgb required) -> Sample; missing depth/semseg are pseudo-labelled when a
        labeller for them is set, else left out (noted). Raises DemoError for unreadable or mismatched files."""
        import os

        if not files.get("rgb"):
            raise DemoError("an RGB image is required")
        files = {m: p for m, p in files.items() if p and m in self.domains + ["rgb"]}
        try:
            batch, present = visualize.load_batch([files], self.cfg, self.domains)
            self._check_labels(batch, present)
        except DemoError:
            raise
        except Exception as e:  # noqa: BLE001 -- decode / size errors name the file already
            raise DemoError(_first_line(e)) from None
        sample = Sample(batch, present, name or os.path.splitext(os.path.basename(files["rgb"]))[0])
        for m in self.inputs:
            if m != "rgb" and not present.get(m):
                if m in self.labellers:
                    self._pseudo_label(sample, m)
                    sample.notes.append(f"{m}: pseudo-labelled from the RGB image")
                else:
                    sample.notes.append(f"{m}: no file and no pseudo-labeller, so predicted from the other inputs only")
        rng = np.random.default_rng(seed)
        sample.orders = {m: rng.permutation(self.n_tokens) for m in self.inputs}
        return sample

    def _check_labels(self, batch: dict, present: dict) -> None:
        for m in self.inputs:
            adapter = self.model.input_adapters[m]
            if present.get(m) and hasattr(adapter, "num_classes") and batch[m].dtype == torch.long:
                top = int(batch[m].max())
                if top >= adapter.num_classes or int(batch[m].min()) < 0:
                    raise DemoError(f"{m} file holds class id {top}; this checkpoint knows ids "
                                    f"0..{adapter.num_classes - 1}")

    @torch.no_grad()
    def _pseudo_label(self, sample: Sample, m: str) -> None:
        """Fill sample.batch[m] from a pseudo-labeller run on the (already resized) RGB input."""
        import torch.nn.functional as F

        from utils.data.depth import robust_standardize

        lab = self.labellers[m]
        mean, std = torch.tensor(self.painter.mean).view(1, 3, 1, 1), torch.tensor(self.painter.std).view(1, 3, 1, 1)
        rgb01 = (sample.batch["rgb"] * std + mean).clamp(0, 1)
        x = F.interpolate(rgb01, size=lab.input_size, mode="bilinear", align_corners=False)
        x = (x - torch.tensor(lab.mean).view(1, 3, 1, 1)) / torch.tensor(lab.std).view(1, 3, 1, 1)
        target = sample.batch[m].shape[-2:]
        out = F.interpolate(lab(x).float(), size=target, mode="bilinear", align_corners=False)
        labels = lab.finish(out)
        if m == "depth":
            d = labels[:, None].float() / 2 ** 16  # like a 16-bit depth file, which the loader divides by 2**16
            sample.batch[m] = robust_standardize(d) if self.cfg.standardize_depth else d
        else:
            sample.batch[m] = labels.long().clamp(0, self.model.input_adapters[m].num_classes - 1)
        sample.present[m] = True

    # ------------------------------------------------------------------------------------ support
    def unsupported(self, sample: Sample | None = None) -> dict[str, str]:
        """{demo: why it cannot run} for this checkpoint (and, given a sample, for that sample)."""
        why = {}
        with_data = [m for m in self.inputs if sample is None or sample.present.get(m)]
        if len(self.inputs) < 2:
            why["share"] = f"the checkpoint has one input modality ({self.inputs[0]}): nothing to share"
        elif len(with_data) < 2:
            why["share"] = f"this image has data for {with_data[0]} only (no other modality to share with)"
        if "rgb" not in self.inputs or "depth" not in self.inputs:
            why["hue"] = f"the hue edit needs rgb and depth inputs; the checkpoint has {'-'.join(self.inputs)}"
        elif sample is not None and not sample.present.get("depth"):
            why["hue"] = "the hue edit needs a depth map: upload one or start the app with a depth pseudo-labeller"
        if "rgb" not in self.outputs and "hue" not in why:
            why["hue"] = "the hue edit needs an rgb decoder"
        return why

    def positions(self, demo: str, num_random: int = 4) -> list[Any]:
        """Every control value of ``demo`` (what a static page precomputes)."""
        if demo == "random":
            return list(range(num_random))
        if demo == "visible":
            return self.visible_steps()
        if demo == "share":
            return share_positions(self.inputs)
        return list(HUE_STEPS)

    def visible_steps(self) -> list[int]:
        """Slider positions of the 'visible' demo: about 18 steps up to every input token."""
        total = self.n_tokens * len(self.inputs)
        step = max(1, math.ceil(total / 18))
        return list(range(step, total + 1, step)) + ([total] if total % step else [])

    # ------------------------------------------------------------------------------------ masks
    def masks(self, sample: Sample, demo: str, value: Any) -> tuple[dict[str, torch.Tensor], str]:
        """({input: (N,) int64, 1 = hidden}, caption) for one control value of ``demo``."""
        capacity = [self.n_tokens if sample.present.get(m) else 0 for m in self.inputs]
        budget = self.budget(capacity)
        if demo == "random":
            rng = np.random.default_rng(int(value))
            counts = dict(zip(self.inputs, visualize.visible_counts(rng, budget, [1.0] * len(self.inputs), capacity)))
            return visualize.random_masks(rng, counts, {m: self.n_tokens for m in self.inputs}), \
                f"mask #{value}: " + _counts_text(counts)
        if demo == "visible":
            counts = dict(zip(self.inputs, largest_remainder(int(value), [1.0] * len(self.inputs), capacity)))
            return self._ordered(sample, counts), f"{sum(counts.values())} visible tokens: " + _counts_text(counts)
        if demo == "share":
            weights = [float(value.get(m, 0)) for m in self.inputs]
            counts = dict(zip(self.inputs, largest_remainder(budget, weights, capacity)))
            total = max(1, sum(counts.values()))
            shares = ", ".join(f"{m} {100 * c / total:.0f}%" for m, c in counts.items())
            return self._ordered(sample, counts), f"{sum(counts.values())} visible tokens: {shares}"
        raise DemoError(f"unknown demo '{demo}'; expected one of {DEMOS}")

    def budget(self, capacity: list[int]) -> int:
        """Visible tokens of the random and share demos: the training fraction of the tokens that have data."""
        fraction = self.cfg.num_encoded_tokens / (self.n_tokens * len(self.inputs))
        return max(1, min(sum(capacity), round(fraction * sum(capacity))))

    def _ordered(self, sample: Sample, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        masks = {}
        for m in self.inputs:
            mask = torch.ones(self.n_tokens, dtype=torch.long)
            mask[torch.from_numpy(sample.orders[m][:counts.get(m, 0)].copy())] = 0
            masks[m] = mask
        return masks

    def hue_setup(self, sample: Sample) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
        """Masks of the hue demo (full depth, HUE_VISIBLE_PATCHES RGB patches) and the edited patch (x, y):
        the most saturated patch, plus the next patches of the fixed RGB order."""
        masks = {m: torch.ones(self.n_tokens, dtype=torch.long) for m in self.inputs}
        masks["depth"][:] = 0
        all_visible = torch.zeros(self.n_tokens, dtype=torch.long)
        px, py = visualize.Demo._most_saturated_visible(sample.batch["rgb"][0], all_visible,
                                                        self.cfg.patch_size, self.side)
        chosen = [py * self.side + px]
        chosen += [int(j) for j in sample.orders["rgb"] if int(j) != chosen[0]][:HUE_VISIBLE_PATCHES - 1]
        masks["rgb"][chosen] = 0
        return masks, (px, py)

    # ------------------------------------------------------------------------------------ pictures
    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch {m: (1, ...)}, masks {m: (N,)} -> predictions {m: (C, h, w)} float32 on the CPU."""
        x = {m: batch[m].to(self.device) for m in self.inputs}
        preds, _ = self.model(x, task_masks={m: v[None].to(self.device) for m, v in masks.items()})
        return {k: v[0].float().cpu() for k, v in preds.items()}

    def view(self, sample: Sample, demo: str, value: Any) -> tuple[np.ndarray, str]:
        """One demo picture: (H, W, 3) uint8 grid (masked / prediction / reference per output) and a caption.
        Raises DemoError when the demo cannot run for this checkpoint or sample."""
        why = self.unsupported(sample)
        if demo in why:
            raise DemoError(why[demo])
        batch, outline = sample.batch, None
        if demo == "hue":
            shift = float(value)
            if not -0.5 <= shift <= 0.5:
                raise DemoError(f"hue shift must lie in [-0.5, 0.5], got {shift}")
            masks, outline = self.hue_setup(sample)
            rgb = visualize.recolour_patch(batch["rgb"][0], outline, self.cfg.patch_size, [shift],
                                           self.painter.mean, self.painter.std)
            batch = {**batch, "rgb": rgb}
            caption = f"hue {shift:+.2f} on the outlined patch; full depth and {HUE_VISIBLE_PATCHES} RGB patches visible"
        else:
            masks, caption = self.masks(sample, demo, value)
        preds = self.predict(batch, masks)
        row, titles = [], []
        for m in self.outputs:
            mask = masks.get(m, torch.ones(self.n_tokens, dtype=torch.long))
            tiles = list(self.painter.tiles(m, batch[m][0], preds[m], mask, bool(sample.present.get(m))))
            if outline is not None and m == "rgb":
                tiles[0] = outline_patch(tiles[0], *outline, self.side)
            row += tiles
            names = ("masked", "prediction", "reference") if self.painter.tile >= 128 else ("masked", "pred", "ref")
            titles += [f"{m} {n}" for n in names]
        grid = visualize.compose([row], titles, [], self.painter.tile, groups=[3] * len(self.outputs))
        return grid, caption


def outline_patch(tile: np.ndarray, px: int, py: int, side: int) -> np.ndarray:
    """Copy of an (S, S, 3) tile with a white frame around patch (px, py) of a side x side grid."""
    out, s = tile.copy(), tile.shape[0] // side
    y0, x0 = py * s, px * s
    out[y0, x0:x0 + s] = out[y0 + s - 1, x0:x0 + s] = out[y0:y0 + s, x0] = out[y0:y0 + s, x0 + s - 1] = 255
    return out


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{m} {c}" for m, c in counts.items())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
