"""The input-pipeline side of the benchmark: the published PIL pre-training pipeline (the baseline the
project's loader is compared against), the synthetic JPEG/PNG folder both read, and the ``data`` mode of
``tools/benchmark.py`` that times them (:func:`run_data_mode`, :func:`format_data_table`).
"""
from __future__ import annotations

import functools
import os
import random
import tempfile
import time
from argparse import Namespace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PilPretrainPipeline", "write_benchmark_images", "run_data_mode", "format_data_table"]


class PilPretrainPipeline(Dataset):
    """The published pre-training pipeline over the samples of a multi-modal folder.

    Per sample: every modality is decoded at full size with PIL (rgb converted to RGB, semseg to
    palette mode), one ``RandomResizedCrop`` box and one flip decision are shared; each modality is
    cropped and resized to ``input_size`` with PIL (bicubic, nearest for semseg) and flipped; rgb
    becomes a normalised float tensor, depth ``float / 2**16`` ``(1, S, S)``, semseg is resized again to
    ``S / 4`` and becomes int64. ``__getitem__(i) -> (dict, class_index)`` like ``MultiModalImageFolder``.
    """

    def __init__(self, samples: Sequence[Tuple[Mapping[str, str], int]], input_size: int = 224,
                 hflip: float = 0.5, scale: Tuple[float, float] = (0.2, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), semseg_stride: int = 4,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.samples = [(dict(paths), int(label)) for paths, label in samples]
        self.size, self.hflip, self.scale, self.ratio = input_size, hflip, scale, ratio
        self.semseg_stride, self.mean, self.std = semseg_stride, list(mean), list(std)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def _open(path: str, modality: str):
        from PIL import Image

        im = Image.open(path)
        if modality == "rgb":
            return im.convert("RGB")
        if "semseg" in modality:
            return im.convert("P")
        im.load()
        return im

    def __getitem__(self, index: int) -> Tuple[Dict[str, torch.Tensor], int]:
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF

        paths, label = self.samples[index]
        images = {m: self._open(p, m) for m, p in paths.items()}
        top, left, h, w = RandomResizedCrop.get_params(next(iter(images.values())), self.scale, self.ratio)
        flip = random.random() < self.hflip
        out: Dict[str, torch.Tensor] = {}
        for m, im in images.items():
            resample = Image.NEAREST if im.mode == "P" else Image.BICUBIC
            im = im.crop((left, top, left + w, top + h)).resize((self.size, self.size), resample)
            if flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            if m == "rgb":
                out[m] = TF.normalize(TF.to_tensor(im), self.mean, self.std)
            elif "semseg" in m:
                small = self.size // self.semseg_stride
                out[m] = torch.from_numpy(np.array(im.resize((small, small), Image.NEAREST))).long()
            else:
                out[m] = torch.from_numpy(np.array(im, dtype=np.float32) / 2 ** 16).unsqueeze(0)
        return out, label


def write_benchmark_images(root: str, num_images: int, image_size: int, unique: int = 32, seed: int = 0,
                           jpeg_quality: int = 90) -> str:
    """Write ``root/{rgb,depth,semseg}/scenes/img_<i>.{jpg,png,png}`` from synthetic scenes.

    rgb is JPEG (as ImageNet), depth a 16-bit PNG, semseg an 8-bit PNG. Only ``unique`` scenes are
    rendered (slow at large sizes) and repeated under different names; decoding cost does not depend on
    repetition. An existing complete folder (marker file) is reused. Returns ``root``.
    """
    from PIL import Image

    from utils.data.synthetic import render_scene

    marker = os.path.join(root, f".complete_{num_images}_{image_size}_{unique}_{seed}_{jpeg_quality}")
    if os.path.exists(marker):
        return root
    for m in ("rgb", "depth", "semseg"):
        os.makedirs(os.path.join(root, m, "scenes"), exist_ok=True)
    scenes = [render_scene((seed, 0, i), i % 4, image_size) for i in range(min(unique, num_images))]
    for i in range(num_images):
        arrays = scenes[i % len(scenes)]
        stem = f"img_{i:06d}"
        Image.fromarray(arrays["rgb"]).save(os.path.join(root, "rgb", "scenes", stem + ".jpg"), quality=jpeg_quality)
        Image.fromarray(arrays["depth"]).save(os.path.join(root, "depth", "scenes", stem + ".png"), compress_level=6)
        Image.fromarray(arrays["semseg"]).save(os.path.join(root, "semseg", "scenes", stem + ".png"), compress_level=6)
    with open(marker, "w") as f:
        f.write("ok\n")
    return root


# ----------------------------------------------------------------------------------------------
# the data mode of tools/benchmark.py

def _ours_loader(root: str, args: Namespace, workers: int):
    """The training loader (compact batches) and the step that finishes them on the device."""
    from utils.pretrain.multimae import build_pretrain_loader
    ns = Namespace(in_domains="rgb-depth-semseg", out_domains="rgb-depth-semseg", data_path=root,
                   input_size=args.input_size, hflip=0.5, train_interpolation="bicubic",
                   imagenet_default_mean_and_std=True, seed=args.seed, batch_size=args.batch_size,
                   num_workers=workers, pin_mem=True)
    dataset, loader = build_pretrain_loader(ns)
    return _persistent(loader), dataset.transform.finish


def _pil_loader(root: str, args: Namespace, workers: int):
    from torch.utils.data import DataLoader

    from utils.data.datasets import MultiModalImageFolder
    samples = MultiModalImageFolder(root, ["rgb", "depth", "semseg"]).samples
    ds = PilPretrainPipeline(samples, input_size=args.input_size)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=workers > 0)
    return loader, None


def _persistent(loader):
    """The training loader with persistent workers, so that timed epochs measure throughput, not the
    start-up of the worker processes (a training epoch has thousands of batches; these have 16). Training
    restarts them every epoch; ``PerSampleSeed.set_epoch`` reaches persistent workers (the epoch is in shared memory)."""
    from torch.utils.data import DataLoader
    if loader.num_workers == 0:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      drop_last=loader.drop_last, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      prefetch_factor=loader.prefetch_factor, generator=loader.generator, persistent_workers=True)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its live and terminated (joined) children."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    live = 0.0
    for pid in _child_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            live += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + live


def _child_pids() -> List[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # not Linux: only joined workers are counted
        return []


def _time_epoch(loader, finish: Optional[Callable[[Any], Any]] = None) -> Tuple[float, float, int]:
    """Wall seconds, CPU seconds (this process and its loader workers) and the number of images of one
    pass over ``loader``; ``finish`` (the device-side completion of compact batches) is timed with it."""
    t0, c0, n = time.perf_counter(), _cpu_seconds(), 0
    for batch in loader:
        if finish is not None:
            batch = finish(batch)
        n += batch[0]["rgb"].shape[0]
    return time.perf_counter() - t0, _cpu_seconds() - c0, n


def run_data_mode(args: Namespace) -> Dict[str, Any]:
    """Images/s of each pipeline and worker count in steady state: ``data_repeats`` times, the configurations
    interleaved, a fresh loader runs one warm-up epoch (starts its persistent workers, fills caches) and one
    timed epoch; the median is reported. The warm-up epochs (worker start-up included) are kept in the JSON."""
    root = args.data_dir or os.path.join(tempfile.gettempdir(), f"multimae_bench_{args.source_size}px_{args.num_images}")
    t0 = time.perf_counter()
    write_benchmark_images(root, args.num_images, args.source_size, unique=min(32, args.num_images), seed=args.seed)
    gen_s = time.perf_counter() - t0
    from tools.lib.shard_bench import SHARD_PIPELINES, shard_loader, write_benchmark_shards

    pipelines = {"both": ["pil", "ours"], "all": ["pil", "ours", *SHARD_PIPELINES]}.get(
        args.pipeline, [p.strip() for p in args.pipeline.split(",") if p.strip()])
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    makers = {"pil": _pil_loader, "ours": _ours_loader,
              **{p: functools.partial(shard_loader, p) for p in SHARD_PIPELINES}}
    unknown = [p for p in pipelines if p not in makers]
    if unknown:
        raise SystemExit(f"--pipeline: unknown pipeline(s) {unknown}; expected {', '.join(makers)}, 'both' or 'all'")
    for p in pipelines:  # write the shards (once) before anything is timed, then warm the page cache
        if p in SHARD_PIPELINES:
            write_benchmark_shards(root, p.split("-", 1)[1])
    for folder in [root] + [f"{os.path.normpath(root)}_shards_{p.split('-', 1)[1]}" for p in pipelines
                            if p in SHARD_PIPELINES]:
        _read_all(folder)
    configs = [(p, w) for w in workers for p in pipelines]
    samples: Dict[Tuple[str, int], List[float]] = {c: [] for c in configs}
    cpu: Dict[Tuple[str, int], List[float]] = {c: [] for c in configs}
    torch.manual_seed(args.seed)
    # Without --threads, the main process loads on one intra-op thread, as every DataLoader worker does
    # (torch sets 1 there): OpenMP teams on 224 px images only add spin-waiting, which on a busy machine
    # cost both pipelines up to 10x their CPU time and made the 0-worker ratio meaningless.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)
    first: Dict[Tuple[str, int], List[float]] = {c: [] for c in configs}
    try:
        for _ in range(args.data_repeats):
            for c in configs:
                loader, finish = makers[c[0]](root, args, c[1])
                seconds, _, n = _time_epoch(loader, finish)  # warm-up: starts the workers, fills caches
                first[c].append(n / seconds)
                seconds, cpu_seconds, n = _time_epoch(loader, finish)
                samples[c].append(n / seconds)
                cpu[c].append(1e3 * cpu_seconds / n)
                _shutdown(loader)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for (p, w), ips in samples.items():
        ref, ref_cpu = samples.get(("pil", w)), cpu.get(("pil", w))
        # ratios are taken per repeat (the two epochs ran back to back) and then the median: slow drifts of
        # a shared machine's speed cancel out, which they do not in a ratio of medians
        rows.append({"mode": "data", "pipeline": p, "workers": w, "images_per_s": float(np.median(ips)),
                     "all_images_per_s": ips, "first_epoch_images_per_s": float(np.median(first[(p, w)])),
                     "cpu_ms_per_image": float(np.median(cpu[(p, w)])),
                     "speedup_vs_pil": float(np.median(np.divide(ips, ref))) if ref else None,
                     "all_speedups_vs_pil": list(np.divide(ips, ref)) if ref else None,
                     "cpu_ratio_vs_pil": float(np.median(np.divide(ref_cpu, cpu[(p, w)]))) if ref_cpu else None})
    return {"mode": "data", "root": root, "source_size": args.source_size, "num_images": args.num_images,
            "input_size": args.input_size, "batch_size": args.batch_size, "generate_s": gen_s,
            "main_process_threads": args.threads or 1, "rows": rows}


def _read_all(folder: str) -> None:
    """Read every file under ``folder`` (page cache: time decoding, not the disk)."""
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                fh.read()


def _shutdown(loader) -> None:
    """Stop the persistent workers of ``loader`` now (not whenever the garbage collector gets to it)."""
    loader = getattr(loader, "_persistent", loader)  # a ShardLoader's DataLoader
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


def format_data_table(res: Dict[str, Any]) -> str:
    lines = [f"data: rgb(JPEG)+depth(16-bit PNG)+semseg(PNG) {res['source_size']}px -> {res['input_size']}px, "
             f"batch {res['batch_size']}, {res['num_images']} images per epoch, "
             f"{res['main_process_threads']} torch thread(s) in the main process",
             f"{'pipeline':<12}{'workers':>8}{'img/s':>9}{'vs pil':>8}{'cpu ms/img':>12}{'vs pil':>8}"]
    for r in res["rows"]:
        ratio = f"{r['speedup_vs_pil']:.2f}" if r["speedup_vs_pil"] is not None else "-"
        cpu_ratio = f"{r['cpu_ratio_vs_pil']:.2f}" if r["cpu_ratio_vs_pil"] is not None else "-"
        lines.append(f"{r['pipeline']:<12}{r['workers']:>8}{r['images_per_s']:>9.1f}{ratio:>8}"
                     f"{r['cpu_ms_per_image']:>12.2f}{cpu_ratio:>8}")
    lines.append("(steady state, persistent workers; median over repeats; img/s of the whole loader incl. the "
                 "device-side finishing of compact batches; cpu ms/img = CPU time of the main process and its workers "
                 "per image; 'vs pil' = median of the per-repeat ratios of img/s resp. of CPU cost)")
    return "\n".join(lines)
