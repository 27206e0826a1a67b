#!/usr/bin/env python
"""One-command GPU report: the ViT-B pre-training step at the published batch per GPU, in every formulation
and precision, and the input pipeline with 8 and 16 workers; written as ``OUT_DIR/gpu_report.json`` and
``OUT_DIR/gpu_report.md``.

    python tools/gpu_benchmark.py OUT_DIR                                   # one GPU, about 5 minutes
    python tools/gpu_benchmark.py OUT_DIR --reference_impl /path/to/published   # + the published code's step
    python tools/gpu_benchmark.py OUT_DIR --quick                           # CPU, tiny sizes (the test suite)

The model variants run interleaved in one process (``tools/benchmark.py``): the published formulation
(``math``: explicit softmax attention, eager, plain AdamW) in fp32 and in fp16 autocast with a gradient scaler
(the published precision), and ours (SDPA, i.e. flash attention where the GPU has it, fused AdamW) in fp32,
fp16, bf16 and compiled. The batch starts at 256 (the published batch per GPU) and is halved until a step of
every variant fits; the report says which batch was measured.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import torch

from tools import benchmark
from utils.io import atomic_open

GPU_VARIANTS = ("math,math+fp16,sdpa+fused,sdpa+fp16+fused,sdpa+bf16+fused,sdpa+compile+fp16+fused,"
                "sdpa+compile+bf16+fused")
QUICK_VARIANTS = "math,sdpa+fused,sdpa+bf16+fused"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="folder for gpu_report.json and gpu_report.md (created)")
    p.add_argument("--size", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--batch_size", type=int, default=256, help="first batch tried; halved until it fits")
    p.add_argument("--variants", default=GPU_VARIANTS)
    p.add_argument("--reference_impl", default="", metavar="DIR", help="see tools/benchmark.py")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--workers", default="8,16", help="DataLoader worker counts of the input pipeline")
    p.add_argument("--num_images", type=int, default=2048, help="images per timed epoch of the input pipeline")
    p.add_argument("--data_batch_size", type=int, default=64, help="batch of the input-pipeline measurement")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model and images (seconds)")
    return p


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_model_report(args: argparse.Namespace) -> Dict[str, Any]:
    """The pre-training step of every variant at the largest batch (from ``--batch_size`` down by halves) at
    which all of them fit; ``{"result": ..., "batch_tried": [...]}``."""
    tried: List[int] = []
    batch = args.batch_size
    while batch >= 1:
        tried.append(batch)
        argv = ["--mode", "pretrain", "--size", args.size, "--batch_size", str(batch), "--iters", str(args.iters),
                "--warmup", "2", "--variants", args.variants, "--device", args.device]
        argv += ["--reference_impl", args.reference_impl] if args.reference_impl else []
        argv += ["--quick", "--iters", "2"] if args.quick else ["--peak_size", "8192"]
        try:
            out = benchmark.main(argv)
            return {"result": out["results"][0], "machine": out["machine"], "batch_tried": tried}
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not _is_oom(e) or batch == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2
    raise AssertionError("unreachable")


def run_data_report(args: argparse.Namespace) -> Dict[str, Any]:
    """Images/s of the published PIL pipeline and ours with the given worker counts."""
    argv = ["--mode", "data", "--workers", args.workers, "--num_images", str(args.num_images),
            "--batch_size", str(args.data_batch_size), "--data_repeats", "1" if args.quick else "2"]
    argv += ["--quick", "--workers", args.workers] if args.quick else []
    return benchmark.main(argv)["results"][0]


def format_markdown(report: Dict[str, Any]) -> str:
    """The report as Markdown: the model table, then the input-pipeline table."""
    res, m = report["model"]["result"], report["model"]["machine"]
    ref = res["rows"][0]["variant"]
    lines = [f"# GPU report: {res['model']}, batch {res['batch_size']} (tried {report['model']['batch_tried']}), "
             f"{res['input_size']} px", "", "machine: " + ", ".join(f"{k}={v}" for k, v in m.items()), "",
             f"| variant | step | img/s | speed vs `{ref}` | % of matmul peak (dtype) | step memory |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| `{r['variant']}` | {r['median_s'] * 1e3:.0f} ms | {r['images_per_s']:.1f} | "
                     f"{r['speedup_vs_' + ref]:.2f}x | {100 * r['fraction_of_peak']:.0f} % ({r['peak_dtype']}) | "
                     f"{r['step_memory_mb']:.0f} MB |")
    lines += ["", "Matmul peaks measured in the same run (GFLOP/s): " + ", ".join(
        f"{k} {v / 1e9:.0f}" for k, v in res["peaks"].items()), "",
        "| workers | pipeline | img/s | speed vs PIL |", "|---|---|---|---|"]
    for r in report["data"]["rows"]:
        speed = f"{r['speedup_vs_pil']:.2f}x" if r.get("speedup_vs_pil") else "-"
        lines.append(f"| {r['workers']} | {r['pipeline']} | {r['images_per_s']:.0f} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.quick:
        args.device, args.workers = "cpu", "0,1"
        args.variants = QUICK_VARIANTS if args.variants == GPU_VARIANTS else args.variants
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_benchmark: no CUDA device here; use --quick for the CPU smoke run or --device")
    report = {"model": run_model_report(args), "data": run_data_report(args)}
    os.makedirs(args.out_dir, exist_ok=True)
    with atomic_open(os.path.join(args.out_dir, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with atomic_open(os.path.join(args.out_dir, "gpu_report.md"), "w") as f:
        f.write(format_markdown(report))
    print(format_markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
