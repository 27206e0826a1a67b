"""Evaluation metrics accumulated over a whole split, with an exact `torch.distributed` reduction.

Every accumulator keeps plain sums/counts on the device of the predictions (no host sync per
`update`), `reduce_across_processes()` all-reduces them once at the end of evaluation (a no-op when
no process group is initialised, so single-process runs need none), and `compute()` turns them into
numbers. Because only sums are reduced, N processes give the single-process result: integer counts
exactly, float64 sums up to the order of addition (~1e-16 relative).

Note: a `DistributedSampler` pads the last shard with repeated samples; for exact split metrics the
evaluation loader must shard without padding (uneven shards are fine, the reduction does not care).
"""
from __future__ import annotations

import math
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from timm.utils import accuracy  # noqa: F401  (re-exported: top-k accuracy in percent for one batch)
from torch import Tensor

__all__ = ["accuracy", "all_reduce_sum", "SegmentationMetrics", "DepthMetrics", "depth_metrics",
           "ClassificationMetrics", "MeanAccumulator"]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum `t` over all processes (returns `t` unchanged without an initialised process group).

    Works for CPU tensors under NCCL too (moved to the current CUDA device for the call).
    """
    if not _dist_ready():
        return t
    comm_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    buf = t.detach().to(comm_device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _count_into(counts: Tensor, index: Tensor) -> None:
    """counts[index[i]] += 1 for every i, without a host sync (CUDA bincount syncs to size its output)."""
    if counts.device.type == "cpu":
        counts += torch.bincount(index, minlength=counts.numel())
    else:
        counts.index_add_(0, index, torch.ones_like(index))


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a 0-d tensor on ``like``'s device and dtype. A Python number is written with a fill kernel:
    ``torch.tensor(x, device='cuda')`` copies from the host and waits for the device, once per batch."""
    if isinstance(value, Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype).reshape(())
    return torch.full((), float(value), dtype=like.dtype, device=like.device)


_M = TypeVar("_M", bound="_SummedMetric")


def _pct(x: float) -> float:
    return round(x * 100.0, 2) if not math.isnan(x) else float("nan")


class SegmentationMetrics:
    """Confusion matrix of semantic segmentation over a split; mIoU / mean acc / pixel acc in percent.

    MMSeg-style numbers (the convention of the paper's tables): ground-truth pixels equal to `ignore_index`
    are dropped, ground-truth void (== num_classes, the extra channel of `seg_use_void_label`) is ignored
    too, and class scores that are 0/0 (IoU of a class absent from both prediction and ground truth,
    accuracy of a class absent from the ground truth) are NaN and skipped by the means.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        # rows = ground truth, columns = prediction; int64 so any split size and the reduction stay exact
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64,
                                     device=device or "cpu")
        self._reduced = False

    def reset(self) -> None:
        self.confusion.zero_()
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch. pred: logits (B, K', H, W) with K' >= num_classes (argmax over the first
        num_classes channels, so a void channel is never predicted) or labels (B, H, W);
        target: (B, H, W) or (B, 1, H, W) integer labels."""
        k = self.num_classes
        if pred.is_floating_point():
            if pred.dim() != 4 or pred.shape[1] < k:
                raise ValueError(f"logits of shape {tuple(pred.shape)}: expected (B, >={k}, H, W)")
            pred = pred[:, :k].argmax(dim=1)
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if pred.shape != target.shape:
            raise ValueError(f"prediction labels {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if self.confusion.device != pred.device:
            self.confusion = self.confusion.to(pred.device)
        pred, target = pred.reshape(-1).long(), target.to(pred.device).reshape(-1).long()
        # ignore index, void (== k) and anything out of range all land in the extra bin k*k, dropped below
        valid = (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
        index = torch.where(valid, target * k + pred, torch.full_like(target, k * k))
        counts = torch.zeros(k * k + 1, dtype=torch.int64, device=pred.device)
        _count_into(counts, index)
        self.confusion += counts[:-1].view(k, k)
        self._reduced = False

    def reduce_across_processes(self) -> "SegmentationMetrics":
        """Sum the confusion matrices of all processes in place (once; no-op without a process group)."""
        if not self._reduced:
            self.confusion = all_reduce_sum(self.confusion)
            self._reduced = True
        return self

    def compute(self) -> dict:
        """{'pixel_accuracy', 'mean_accuracy', 'mean_iou'} in percent rounded to 2 decimals (NaN if
        nothing was counted), plus 'iou_per_class' / 'acc_per_class' lists (percent, NaN = undefined)."""
        cm = self.confusion.double().cpu()
        inter = cm.diag()
        area_label, area_pred = cm.sum(dim=1), cm.sum(dim=0)
        union = area_label + area_pred - inter
        iou = inter / union  # 0/0 -> NaN on purpose
        acc = inter / area_label
        total = area_label.sum()
        pixel_acc = (inter.sum() / total).item() if total > 0 else float("nan")
        return {
            "pixel_accuracy": _pct(pixel_acc),
            "mean_accuracy": _pct(acc.nanmean().item()),
            "mean_iou": _pct(iou.nanmean().item()),
            "iou_per_class": [_pct(v) for v in iou.tolist()],
            "acc_per_class": [_pct(v) for v in acc.tolist()],
        }


class _SummedMetric:
    """A metric kept as one vector of running sums (`sums`, float64 where the device has it), which
    `reduce_across_processes` adds up over all processes before `compute` reads it."""

    def __init__(self, size: int, device: torch.device | str | None = None):
        device = torch.device(device or "cpu")
        self.sums = torch.zeros(size, dtype=_acc_dtype(device), device=device)
        self._reduced = False

    def reset(self) -> None:
        self.sums.zero_()
        self._reduced = False

    def _add(self, sums: Tensor) -> None:
        """Add one batch's sums (same layout as `sums`), following their device and dtype."""
        if self.sums.device != sums.device or self.sums.dtype != sums.dtype:
            self.sums = self.sums.to(device=sums.device, dtype=sums.dtype)
        self.sums += sums
        self._reduced = False

    def reduce_across_processes(self: _M) -> _M:
        """Sum the running sums of all processes in place (once; no-op without a process group)."""
        if not self._reduced:
            self.sums = all_reduce_sum(self.sums)
            self._reduced = True
        return self


_DEPTH_SUMS = ("n", "abs_rel", "sq_rel", "sq_err", "sq_log_err", "delta1", "delta2", "delta3")


class DepthMetrics(_SummedMetric):
    """Standard monocular-depth metrics accumulated per valid pixel over a split.

    delta{1,2,3}: fraction of pixels with max(p/t, t/p) < 1.25^k; abs_rel = mean|p-t|/t;
    sq_rel = mean (p-t)^2/t; rmse = sqrt(mean (p-t)^2); rmse_log = sqrt(mean (ln p - ln t)^2) (natural
    log). Values are de-standardised first (x * std + mean) when
    mean/std are given (e.g. NYU_MEAN/NYU_STD) and clamped to >= `eps` for ratios and logs.
    ``mode='pooled'``: every pixel weighs the same, whatever batch it came from. ``mode='batch'`` (the
    evaluation of the paper's tables): each batch's metrics over its valid pixels, then the
    mean over batches with equal weight per batch (batches without a valid pixel are left out).
    """

    def __init__(self, mean: float | None = None, std: float | None = None, eps: float = 1e-6,
                 device: torch.device | str | None = None, mode: str = "pooled"):
        if mode not in ("pooled", "batch"):
            raise ValueError(f"depth metrics mode must be 'pooled' or 'batch', got {mode!r}")
        super().__init__(len(_DEPTH_SUMS), device)
        self.mean, self.std, self.eps, self.mode = mean, std, eps, mode

    @staticmethod
    def _batch_values(sums: Tensor) -> Tensor:
        """One batch's metrics laid out like ``sums``: slot 0 = 1 if the batch had valid pixels (a batch
        count), then abs_rel, sq_rel, rmse, rmse_log, delta1..3 of that batch (0 without valid pixels)."""
        n = sums[0]
        has = (n > 0).to(sums.dtype)
        mean = sums[1:] / n.clamp_min(1)
        mean = torch.cat([mean[:2], mean[2:4].sqrt(), mean[4:]])
        return torch.cat([has[None], mean * has])

    def _destandardise(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.std is not None:
            x = x * self.std
        if self.mean is not None:
            x = x + self.mean
        return x

    @torch.no_grad()
    def batch_sums(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Per-pixel sums of one batch (order of `_DEPTH_SUMS`). pred, target: (B, 1, H, W) or (B, H, W);
        mask: bool of the same shape (or (B, 1, H, W)), True = valid; None = every pixel valid."""
        if pred.shape != target.shape:
            raise ValueError(f"depth prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        p = self._destandardise(pred).clamp_min(self.eps)
        t = self._destandardise(target).clamp_min(self.eps)
        m = torch.ones_like(p, dtype=torch.bool) if mask is None else mask.to(torch.bool).reshape(p.shape)
        d = p - t
        ratio = torch.maximum(p / t, t / p)
        log_d = torch.log(p) - torch.log(t)
        acc = _acc_dtype(p.device)
        zero = p.new_zeros(())

        def msum(x: Tensor) -> Tensor:
            return torch.where(m, x, zero).sum(dtype=acc)

        return torch.stack([
            m.sum(dtype=acc), msum(d.abs() / t), msum(d.square() / t), msum(d.square()), msum(log_d.square()),
            *(msum((ratio < 1.25 ** k).to(p.dtype)) for k in (1, 2, 3)),
        ])

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch (shapes as `batch_sums`)."""
        sums = self.batch_sums(pred, target, mask)
        self._add(self._batch_values(sums) if self.mode == "batch" else sums)

    @staticmethod
    def _finish(sums: Tensor) -> dict[str, float]:
        s = dict(zip(_DEPTH_SUMS, sums.double().cpu().tolist()))
        n = s["n"]
        if n == 0:
            return {k: float("nan") for k in ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log")}
        return {
            "delta1": s["delta1"] / n, "delta2": s["delta2"] / n, "delta3": s["delta3"] / n,
            "abs_rel": s["abs_rel"] / n, "sq_rel": s["sq_rel"] / n,
            "rmse": math.sqrt(s["sq_err"] / n), "rmse_log": math.sqrt(s["sq_log_err"] / n),
        }

    def compute(self) -> dict[str, float]:
        """{'delta1', 'delta2', 'delta3', 'abs_rel', 'sq_rel', 'rmse', 'rmse_log'} (NaN without pixels)."""
        if self.mode == "pooled":
            return self._finish(self.sums)
        s = dict(zip(_DEPTH_SUMS, self.sums.double().cpu().tolist()))
        n = s.pop("n")
        names = {"sq_err": "rmse", "sq_log_err": "rmse_log"}
        return {names.get(k, k): (v / n if n else float("nan")) for k, v in s.items()}


def depth_metrics(pred: Tensor, target: Tensor, mask: Tensor | None = None, mean: float | None = None,
                  std: float | None = None) -> dict[str, float]:
    """Depth metrics of a single batch (host sync: call at logging intervals only). See `DepthMetrics`."""
    return DepthMetrics._finish(DepthMetrics(mean, std).batch_sums(pred, target, mask))


class ClassificationMetrics(_SummedMetric):
    """Top-k accuracy (percent) and mean loss over a split, every sample weighted equally."""

    def __init__(self, topk: Sequence[int] = (1, 5), device: torch.device | str | None = None):
        self.topk = tuple(topk)
        # [n, loss_sum, correct@k...]; float64 holds integer counts exactly up to 2**53
        super().__init__(2 + len(self.topk), device)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor, loss: Tensor | float | None = None) -> None:
        """Add a batch. logits: (B, num_classes); target: (B,) class indices; loss: mean loss of the
        batch (weighted by B). k larger than num_classes counts every sample as correct."""
        b = logits.shape[0]
        maxk = min(max(self.topk), logits.shape[1])
        top = logits.topk(maxk, dim=1).indices  # (B, maxk)
        hit = top.eq(target.view(-1, 1).to(top.device))
        acc = _acc_dtype(logits.device)
        correct = [hit[:, :min(k, maxk)].any(dim=1).sum(dtype=acc) for k in self.topk]
        like = logits.new_zeros((), dtype=acc)
        loss_sum = _scalar(0.0 if loss is None else loss, like) * b
        self._add(torch.stack([_scalar(b, like), loss_sum, *correct]))

    def compute(self) -> dict[str, float]:
        """{'loss', 'acc1', 'acc5', ...} (accuracies in percent; NaN without samples)."""
        s = self.sums.double().cpu().tolist()
        n = s[0]
        if n == 0:
            return {"loss": float("nan"), **{f"acc{k}": float("nan") for k in self.topk}}
        return {"loss": s[1] / n, **{f"acc{k}": 100.0 * c / n for k, c in zip(self.topk, s[2:])}}


class MeanAccumulator:
    """Weighted means of named scalars (e.g. per-batch losses weighted by batch size) over a split."""

    def __init__(self):
        self._sums: dict[str, Tensor] = {}  # name -> [weight_sum, weighted_value_sum]
        self._reduced = False

    @torch.no_grad()
    def update(self, n: int | float = 1, **values: Tensor | float) -> None:
        """Add `values` (0-d tensors or numbers, each the mean over `n` samples) with weight n."""
        for name, v in values.items():
            acc = self._sums.get(name)
            if isinstance(v, Tensor) and (acc is None or acc.device != v.device):
                # follow the device of the values: a CPU accumulator fed device losses would copy each
                # batch's loss to the host (one device sync per batch)
                dev = v.device
                acc = (torch.zeros(2, dtype=_acc_dtype(dev), device=dev) if acc is None
                       else acc.to(device=dev, dtype=_acc_dtype(dev)))
            elif acc is None:
                acc = torch.zeros(2, dtype=torch.float64)
            acc += torch.stack([acc.new_ones(()), _scalar(v, acc)]) * n
            self._sums[name] = acc
        self._reduced = False

    def reduce_across_processes(self) -> "MeanAccumulator":
        """Sum over processes. Every process must have updated the same set of names."""
        if not self._reduced and self._sums:
            names = sorted(self._sums)
            dev = self._sums[names[0]].device
            total = all_reduce_sum(torch.stack([self._sums[k].to(dev, _acc_dtype(dev)) for k in names]))
            self._sums = dict(zip(names, total.unbind(0)))
            self._reduced = True
        return self

    def compute(self) -> dict[str, float]:
        """{name: weighted mean} (NaN for a name with zero total weight)."""
        out = {}
        for name, acc in self._sums.items():
            w, v = acc.double().cpu().tolist()
            out[name] = v / w if w else float("nan")
        return out
