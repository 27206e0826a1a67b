#!/usr/bin/env python
"""Training-step and input-pipeline benchmark.

Model modes (``pretrain``, ``finetune-cls``, ``finetune-semseg``, ``finetune-depth``) time a full training
step (forward, loss, backward, gradient norm, AdamW) of a registered model size on synthetic tensors and
report the median step time, images/s, model FLOPs per step, achieved FLOP/s, that as a fraction of the
matmul peak measured in the same run, and the peak memory of the step. Several variants of the step
(attention kernel, ``torch.compile``, autocast, activation checkpointing, channels-last) run side by
side, interleaved step by step, so their ratios are comparable even on a busy machine.

The ``data`` mode measures images/s of the full pre-training input pipeline (read, decode, joint
crop/flip/resize, depth and semseg handling, collate) on a folder of JPEG/PNG files, for several worker
counts, next to the published PIL pipeline (``--pipeline pil``).

    python tools/benchmark.py --mode pretrain --size small --compare            # ours vs published, ViT-S
    python tools/benchmark.py --mode pretrain --size base --variants baseline,sdpa,sdpa+bf16,sdpa+ckpt
    python tools/benchmark.py --mode data --workers 0,1,2
    python tools/benchmark.py --quick                                           # every mode, tiny, < 20 s

See README.md (Performance) for what the columns mean and measured numbers.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from argparse import Namespace
from typing import Any, Callable, Dict, List, Optional, Tuple


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tools.lib.shard_bench import SHARD_PIPELINES, shard_loader, write_benchmark_shards
from tools.lib.benchmark import (BASELINE, PeakMemory, PilPretrainPipeline, Variant, count_flops,
                             eager_memory_return, machine_info, matmul_peak, parse_variant, summarize_times,
                             tensor_peak_bytes, time_interleaved, write_benchmark_images)

MODEL_MODES = ("pretrain", "finetune-cls", "finetune-semseg", "finetune-depth")
MODES = MODEL_MODES + ("data",)
PEAK_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default=None, help=f"comma list of {', '.join(MODES)} or 'all' (default: pretrain; "
                   f"all with --quick)")
    p.add_argument("--size", default="small", choices=["tiny", "small", "base", "large"], help="registered model size")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--input_size", type=int, default=224)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--num_encoded_tokens", type=int, default=98, help="pretrain: visible tokens per sample")
    p.add_argument("--decoder_dim", type=int, default=256, help="pretrain decoders / semseg ConvNeXt width")
    p.add_argument("--decoder_depth", type=int, default=2)
    p.add_argument("--decoder_num_heads", type=int, default=8)
    p.add_argument("--encoder_depth", type=int, default=None, help="override the number of encoder blocks")
    p.add_argument("--iters", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    g = p.add_argument_group("variants (the step as configured by these flags is 'ours')")
    g.add_argument("--attention", default="auto", choices=["auto", "sdpa", "math"],
                   help="sdpa: the fused call; math: the published formulation; auto: the library default "
                   "(explicit formulation for short sequences on CPU in bf16/fp16)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (encoder and decoders)")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of the encoder blocks")
    g.add_argument("--channels_last", action="store_true", help="channels-last conv weights and inputs")
    g.add_argument("--fused_optimizer", action="store_true", help="fused AdamW kernel (torch >= 2.4 on CPU too)")
    g.add_argument("--compare", action="store_true",
                   help="also run the published formulation (math attention, eager, fp32) and print ratios")
    g.add_argument("--variants", default="", help="explicit comma list, e.g. 'baseline,sdpa,sdpa+compile,"
                   "sdpa+bf16,sdpa+ckpt' (the first one is the reference of the ratios)")
    g = p.add_argument_group("data mode")
    g.add_argument("--pipeline", default="both",
                   help="comma list of pil, ours, shard-orig, shard-fast, shard-zlib; 'both' = pil,ours; "
                   "'all' = pil, ours and every shard-* pipeline")
    g.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    g.add_argument("--num_images", type=int, default=128, help="images per timed epoch")
    g.add_argument("--source_size", type=int, default=320, help="pixel size of the generated files")
    g.add_argument("--data_dir", default="", help="folder for the generated files (default: a temp folder)")
    g.add_argument("--data_repeats", type=int, default=3, help="timed epochs per configuration (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's; data mode: 1, like a DataLoader worker)")
    p.add_argument("--peak_size", type=int, default=2048, help="matrix size of the matmul peak measurement")
    p.add_argument("--fresh_rss", action="store_true",
                   help="also measure each variant's resident-set growth of one step in a process of its own")
    p.add_argument("--rss_probe", action="store_true", help=argparse.SUPPRESS)  # the child of --fresh_rss
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write all results here")
    p.add_argument("--quick", action="store_true", help="tiny model and images, few steps, every mode (< 20 s)")
    return p


def apply_quick(args: Namespace) -> None:
    """Smallest settings that still exercise every code path (used by the test suite)."""
    args.mode = args.mode or "all"
    args.size, args.encoder_depth, args.batch_size, args.input_size = "tiny", 4, 2, 64
    args.num_encoded_tokens, args.decoder_dim, args.decoder_depth, args.decoder_num_heads = 16, 64, 1, 4
    args.iters, args.warmup, args.peak_size = 2, 1, 256
    args.num_images, args.source_size, args.data_repeats, args.workers = 8, 80, 1, "0,1"
    args.compare = args.compare or not args.variants


def resolve_variants(args: Namespace) -> List[Variant]:
    """The variants to run: ``--variants``, else the flags' variant (after the baseline with ``--compare``)."""
    if args.variants:
        return [parse_variant(s) for s in args.variants.split(",") if s.strip()]
    ours = Variant(attention=args.attention, compile=args.compile, amp=args.amp, grad_ckpt=args.grad_ckpt,
                   channels_last=args.channels_last, fused_optimizer=args.fused_optimizer)
    return [BASELINE, ours] if args.compare and ours != BASELINE else [ours]


# ----------------------------------------------------------------------------------------------
# models, batches and step functions of the four model modes

def _pretrain_setup(args: Namespace, device: torch.device) -> Tuple[nn.Module, Callable, Any, Callable]:
    from multimae import create_model
    from utils.data.modalities import build_input_adapters, build_pretrain_losses, build_pretrain_output_adapters
    from utils.engine.optim import pretrain_param_groups
    from utils.pretrain.multimae import PretrainStep
    from utils.pretrain.task_balancing import build_task_balancer

    domains, S, B = ["rgb", "depth", "semseg"], args.input_size, args.batch_size
    outputs = build_pretrain_output_adapters(domains, domains, args.patch_size, S, dim_tokens=args.decoder_dim,
                                             depth=args.decoder_depth, num_heads=args.decoder_num_heads,
                                             extra_norm_pix_loss=True)
    kw = {"depth": args.encoder_depth} if args.encoder_depth else {}
    inputs = build_input_adapters(domains, args.patch_size, S)
    model = create_model(f"pretrain_multimae_{args.size}", input_adapters=inputs, output_adapters=outputs, **kw)
    losses = build_pretrain_losses(domains, args.patch_size, extra_norm_pix_loss=True)
    balancer = build_task_balancer("none", list(losses))
    step = PretrainStep(domains, losses, balancer, args.num_encoded_tokens, standardize_depth=True)
    g = torch.Generator().manual_seed(args.seed)
    x = {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.rand(B, 1, S, S, generator=g),
         "semseg": torch.randint(0, 133, (B, S // 4, S // 4), generator=g)}
    return model, step, (x, torch.zeros(B, dtype=torch.long)), lambda m: pretrain_param_groups(m, balancer, 0.05)


def _finetune_setup(args: Namespace, device: torch.device, task: str) -> Tuple[nn.Module, Callable, Any, Callable]:
    from multimae import LinearOutputAdapter
    from utils.finetune.runner import EncoderInfo, build_dense_head, build_multivit, encoder_info
    from utils.engine.optim import finetune_param_groups

    name, S, B = f"multivit_{args.size}", args.input_size, args.batch_size
    kw = {"depth": args.encoder_depth} if args.encoder_depth else {}
    enc: EncoderInfo = encoder_info(name, **kw)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(B, 3, S, S, generator=g)
    if task == "cls":
        head, key, y = LinearOutputAdapter(1000), "cls", torch.randint(0, 1000, (B,), generator=g)
    elif task == "semseg":  # published default head: ConvNeXt, 6144 wide (--decoder_dim scales it in --quick)
        head = build_dense_head("convnext", 150, ["rgb"], args.patch_size, enc,
                                decoder_dim=6144 if args.decoder_dim >= 256 else args.decoder_dim * 4)
        key, y = "semseg", torch.randint(0, 150, (B, S, S), generator=g)
    else:
        head, key, y = build_dense_head("dpt", 1, ["rgb"], args.patch_size, enc), "depth", torch.rand(B, 1, S, S, generator=g)
    model = build_multivit(name, ["rgb"], {key: head}, args.patch_size, S, **kw)
    all_layers = task == "depth"

    def step(m: nn.Module, batch: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        inputs, target = batch
        out = m({"rgb": inputs}, return_all_layers=all_layers)[key].float()
        if task == "depth":
            loss = F.l1_loss(out, target)
        else:
            loss = F.cross_entropy(out, target, ignore_index=255)
        return loss, {"loss": loss.detach()}

    return model, step, (x, y), lambda m: finetune_param_groups(m, 0.05, 0.75)


def build_mode(mode: str, args: Namespace, device: torch.device):
    """``(model, step_fn, batch, param_groups_fn)`` for a model mode, on ``device``."""
    torch.manual_seed(args.seed)
    if mode == "pretrain":
        model, step, batch, groups = _pretrain_setup(args, device)
    else:
        model, step, batch, groups = _finetune_setup(args, device, mode.split("-")[1])
    from utils.engine.trainer import move_to_device
    return model.to(device), step, move_to_device(batch, device), groups


# ----------------------------------------------------------------------------------------------
# running the variants of one model mode

def _make_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable, amp: str,
                  device: torch.device):
    from utils.engine.trainer import Trainer
    return Trainer(model, optimizer, step, lr_schedule=np.full(1, 1.5e-4), wd_schedule=np.full(1, 0.05),
                   steps_per_epoch=1, epochs=1, device=device, amp=amp)


def _to_channels_last(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch
    if isinstance(batch, dict):
        return {k: _to_channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_channels_last(v) for v in batch)
    return batch


class StepRunner:
    """One training step of ``variant`` exactly as the engine runs it: hyper-parameters from the schedule,
    autocast, the task step, (scaled) backward, gradient norm, optimizer step, zero grads. Variants share
    the model and optimizer unless they need another weight layout (channels-last)."""

    def __init__(self, variant: Variant, model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable,
                 batch: Any, device: torch.device):
        from utils.engine.trainer import autocast
        self.variant, self.model, self.device, self.step = variant, model, device, step
        self.trainer = _make_trainer(model, optimizer, step, variant.amp, device)
        self.forward_model = torch.compile(model) if variant.compile else model
        self.batch = _to_channels_last(batch) if variant.channels_last else batch
        self._autocast = autocast

    def __call__(self) -> None:
        from multimae.multimae_utils import set_attention_impl
        v, t = self.variant, self.trainer
        set_attention_impl(v.attention)
        self.model.set_grad_checkpointing(v.grad_ckpt)
        t.set_hparams(0)
        with self._autocast(self.device, t.amp):
            loss, _ = self.step(self.forward_model, self.batch)
        (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
        t.optimizer_step()


def _graph_counters() -> Tuple[int, int]:
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values()), int(counters["stats"].get("unique_graphs", 0))


def run_model_mode(mode: str, args: Namespace, variants: List[Variant], device: torch.device) -> Dict[str, Any]:
    """Time every variant of ``mode`` (interleaved), count model FLOPs once, measure step memory."""
    model, step, batch, groups_fn = build_mode(mode, args, device)
    models: Dict[bool, nn.Module] = {}
    optimizers: Dict[Tuple[bool, bool], torch.optim.Optimizer] = {}

    def model_for(v: Variant) -> Tuple[nn.Module, torch.optim.Optimizer]:
        """Variants share the model unless the weight layout differs, and the optimizer unless it is fused."""
        if v.channels_last not in models:
            m = model if not models else _clone(model)
            models[v.channels_last] = m.to(memory_format=torch.channels_last) if v.channels_last else m
        m = models[v.channels_last]
        key = (v.channels_last, v.fused_optimizer)
        if key not in optimizers:
            optimizers[key] = _make_optimizer(m, groups_fn, v.fused_optimizer)
        return m, optimizers[key]

    runners = {v.name: StepRunner(v, *model_for(v), step, batch, device) for v in variants}
    flops = count_flops(lambda: step(model, batch)[0].backward())
    model.zero_grad(set_to_none=True)
    peaks = _measure_peaks(variants, device, args.peak_size)

    first_call: Dict[str, float] = {}
    breaks0, graphs0 = _graph_counters()
    time_interleaved(runners, iters=0, warmup=args.warmup, device=device,
                     on_first_call=lambda n, s: first_call.__setitem__(n, s))
    breaks1, graphs1 = _graph_counters()
    times, cpu_times = time_interleaved(runners, iters=args.iters, warmup=0, device=device)
    breaks2, graphs2 = _graph_counters()
    memory = _measure_step_memory(runners, device)
    for k, v in _measure_peaks(variants, device, args.peak_size).items():
        peaks[k] = max(peaks[k], v)

    fresh = _fresh_process_rss(mode, args, variants) if args.fresh_rss else {}
    # gradients are allocated during every step; what remains of the step memory is activations and temporaries
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    rows = []
    for v in variants:
        stats = summarize_times(times[v.name])
        peak = peaks[_dtype_name(v)]
        row = {"mode": mode, "variant": v.name, **stats, "images_per_s": args.batch_size / stats["median_s"],
               "flops_per_step": flops, "achieved_flops": flops / stats["median_s"], "peak_flops": peak,
               "peak_dtype": _dtype_name(v),
               "fraction_of_peak": flops / stats["median_s"] / peak, "first_step_s": first_call[v.name],
               "cpu_median_s": summarize_times(cpu_times[v.name])["median_s"],
               "fraction_of_peak_cpu": (flops / summarize_times(cpu_times[v.name])["median_s"]
                                        / peaks.get(_dtype_name(v) + "_cpu", float("nan"))),
               "step_memory_mb": memory[v.name]["tensor_peak"] / 2 ** 20,
               "activation_memory_mb": max(0.0, memory[v.name]["tensor_peak"] - grad_bytes) / 2 ** 20,
               "step_rss_mb": memory[v.name]["rss"].delta_bytes / 2 ** 20,
               "process_peak_mb": memory[v.name]["rss"].peak_bytes / 2 ** 20,
               "memory_exact": memory[v.name]["rss"].exact}
        if fresh:
            row["fresh_process_rss_mb"] = fresh[v.name]
        if v.compile:
            row.update(graph_breaks_during_warmup=breaks1 - breaks0, new_graphs_during_timing=graphs2 - graphs1,
                       graph_breaks_during_timing=breaks2 - breaks1)
        rows.append(row)
    _add_ratios(rows)
    n_params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "model": _model_name(mode, args), "batch_size": args.batch_size,
            "input_size": args.input_size, "parameters": n_params, "peaks": peaks, "rows": rows}


def _make_optimizer(model: nn.Module, groups_fn: Callable, fused: bool) -> torch.optim.Optimizer:
    """The project's AdamW (non-fused on CPU) over ``groups_fn(model)``, or its single-kernel variant."""
    from utils.engine.optim import create_optimizer
    opt_args = Namespace(opt="adamw", lr=1.5e-4, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95], momentum=0.9)
    opt = create_optimizer(opt_args, groups_fn(model))
    if fused:
        keep = ("lr", "betas", "eps", "weight_decay", "amsgrad")
        opt = type(opt)(groups_fn(model), **{k: opt.defaults[k] for k in keep if k in opt.defaults}, fused=True)
    return opt


# the arguments that define a model mode's step (passed on to the --fresh_rss child processes)
_STEP_ARGS = ("size", "batch_size", "input_size", "patch_size", "num_encoded_tokens", "decoder_dim", "decoder_depth",
              "decoder_num_heads", "encoder_depth", "warmup", "device", "threads", "seed")


def _fresh_process_rss(mode: str, args: Namespace, variants: List[Variant]) -> Dict[str, float]:
    """Resident-set growth (MB) of one step of every variant, each measured in a new process after its warm-up
    steps, so that no heap left by other variants or compilations is reused (or counted)."""
    import subprocess
    out = {}
    for v in variants:
        argv = [sys.executable, os.path.abspath(__file__), "--rss_probe", "--mode", mode, "--variants", v.name]
        for k in _STEP_ARGS:
            if getattr(args, k) is not None:
                argv += [f"--{k}", str(getattr(args, k))]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RSS_PROBE ")]
        if proc.returncode or not found:
            raise RuntimeError(f"fresh-process memory probe of variant '{v.name}' failed (exit code "
                               f"{proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
        out[v.name] = float(json.loads(found[-1][len("RSS_PROBE "):])["rss_mb"])
    return out


def _rss_probe(mode: str, args: Namespace, variant: Variant, device: torch.device) -> None:
    """Child of --fresh_rss: warm-up steps, then the resident-set growth of one step, printed as JSON."""
    model, step, batch, groups_fn = build_mode(mode, args, device)
    runner = StepRunner(variant, model, _make_optimizer(model, groups_fn, variant.fused_optimizer), step, batch,
                        device)
    for _ in range(max(1, args.warmup)):
        runner()
    pm = _step_rss(runner, device)
    print("RSS_PROBE " + json.dumps({"rss_mb": pm.delta_bytes / 2 ** 20, "exact": pm.exact}), flush=True)


def _measure_step_memory(runners: Dict[str, Callable[[], None]], device: torch.device) -> Dict[str, Dict[str, Any]]:
    """Per variant: ``tensor_peak`` (bytes; peak tensor memory allocated during one step, see
    ``tensor_peak_bytes``) and ``rss`` (a :class:`PeakMemory` of another step: resident memory, which also
    counts the allocator's free-but-resident heap and so depends on what ran before)."""
    memory: Dict[str, Dict[str, Any]] = {}
    for name, run in runners.items():
        memory[name] = {"tensor_peak": tensor_peak_bytes(run, device)[0]}
    for name, run in runners.items():
        memory[name]["rss"] = _step_rss(run, device)
    return memory


def _step_rss(run: Callable[[], None], device: torch.device) -> PeakMemory:
    """Peak memory of one ``run()``, the allocator returning freed memory eagerly (see ``eager_memory_return``)."""
    with eager_memory_return():
        with PeakMemory(device) as pm:
            run()
    return pm


def _clone(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


def _model_name(mode: str, args: Namespace) -> str:
    name = f"pretrain_multimae_{args.size}" if mode == "pretrain" else f"multivit_{args.size}"
    return name + (f" (depth {args.encoder_depth})" if args.encoder_depth else "")


def _measure_peaks(variants: List[Variant], device: torch.device, n: int) -> Dict[str, float]:
    """Matmul peak of every compute dtype in use (``'float32'``...) and, on CPU, its CPU-time twin
    (``'float32_cpu'``...), the reference of the CPU-time columns."""
    dtypes = sorted({PEAK_DTYPES[v.amp] for v in variants} | {torch.float32}, key=str)
    peaks = {}
    for d in dtypes:
        name = str(d).replace("torch.", "")
        peaks[name] = matmul_peak(device, d, n=n)
        if device.type == "cpu":
            peaks[name + "_cpu"] = matmul_peak(device, d, n=n, clock="cpu")
    return peaks


def _dtype_name(v: Variant) -> str:
    return str(PEAK_DTYPES[v.amp]).replace("torch.", "")


def _add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Speed-up and memory ratio of every row against the first one (the reference variant)."""
    ref = rows[0]
    for r in rows:
        r["speedup_vs_" + ref["variant"]] = r["images_per_s"] / ref["images_per_s"]
        r["memory_vs_" + ref["variant"]] = r["step_memory_mb"] / max(ref["step_memory_mb"], 1e-9)
        if "fresh_process_rss_mb" in r:
            r["fresh_rss_vs_" + ref["variant"]] = r["fresh_process_rss_mb"] / max(ref["fresh_process_rss_mb"], 1e-9)


# ----------------------------------------------------------------------------------------------
# data mode

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
    itself restarts them every epoch: ``PerSampleSeed.set_epoch`` must reach the workers."""
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


# ----------------------------------------------------------------------------------------------
# output

def format_model_table(res: Dict[str, Any]) -> str:
    ref = res["rows"][0]["variant"]
    head = (f"{res['mode']}: {res['model']}, batch {res['batch_size']}, {res['input_size']}px, "
            f"{res['parameters'] / 1e6:.1f}M params, {res['rows'][0]['flops_per_step'] / 1e9:.1f} GFLOP/step, "
            f"matmul peaks (GFLOP/s) " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in res["peaks"].items()))
    cols = f"{'variant':<24}{'step ms':>9}{'(min)':>8}{'img/s':>8}{'GFLOP/s':>9}{'%peak':>7}{'cpu ms':>8}" \
           f"{'%pk cpu':>8}{'mem MB':>8}{'rss MB':>8}{'speed x':>8}{'mem x':>7}{'1st s':>7}"
    lines = [head, cols]
    for r in res["rows"]:
        lines.append(f"{r['variant']:<24}{r['median_s'] * 1e3:>9.0f}{r['min_s'] * 1e3:>8.0f}{r['images_per_s']:>8.2f}"
                     f"{r['achieved_flops'] / 1e9:>9.1f}{100 * r['fraction_of_peak']:>7.1f}"
                     f"{r['cpu_median_s'] * 1e3:>8.0f}{100 * r['fraction_of_peak_cpu']:>8.1f}{r['step_memory_mb']:>8.0f}"
                     f"{r['step_rss_mb']:>8.0f}"
                     f"{r['speedup_vs_' + ref]:>8.2f}{r['memory_vs_' + ref]:>7.2f}{r['first_step_s']:>7.1f}")
        if "graph_breaks_during_timing" in r:
            lines.append(f"{'':<24}compile: {r['graph_breaks_during_warmup']} graph breaks while compiling, "
                         f"{r['graph_breaks_during_timing']} breaks / {r['new_graphs_during_timing']} new graphs "
                         f"during the timed steps")
    lines.append(f"(medians of interleaved steps; ratios vs '{ref}' (images/s, step memory); %peak = model FLOP/s over "
                 f"the matmul peak of the compute dtype; cpu = process CPU time per step and %pk cpu its utilisation "
                 f"(meaningful with one thread on a shared machine); mem = peak tensor memory allocated during one "
                 f"step (max_memory_allocated; on CPU from the profiler's allocation records); rss = peak resident "
                 f"memory of a step above the memory before it (includes free heap the allocator keeps); "
                 f"1st = first step incl. compilation)")
    if "fresh_process_rss_mb" in res["rows"][0]:
        lines.append("resident-set growth of one step, each variant in a fresh process: " + ", ".join(
            f"{r['variant']} {r['fresh_process_rss_mb']:.0f} MB ({r['fresh_rss_vs_' + ref]:.2f}x)" for r in res["rows"]))
    return "\n".join(lines)


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


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.mode = args.mode or "pretrain"
    modes = list(MODES) if args.mode == "all" else [m.strip() for m in args.mode.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--mode: unknown mode(s) {unknown}; expected a comma list of {', '.join(MODES)} or 'all'")
    device = torch.device(args.device)
    variants = resolve_variants(args)
    if args.rss_probe:
        _rss_probe(modes[0], args, variants[0], device)
        return {}
    out: Dict[str, Any] = {"machine": machine_info(device), "args": vars(args), "results": []}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in out["machine"].items()), flush=True)
    for mode in modes:
        res = run_model_mode(mode, args, variants, device) if mode != "data" else run_data_mode(args)
        out["results"].append(res)
        print((format_data_table if mode == "data" else format_model_table)(res) + "\n", flush=True)
    out["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


if __name__ == "__main__":
    main()
