import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.finetune.metrics import (ClassificationMetrics, DepthMetrics, MeanAccumulator, SegmentationMetrics, accuracy,
                           depth_metrics)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- semantic segmentation
GT = torch.tensor([[[0, 0, 1, 1],
                    [2, 255, 1, 0]]])
PRED = torch.tensor([[[0, 1, 1, 1],
                      [0, 2, 1, 0]]])
# by hand (pixel (1,1) ignored): inter = [2, 3, 0], label = [3, 3, 1], pred = [3, 4, 0], union = [4, 4, 1]
HAND = {"pixel_accuracy": round(100 * 5 / 7, 2),
        "mean_accuracy": round(100 * (2 / 3 + 1 + 0) / 3, 2),
        "mean_iou": round(100 * (0.5 + 0.75 + 0) / 3, 2)}


def _seg(num_classes, pred, gt, **kw):
    m = SegmentationMetrics(num_classes, **kw)
    m.update(pred, gt)
    return m.compute()


def test_semseg_hand_computed_with_ignore_index():
    out = _seg(3, PRED, GT)
    assert {k: out[k] for k in HAND} == HAND
    assert out["iou_per_class"] == [50.0, 75.0, 0.0]
    assert out["acc_per_class"] == [round(200 / 3, 2), 100.0, 0.0]


def test_semseg_class_absent_from_pred_and_gt_is_skipped():
    out = _seg(5, PRED, GT)  # classes 3 and 4 never appear
    assert {k: out[k] for k in HAND} == HAND
    assert math.isnan(out["iou_per_class"][3]) and math.isnan(out["acc_per_class"][4])


def test_semseg_predicted_but_absent_class_counts_as_zero_iou():
    pred = torch.tensor([[[0, 2]]])
    gt = torch.tensor([[[0, 0]]])
    out = _seg(3, pred, gt)
    # class 0: iou 1/2, acc 1/2; class 2: iou 0 (predicted, not in gt), acc NaN (no gt pixel); class 1 absent
    assert out["mean_iou"] == 25.0 and out["mean_accuracy"] == 50.0
    assert math.isnan(out["acc_per_class"][2]) and out["iou_per_class"][2] == 0.0


def test_semseg_void_label_logits_and_gt():
    k = 3
    logits = torch.nn.functional.one_hot(PRED, k + 1).permute(0, 3, 1, 2).float()
    logits[:, k] = 10.0  # the void channel would win an argmax over all K+1 channels
    gt = GT.clone()
    gt[0, 0, 1] = k  # a void ground-truth pixel is ignored like 255
    out = _seg(k, logits, gt[:, None])  # (B, 1, H, W) targets are accepted
    # dropping pixel (0,1) (g0 p1) from the hand case: inter [2,3,0], label [2,3,1], pred [3,3,0]
    assert out["pixel_accuracy"] == round(100 * 5 / 6, 2)
    assert out["iou_per_class"] == [round(100 * 2 / 3, 2), 100.0, 0.0]


def test_semseg_split_accumulation_differs_from_batch_average():
    b1 = (torch.tensor([[[0, 0, 0, 1]]]), torch.tensor([[[0, 0, 0, 0]]]))  # mIoU (3/4 + 0) / 2 = 37.5
    b2 = (torch.tensor([[[1]]]), torch.tensor([[[1]]]))  # mIoU 100 (class 0 absent)
    m = SegmentationMetrics(2)
    for p, g in (b1, b2):
        m.update(p, g)
    # whole split: iou0 = 3/4, iou1 = 1/2 -> 62.5, not (37.5 + 100) / 2 = 68.75
    assert m.compute()["mean_iou"] == 62.5
    assert (_seg(2, *b1)["mean_iou"] + _seg(2, *b2)["mean_iou"]) / 2 == 68.75
    m.reset()
    assert math.isnan(m.compute()["mean_iou"])


def test_semseg_bad_logits_shape_is_an_error():
    with pytest.raises(ValueError, match=r"expected \(B, >=5, H, W\)"):
        SegmentationMetrics(5).update(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------- depth
def _depth_case():
    pred = torch.tensor([1.0, 1.8, 4.0, 8.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 4.0, 2.0]).view(1, 1, 2, 2)
    mask = torch.tensor([True, True, True, False]).view(1, 1, 2, 2)
    return pred, target, mask


def test_depth_hand_computed_with_mask():
    out = depth_metrics(*_depth_case())
    # valid pixels: (1,1), (1.8,1), (4,4); ratio 1.8 fails delta1/delta2, passes delta3 (1.25^3 = 1.95)
    expected = {"delta1": 2 / 3, "delta2": 2 / 3, "delta3": 1.0, "abs_rel": 0.8 / 3, "sq_rel": 0.64 / 3,
                "rmse": math.sqrt(0.64 / 3), "rmse_log": math.sqrt(math.log(1.8) ** 2 / 3)}
    assert out == pytest.approx(expected, rel=1e-6)


def test_depth_destandardises_with_mean_std():
    pred, target, mask = _depth_case()
    mean, std = 2070.7764, 777.5723
    std_out = depth_metrics((pred - mean) / std, (target - mean) / std, mask, mean=mean, std=std)
    # float32 round trip through a large offset costs ~1e-4 relative precision
    assert std_out == pytest.approx(depth_metrics(pred, target, mask), rel=1e-3)


def test_depth_per_pixel_not_per_batch():
    m = DepthMetrics()
    m.update(torch.tensor([2.0]).view(1, 1, 1, 1), torch.tensor([1.0]).view(1, 1, 1, 1))  # abs_rel 1
    m.update(torch.ones(1, 1, 1, 3), torch.ones(1, 1, 1, 3))  # abs_rel 0
    assert m.compute()["abs_rel"] == pytest.approx(0.25)  # per-batch averaging would give 0.5
    m.reset()
    assert math.isnan(m.compute()["rmse"])


def _published_batch_metrics(p, t, m, mean, std):
    """The published per-batch NYU metrics (numpy): de-standardise, clamp at 1e-6, valid pixels only."""
    p = np.maximum(p * std + mean, 1e-6)[m]
    t = np.maximum(t * std + mean, 1e-6)[m]
    d = p - t
    ratio = np.maximum(p / t, t / p)
    return {"rmse": np.sqrt(np.mean(d ** 2)), "abs_rel": np.mean(np.abs(d) / t), "sq_rel": np.mean(d ** 2 / t),
            "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(t)) ** 2)),
            **{f"delta{k}": np.mean(ratio < 1.25 ** k) for k in (1, 2, 3)}}


def test_depth_batch_mode_is_the_published_mean_of_batch_metrics():
    g = torch.Generator().manual_seed(3)
    mean, std = 2070.7764, 777.5723
    m = DepthMetrics(mean=mean, std=std, mode="batch")
    per_batch = []
    for b in range(3):  # batches of unequal valid-pixel counts: per-batch and pooled means differ
        p, t = torch.randn(b + 1, 1, 5, 6, generator=g), torch.randn(b + 1, 1, 5, 6, generator=g)
        mask = torch.rand(b + 1, 1, 5, 6, generator=g) > 0.2 * (b + 1)
        m.update(p, t, mask)
        per_batch.append(_published_batch_metrics(p.double().numpy(), t.double().numpy(), mask.numpy(), mean, std))
    expected = {k: float(np.mean([r[k] for r in per_batch])) for k in per_batch[0]}
    assert m.compute() == pytest.approx(expected, rel=1e-4)
    m.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.bool))
    assert m.compute() == pytest.approx(expected, rel=1e-4)  # a batch without valid pixels is left out
    with pytest.raises(ValueError, match="'pooled' or 'batch'"):
        DepthMetrics(mode="pixel")


# ---------------------------------------------------------------- classification / means
def test_classification_topk_weighted_by_batch():
    m = ClassificationMetrics(topk=(1, 2, 5))
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    m.update(logits, torch.tensor([0, 2, 0]), loss=torch.tensor(1.0))  # top1: 1/3, top2: 2/3
    m.update(logits[:1], torch.tensor([1]), loss=4.0)  # top1: 0, top2: 1
    out = m.compute()
    assert out == pytest.approx({"loss": (3 * 1 + 4) / 4, "acc1": 25.0, "acc2": 75.0, "acc5": 100.0})
    # timm's per-batch accuracy is re-exported and agrees on a single batch
    assert accuracy(logits, torch.tensor([0, 2, 0]), topk=(1,))[0].item() == pytest.approx(100 / 3)


def test_mean_accumulator_weights():
    acc = MeanAccumulator()
    acc.update(n=3, loss=torch.tensor(1.0), other=2.0)
    acc.update(n=1, loss=5.0)
    assert acc.compute() == pytest.approx({"loss": 2.0, "other": 2.0})


# ---------------------------------------------------------------- distributed reduction
def _random_split(seed=0, batches=5):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(batches):
        logits = torch.randn(2, 5, 6, 7, generator=g)  # 4 classes + void channel
        gt = torch.randint(0, 6, (2, 6, 7), generator=g)  # includes void (4) and out-of-range 5
        gt[gt == 5] = 255
        depth_p = torch.randn(2, 1, 6, 7, generator=g)
        depth_t = torch.randn(2, 1, 6, 7, generator=g)
        depth_m = torch.rand(2, 1, 6, 7, generator=g) > 0.3
        cls_logits = torch.randn(3, 10, generator=g)
        cls_t = torch.randint(0, 10, (3,), generator=g)
        data.append((logits, gt, depth_p, depth_t, depth_m, cls_logits, cls_t))
    return data


def _evaluate(batches):
    seg, dep, cls = SegmentationMetrics(4), DepthMetrics(mean=2000.0, std=700.0), ClassificationMetrics()
    mean = MeanAccumulator()
    for logits, gt, dp, dt, dm, cl, ct in batches:
        seg.update(logits, gt)
        dep.update(dp, dt, dm)
        cls.update(cl, ct, loss=torch.nn.functional.cross_entropy(cl, ct))
        mean.update(n=cl.shape[0], loss=torch.nn.functional.cross_entropy(cl, ct))
    for m in (seg, dep, cls, mean):
        m.reduce_across_processes()
    return {"seg": seg.compute(), "seg_cm": seg.confusion, "depth": dep.compute(), "cls": cls.compute(),
            "mean": mean.compute()}


WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_metrics import _random_split, _evaluate

def run(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    data = _random_split()
    shard = data[:3] if rank == 0 else data[3:]  # uneven shards, as a non-padding eval sampler gives
    res = _evaluate(shard)
    if rank == 0:
        torch.save(res, out_file)
    dist.destroy_process_group()

if __name__ == "__main__":
    run(int(sys.argv[1]), 2, sys.argv[2], sys.argv[3])
"""


def test_two_process_gloo_reduction_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(repo=str(REPO), tests=str(REPO / "tests"))))
    out = tmp_path / "res.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # two plain processes (cheaper than torch.multiprocessing.spawn, which re-imports torch in a third)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path / "init"), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    dist_res = torch.load(out, weights_only=False)
    single = _evaluate(_random_split())  # no process group: reduction is a no-op
    assert torch.equal(dist_res["seg_cm"], single["seg_cm"])
    assert dist_res["seg"] == single["seg"]
    assert dist_res["cls"] == pytest.approx(single["cls"], rel=1e-12)
    assert dist_res["mean"] == pytest.approx(single["mean"], rel=1e-12)
    assert dist_res["depth"] == pytest.approx(single["depth"], rel=1e-12)
    assert single["seg_cm"].sum() > 0 and 0 < single["depth"]["delta1"] < 1
