"""``tools/benchmark.py --reference_impl`` (a stand-in reference package that wraps this project's multimae,
so no published code is needed) and the quick mode of the GPU report ``tools/gpu_benchmark.py``."""
import json
import textwrap
from argparse import Namespace

import pytest
import torch

from tools import benchmark, gpu_benchmark
from tools.lib.bench_reference import build_reference_pretrain, load_reference_package, reference_pretrain_step
from tools.lib.bench_steps import build_mode

# Like the published package: re-exports the model classes and imports register_model from a top-level
# utils.registry that this project does not have (the loader answers that import).
STAND_IN = textwrap.dedent('''
    from utils.registry import register_model
    from multimae import (MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss, MultiMAE, PatchedInputAdapter,
                          SemSegInputAdapter, SpatialOutputAdapter)

    @register_model
    def marker():
        return "stand-in"
''')


@pytest.fixture
def stand_in(tmp_path):
    (tmp_path / "multimae").mkdir()
    (tmp_path / "multimae" / "__init__.py").write_text(STAND_IN)
    return str(tmp_path)


def _quick_args(**kw) -> Namespace:
    args = benchmark.get_args_parser().parse_args(["--quick", "--mode", "pretrain", *kw.pop("argv", [])])
    benchmark.apply_quick(args)
    return args


def test_reference_model_gets_our_weights_and_gives_our_loss(stand_in):
    pkg = load_reference_package(stand_in)
    assert pkg.marker() == "stand-in" and pkg.__name__ != "multimae"
    import multimae
    assert multimae.MultiMAE is pkg.MultiMAE  # this project's package is not shadowed
    args = _quick_args()
    model, step, batch, _ = build_mode("pretrain", args, torch.device("cpu"))
    ref = build_reference_pretrain(pkg, model, args)
    assert ref is not model
    for (n, a), (m, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ref_step = reference_pretrain_step(pkg, step, args)
    assert set(ref_step.losses) == set(step.losses) == {"rgb", "depth", "semseg", "norm_rgb"}
    torch.manual_seed(3)
    ours_loss = step(model, batch)[0]
    torch.manual_seed(3)
    ref_loss = ref_step(ref, batch)[0]
    assert torch.allclose(ours_loss, ref_loss, rtol=1e-5), (ours_loss, ref_loss)


def test_benchmark_puts_the_reference_column_first(stand_in, tmp_path):
    out = benchmark.main(["--quick", "--mode", "pretrain", "--reference_impl", stand_in,
                          "--json", str(tmp_path / "r.json")])
    rows = out["results"][0]["rows"]
    assert [r["variant"] for r in rows] == ["published", "math", "auto+fused"]
    assert rows[0]["speedup_vs_published"] == 1.0
    for r in rows:
        assert r["speedup_vs_published"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
        assert r["speedup_vs_math"] == pytest.approx(r["images_per_s"] / rows[1]["images_per_s"])
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["rows"][0]["variant"] == "published"


def test_reference_impl_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="expected a folder holding a 'multimae' package"):
        load_reference_package(str(tmp_path))
    (tmp_path / "multimae").mkdir()
    (tmp_path / "multimae" / "__init__.py").write_text("from multimae import MultiMAE\n")
    with pytest.raises(ValueError, match=r"lacks \['PatchedInputAdapter'"):
        load_reference_package(str(tmp_path))


def test_gpu_report_quick_writes_json_and_markdown(tmp_path):
    out_dir = tmp_path / "report"
    gpu_benchmark.main([str(out_dir), "--quick"])
    report = json.loads((out_dir / "gpu_report.json").read_text())
    rows = report["model"]["result"]["rows"]
    assert [r["variant"] for r in rows] == gpu_benchmark.QUICK_VARIANTS.split(",")
    assert all(r["images_per_s"] > 0 and r["step_memory_mb"] > 0 for r in rows)
    assert {(r["pipeline"], r["workers"]) for r in report["data"]["rows"]} == {
        (p, w) for p in ("pil", "ours") for w in (0, 1)}
    md = (out_dir / "gpu_report.md").read_text()
    for r in rows:
        assert f"| `{r['variant']}` | {r['median_s'] * 1e3:.0f} ms |" in md
    assert md.count("\n| 1 | ") == 2  # one row per pipeline with one worker
