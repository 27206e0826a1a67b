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
import json
import os
import sys
from argparse import Namespace
from typing import Any, Dict, List, Optional, Tuple

import torch

# the loaders, build_mode and StepRunner are also reached through this module by tests/test_benchmark.py
from tools.lib.bench_data import _ours_loader, _pil_loader, _shutdown, format_data_table, run_data_mode  # noqa: F401
from tools.lib.bench_memory import _measure_step_memory, _step_rss
from tools.lib.bench_steps import StepRunner, _build_runners, _make_optimizer, build_mode
from tools.lib.benchmark import (BASELINE, Variant, count_flops, machine_info, matmul_peak, parse_variant,
                                 summarize_times, time_interleaved)

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
    g.add_argument("--fused_optimizer", action="store_true", help=argparse.SUPPRESS)  # the default now
    g.add_argument("--plain_optimizer", action="store_true",
                   help="torch's per-parameter AdamW loop instead of the fused kernel (the default on CPU and CUDA)")
    g.add_argument("--compare", action="store_true",
                   help="also run the published formulation (math attention, eager, fp32) and print ratios")
    g.add_argument("--reference_impl", default="", metavar="DIR",
                   help="pretrain mode: DIR holds a 'multimae' package with the published API (the published "
                   "code or a fork); its step (our weights, same inputs, plain AdamW, fp32) runs interleaved "
                   "with ours and is the reference of the ratios")
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
                   channels_last=args.channels_last, fused_optimizer=not args.plain_optimizer)
    return [BASELINE, ours] if args.compare and ours != BASELINE else [ours]


# ----------------------------------------------------------------------------------------------
# running the variants of one model mode

def _graph_counters() -> Tuple[int, int]:
    from torch._dynamo.utils import counters
    return sum(counters["graph_break"].values()), int(counters["stats"].get("unique_graphs", 0))


def run_model_mode(mode: str, args: Namespace, variants: List[Variant], device: torch.device) -> Dict[str, Any]:
    """Time every variant of ``mode`` (interleaved), count model FLOPs once, measure step memory."""
    model, step, batch, groups_fn = build_mode(mode, args, device)
    runners = _build_runners(variants, model, step, batch, groups_fn, device)
    if args.reference_impl and mode == "pretrain":  # the reference column comes first
        from tools.lib.bench_reference import build_reference_runner
        ref = build_reference_runner(args.reference_impl, model, step, batch, groups_fn, args, device)
        runners = {ref.variant.name: ref, **runners}
        variants = [ref.variant] + list(variants)
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

    if args.fresh_rss and args.reference_impl:
        raise SystemExit("--fresh_rss: not available with --reference_impl")
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
    """Speed-up and memory ratio of every row against the first one (the reference variant), and the speed-up
    against the published formulation (``math``) when that is a second reference."""
    ref = rows[0]
    math_rows = [r for r in rows[1:] if r["variant"] == BASELINE.name]
    for r in rows:
        if math_rows:
            r["speedup_vs_" + BASELINE.name] = r["images_per_s"] / math_rows[0]["images_per_s"]
        r["speedup_vs_" + ref["variant"]] = r["images_per_s"] / ref["images_per_s"]
        r["memory_vs_" + ref["variant"]] = r["step_memory_mb"] / max(ref["step_memory_mb"], 1e-9)
        if "fresh_process_rss_mb" in r:
            r["fresh_rss_vs_" + ref["variant"]] = r["fresh_process_rss_mb"] / max(ref["fresh_process_rss_mb"], 1e-9)


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
