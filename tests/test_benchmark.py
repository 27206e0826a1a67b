"""tools/benchmark.py and tools/lib/benchmark.py: the --quick run of every mode, the measurement primitives,
the published PIL pipeline baseline, and that the two attention implementations agree."""
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.lib.benchmark import (BASELINE, PeakMemory, PilPretrainPipeline, Variant, attention_impl, count_flops,
                             matmul_peak, parse_variant, summarize_times, tensor_peak_bytes, time_interleaved,
                             write_benchmark_images)

ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_quick_runs_every_mode_and_writes_consistent_json(tmp_path):
    out_json = tmp_path / "bench.json"
    tool.main(["--quick", "--json", str(out_json), "--data_dir", str(tmp_path / "data")])
    res = json.loads(out_json.read_text())
    assert [r["mode"] for r in res["results"]] == list(tool.MODES)
    assert res["machine"]["logical_cpus"] >= 1
    for r in res["results"][:4]:
        rows = r["rows"]
        assert [row["variant"] for row in rows] == ["math", "auto+fused"]  # ours at defaults: the fused AdamW
        flops = rows[0]["flops_per_step"]
        assert flops > 1e6 and all(row["flops_per_step"] == flops for row in rows)
        for row in rows:
            assert row["min_s"] <= row["median_s"] <= row["max_s"]
            assert row["images_per_s"] == pytest.approx(r["batch_size"] / row["median_s"])
            assert row["achieved_flops"] == pytest.approx(flops / row["median_s"])
            assert row["fraction_of_peak"] == pytest.approx(row["achieved_flops"] / row["peak_flops"])
            assert row["peak_flops"] > 1e8 and row["step_memory_mb"] > 0
            assert 0 <= row["activation_memory_mb"] <= row["step_memory_mb"]
            assert row["fraction_of_peak_cpu"] == pytest.approx(
                flops / row["cpu_median_s"] / r["peaks"][row["peak_dtype"] + "_cpu"])
        assert rows[0]["speedup_vs_math"] == 1.0 and rows[0]["memory_vs_math"] == 1.0
        assert rows[1]["speedup_vs_math"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])
    data = res["results"][4]
    assert {(row["pipeline"], row["workers"]) for row in data["rows"]} == {(p, w) for p in ("pil", "ours")
                                                                           for w in (0, 1)}
    for row in data["rows"]:
        assert row["images_per_s"] > 0 and row["cpu_ms_per_image"] > 0 and row["first_epoch_images_per_s"] > 0
        pil = next(x for x in data["rows"] if x["pipeline"] == "pil" and x["workers"] == row["workers"])
        paired = [a / b for a, b in zip(row["all_images_per_s"], pil["all_images_per_s"])]
        assert row["all_speedups_vs_pil"] == pytest.approx(paired)
        assert row["speedup_vs_pil"] == pytest.approx(float(np.median(paired)))


def test_fresh_rss_measures_every_variant_in_a_process_of_its_own(tmp_path):
    out_json = tmp_path / "bench.json"
    tool.main(["--quick", "--mode", "pretrain", "--fresh_rss", "--variants", "math,auto+ckpt", "--json", str(out_json)])
    rows = json.loads(out_json.read_text())["results"][0]["rows"]
    assert [r["variant"] for r in rows] == ["math", "auto+ckpt"]
    assert all(r["fresh_process_rss_mb"] > 0 for r in rows)
    math_rss, ckpt_rss = rows[0]["fresh_process_rss_mb"], rows[1]["fresh_process_rss_mb"]
    assert rows[1]["fresh_rss_vs_math"] == pytest.approx(ckpt_rss / math_rss)


def test_fresh_rss_probe_failure_names_the_variant():
    args = tool.get_args_parser().parse_args(["--quick"])
    args.size = "nonexistent"  # the child process rejects it
    with pytest.raises(RuntimeError, match="memory probe of variant 'math' failed .*--size"):
        tool._fresh_process_rss("pretrain", args, [tool.parse_variant("math")])


def test_math_and_sdpa_attention_give_the_same_pretraining_step():
    args = tool.get_args_parser().parse_args(["--quick"])
    tool.apply_quick(args)
    model, step, batch, _ = tool.build_mode("pretrain", args, torch.device("cpu"))
    results = {}
    for impl in ("math", "sdpa"):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same Dirichlet split and masks for both
        with attention_impl(impl):
            preds, masks = model(batch[0], num_encoded_tokens=args.num_encoded_tokens)
            loss = sum(p.float().square().mean() for p in preds.values())
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (preds, masks, loss.detach(), grads)
    (p_m, m_m, l_m, g_m), (p_s, m_s, l_s, g_s) = results["math"], results["sdpa"]
    for task in p_m:
        assert torch.equal(m_m.get(task, torch.zeros(1)), m_s.get(task, torch.zeros(1)))
        torch.testing.assert_close(p_s[task], p_m[task], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(l_s, l_m, atol=1e-5, rtol=1e-5)
    assert g_m.keys() == g_s.keys() and len(g_m) > 50
    for name in g_m:
        torch.testing.assert_close(g_s[name], g_m[name], atol=1e-5, rtol=1e-3, msg=name)


def test_count_flops_of_a_linear_layer_forward_and_backward():
    lin = torch.nn.Linear(32, 48)
    x = torch.randn(5, 32, requires_grad=True)
    # forward 2*B*I*O; backward: grad of the input and grad of the weight, 2*B*I*O each
    assert count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 5 * 32 * 48


def test_count_flops_credits_sdpa_like_math_and_restores_the_choice():
    from multimae.multimae_utils import Attention, get_attention_impl
    attn = Attention(64, num_heads=4)
    x = torch.randn(2, 10, 64)
    with attention_impl("sdpa"):
        f_sdpa = count_flops(lambda: attn(x))
        assert get_attention_impl() == "sdpa"
    linear = 2 * 2 * 10 * 64 * (3 * 64 + 64)
    attention = 2 * 2 * (2 * 4 * 10 * 10 * 16)  # q k^T and attn v, batch 2, 4 heads, 10 tokens, head dim 16
    assert f_sdpa == linear + attention


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory("cpu") as pm:
        t = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
        del t
    if not pm.exact:
        pytest.skip("the resident high-water mark cannot be reset on this system")
    assert 60 * 2 ** 20 <= pm.delta_bytes <= 200 * 2 ** 20
    with PeakMemory("cpu") as small:
        torch.ones(1000)
    assert small.delta_bytes < 30 * 2 ** 20


def test_tensor_peak_bytes_counts_live_tensors_not_the_heap():
    kept = []

    def step():
        a = torch.ones(2 ** 20)  # 4 MiB
        b = a * 2  # 8 MiB live
        del a
        c = b + 1  # 8 MiB live again (a was freed)
        del b
        kept.append(c)  # 4 MiB still allocated at the end

    peak, end = tensor_peak_bytes(step)
    assert peak == pytest.approx(8 * 2 ** 20, abs=1024) and end == pytest.approx(4 * 2 ** 20, abs=1024)
    # freeing what existed before does not count as a peak
    peak_free, end_free = tensor_peak_bytes(kept.clear)
    assert peak_free == 0 and end_free <= 0


def test_tensor_peak_bytes_drops_the_profiler_chatter_but_keeps_other_stderr(capfd):
    def step():
        os.write(2, b"a warning of the measured code\n")
        return torch.ones(8) + 1

    tensor_peak_bytes(step)
    err = capfd.readouterr().err
    assert "a warning of the measured code" in err
    assert "profiler_start" not in err and "gpuGetDeviceCount" not in err


def test_matmul_peak_and_interleaved_timing():
    assert matmul_peak("cpu", n=128, repeats=2) > 1e7
    calls = []
    wall, cpu = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, iters=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order rotates per round
    assert all(len(v) == 3 for v in wall.values()) and all(len(v) == 3 for v in cpu.values())
    busy = time_interleaved({"spin": lambda: sum(range(200_000))}, iters=1, warmup=0)
    assert 0 < busy[1]["spin"][0] and 0 < busy[0]["spin"][0]
    s = summarize_times([3.0, 1.0, 2.0])
    assert (s["median_s"], s["min_s"], s["max_s"]) == (2.0, 1.0, 3.0)


def test_parse_variant():
    assert parse_variant("baseline") == BASELINE == Variant(attention="math")
    v = parse_variant("sdpa+compile+bf16+ckpt+cl+fused")
    assert v == Variant("sdpa", True, "bf16", True, True, True) and v.name == "sdpa+compile+bf16+ckpt+cl+fused"
    assert parse_variant("sdpa").name == "sdpa"
    with pytest.raises(ValueError, match="unknown variant token 'fast'"):
        parse_variant("sdpa+fast")


def test_pil_baseline_computes_what_the_project_pipeline_computes(tmp_path):
    """Whole-image crop, no flip: both pipelines must give the same tensors (fair comparison)."""
    from utils.data.datasets import MultiModalImageFolder
    from utils.data.transforms import PretrainTransform

    root = write_benchmark_images(str(tmp_path), num_images=2, image_size=64, unique=2)
    ours = MultiModalImageFolder(root, ["rgb", "depth", "semseg"],
                                 transform=PretrainTransform(64, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    pil = PilPretrainPipeline(ours.samples, input_size=64, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(2):
        (a, la), (b, lb) = ours[i], pil[i]
        assert la == lb and a.keys() == b.keys()
        for m in a:
            assert a[m].shape == b[m].shape and a[m].dtype == b[m].dtype, m
        assert b["semseg"].shape == (16, 16)
        assert torch.equal(a["semseg"], b["semseg"])
        torch.testing.assert_close(a["depth"], b["depth"], atol=1e-6, rtol=0)
        # both decode the JPEG with libjpeg; allow a couple of grey levels for IDCT/upsampling differences
        assert (a["rgb"] - b["rgb"]).abs().max() < 3 / 255 / 0.224


def test_data_mode_times_both_pipelines_to_the_same_finished_batches(tmp_path):
    """The project loader ships compact batches (uint8 rgb and labels); the data benchmark times it with the
    device-side finishing, so both pipelines end at model-ready tensors of the same types and shapes."""
    from argparse import Namespace
    root = write_benchmark_images(str(tmp_path), num_images=4, image_size=48, unique=2)
    args = Namespace(input_size=32, seed=0, batch_size=2)
    (ours, finish), (pil, no_finish) = tool._ours_loader(root, args, 1), tool._pil_loader(root, args, 1)
    assert no_finish is None and ours.persistent_workers and pil.persistent_workers
    shipped = next(iter(ours))
    assert shipped[0]["rgb"].dtype == torch.uint8 and shipped[0]["semseg"].dtype == torch.uint8
    a, b = finish(shipped)[0], next(iter(pil))[0]
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}
    tool._shutdown(ours)
    tool._shutdown(pil)


def test_write_benchmark_images_reuses_a_complete_folder(tmp_path):
    root = write_benchmark_images(str(tmp_path), num_images=3, image_size=32, unique=2)
    files = sorted(p.name for p in (Path(root) / "rgb" / "scenes").iterdir())
    assert files == ["img_000000.jpg", "img_000001.jpg", "img_000002.jpg"]
    from PIL import Image
    depth = np.array(Image.open(Path(root) / "depth" / "scenes" / "img_000002.png"))
    assert depth.dtype == np.uint16
    mtime = (Path(root) / "rgb" / "scenes" / "img_000000.jpg").stat().st_mtime_ns
    write_benchmark_images(str(tmp_path), num_images=3, image_size=32, unique=2)
    assert (Path(root) / "rgb" / "scenes" / "img_000000.jpg").stat().st_mtime_ns == mtime


def test_pretrain_transform_fast_path_equals_the_v2_tv_tensors_formulation():
    """The lean PretrainTransform (crop views, uint8 channels-last resampling) gives bit-identical output to
    the v2 transforms on tv_tensors (crop -> resize -> flip -> finish) it replaced, RNG use included."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    from utils.data.modalities import MODALITIES, get_modality, unregister_modality
    from utils.data.synthetic import register_normal_modality
    from utils.data.transforms import PretrainTransform

    created = "normal" not in MODALITIES
    register_normal_modality()
    try:
        _check_against_reference(PretrainTransform, get_modality, tv_tensors, TF)
    finally:
        if created:
            unregister_modality("normal")


def _check_against_reference(PretrainTransform, get_modality, tv_tensors, TF):
    def reference(t, sample):
        mods = {n: get_modality(n) for n in sample}
        wrapped = {n: tv_tensors.Image(x) if mods[n].kind == "rgb" else tv_tensors.Image(x.float())
                   if mods[n].kind == "dense" else tv_tensors.Mask(x) for n, x in sample.items()}
        out = t.crop(wrapped)
        flip = t.hflip > 0 and bool(torch.rand(()) < t.hflip)
        return {n: t._finish(mods[n], (TF.horizontal_flip(x) if flip else x).as_subclass(torch.Tensor), flip)
                for n, x in out.items()}

    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        H, W = torch.randint(20, 120, (2,), generator=g).tolist()
        sample = {"rgb": torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g),
                  "depth": torch.randint(0, 65536, (1, H, W), dtype=torch.int32, generator=g),
                  "semseg": torch.randint(0, 133, (1, H, W), dtype=torch.uint8, generator=g),
                  "mask_valid": torch.randint(0, 2, (1, H, W), generator=g).to(torch.uint8) * 255,
                  "normal": torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)}
        t = PretrainTransform(input_size=4 * (seed + 4), hflip=0.5, interpolation=("bicubic", "bilinear")[seed % 2])
        torch.manual_seed(seed)
        expected, after_ref = reference(t, sample), torch.rand(())
        torch.manual_seed(seed)
        got, after_new = t(sample), torch.rand(())
        assert after_ref == after_new  # same random draws consumed
        for k in expected:
            assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), (seed, k)


@pytest.mark.parametrize("groups, transposed", [(1, False), (8, False), (1, True)])
def test_count_flops_of_convolutions_forward_and_backward(groups, transposed):
    """Backward = 2x forward (input and weight gradients), also for grouped/depthwise convolutions, where
    torch's own formula is off by about the number of groups."""
    conv = (torch.nn.ConvTranspose2d(8, 16, 2, stride=2) if transposed
            else torch.nn.Conv2d(8, 16, 3, padding=1, groups=groups))
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    spatial = 10 * 10  # output positions (conv) or input positions (transposed conv)
    assert forward == 2 * 2 * spatial * conv.weight.numel()
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


_EAGER_RETURN_PROBE = """
import sys, torch
from tools.lib.benchmark import eager_memory_return, rss_bytes
with eager_memory_return() as ok:
    if not ok:
        sys.exit(3)
    before = rss_bytes()
    chunks = [torch.ones(2 ** 18) for _ in range(64)]  # 64 x 1 MiB, below glibc's default 32 MiB cap
    grown = rss_bytes() - before
    del chunks
    released = grown - (rss_bytes() - before)
print(grown, released)
"""


def test_eager_memory_return_makes_resident_size_follow_live_tensors():
    """In a fresh process (in a long-lived one, glibc first reuses free heap chunks left by earlier work,
    which stay resident -- the reason step memory is counted from allocation records instead)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _EAGER_RETURN_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode == 3:
        pytest.skip("glibc mallopt not available")
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown, released = map(int, proc.stdout.split()[-2:])
    assert grown > 50 * 2 ** 20 and released > 50 * 2 ** 20


class _HostSyncRecorder:
    """Dispatch mode recording the ops that need tensor *values* on the host (``.item()``, ``bool(t)``,
    ``nonzero``/boolean-mask indexing...): on CUDA each of them stalls the host until the GPU catches up.

    Exempt: torch.optim's ``_get_value`` of the per-parameter ``step`` counters, which torch keeps on the
    CPU (also when training on CUDA) unless the optimizer is fused or capturable."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal")

    def __init__(self):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        def host_counter() -> bool:
            return any(f.name == "_get_value" and "torch/optim" in f.filename.replace("\\", "/")
                       for f in traceback.extract_stack(limit=12))

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__ in recorder.SYNC_OPS and not host_counter():
                    recorder.calls.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        self.calls, self.mode = [], Mode()


def test_pretraining_step_has_no_host_sync():
    """Forward, losses, backward, gradient norm and AdamW of the pre-training step (as the engine runs it)
    never read a tensor value on the host."""
    args = tool.get_args_parser().parse_args(["--quick"])
    tool.apply_quick(args)
    from utils.engine.optim import create_optimizer
    model, step, batch, groups = tool.build_mode("pretrain", args, torch.device("cpu"))
    from argparse import Namespace
    opt = create_optimizer(Namespace(opt="adamw", lr=1e-4, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                                     momentum=0.9), groups(model))
    runner = tool.StepRunner(Variant("sdpa"), model, opt, step, batch, torch.device("cpu"))
    runner()  # first step creates the optimizer state
    rec = _HostSyncRecorder()
    with rec.mode:
        runner()
    assert rec.calls == []
    probe = _HostSyncRecorder()  # the recorder itself works
    with probe.mode:
        bool(torch.ones(1) > 0)
    assert probe.calls == ["_local_scalar_dense"]
