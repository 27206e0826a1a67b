"""CUDA- and cluster-only code paths, exercised on the CPU: stage-1 contrastive loss under fp16 autocast,
the SLURM device index with one GPU per task, per-device CUDA RNG state in checkpoints, DDP's
unused-parameter search, TF32 and ``--deterministic`` flags, and evaluation accumulators that stay on the
device of the predictions (meta tensors stand in for a device: reading one on the host raises)."""
import argparse
import os

import pytest
import torch

import utils.dist as dist_utils
import utils.engine.trainer as trainer_mod
from multimae.rgbd_contrastive import patch_info_nce, patch_retrieval_accuracy
from utils.finetune.metrics import ClassificationMetrics, DepthMetrics, MeanAccumulator, SegmentationMetrics


# ---------------------------------------------------------------------------------------------- fp16 stage 1
def test_contrastive_losses_run_under_fp16_autocast():
    z = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, 2] = False  # masked logits: filled with a value far outside half's range
    ref = patch_info_nce(z, z.roll(1, dims=1), torch.tensor(10.0), valid)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = patch_info_nce(z, z.roll(1, dims=1), torch.tensor(10.0), valid)
        acc = patch_retrieval_accuracy(z, z, valid)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    assert acc.item() == 1.0


def test_stage1_step_runs_under_fp16_autocast():
    from test_rgbd_contrastive import batch, tiny_args
    from utils.pretrain.rgbd import build_rgbd_model, build_rgbd_step

    args = tiny_args()
    model = build_rgbd_model(args)
    step = build_rgbd_step(args, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.float16):
        loss, logs = step(model, batch())
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()


# ---------------------------------------------------------------------------------------------- SLURM
def _slurm_env(monkeypatch, local_id, ntasks=8, visible=1):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", str(local_id))
    monkeypatch.setenv("SLURM_NTASKS", str(ntasks))
    monkeypatch.setenv("SLURM_LOCALID", str(local_id))
    monkeypatch.setenv("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    monkeypatch.setattr(dist_utils, "set_tf32", lambda enabled: None)
    monkeypatch.setattr(dist_utils.dist, "init_process_group", lambda **kw: chosen.append(kw))
    monkeypatch.setattr(dist_utils, "barrier", lambda: None)
    return chosen


@pytest.mark.parametrize("local_id,visible,expected", [(3, 1, 0), (7, 1, 0), (5, 2, 1), (3, 8, 3)])
def test_slurm_task_picks_a_visible_gpu(monkeypatch, local_id, visible, expected):
    chosen = _slurm_env(monkeypatch, local_id, visible=visible)
    args = argparse.Namespace(device="cuda", dist_url="env://", dist_on_itp=False, dist_backend="gloo", local_rank=-1)
    try:
        ctx = dist_utils.init_distributed(args, "cuda")
    finally:
        dist_utils.destroy_distributed()
    assert ctx.device == torch.device("cuda", expected) and chosen[0] == expected
    assert chosen[1]["rank"] == local_id and chosen[1]["world_size"] == 8


def test_torchrun_with_too_few_gpus_still_fails_clearly():
    launch = dist_utils.LaunchEnv(rank=3, world_size=4, local_rank=3, launcher="torchrun")
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU: only 2 visible"):
        dist_utils.local_device_index(launch, 2)
    with pytest.raises(RuntimeError, match="sees no GPU"):
        dist_utils.local_device_index(launch._replace(launcher="slurm"), 0)


# ---------------------------------------------------------------------------------------------- CUDA RNG
class _FakeCuda:
    """Per-device generator states of a process that sees ``count`` GPUs and runs on ``current``."""

    def __init__(self, monkeypatch, count, current):
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(count)}
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(count)])

        def set_state(state, device="cuda"):
            self.states[self.current] = state.clone()

        def set_all(states):
            for i, s in enumerate(states):
                self.states[i][...] = s  # IndexError where a state has no device, as torch's own loop
                if i >= count:
                    raise IndexError(f"no cuda:{i}")
        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_checkpoint_holds_this_process_cuda_rng_state_and_resumes_on_fewer_gpus(monkeypatch):
    fake = _FakeCuda(monkeypatch, count=8, current=3)
    fake.states[3] = torch.tensor([42], dtype=torch.uint8)
    state = trainer_mod.get_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([42], dtype=torch.uint8))  # one state, not 8
    fresh = _FakeCuda(monkeypatch, count=1, current=0)  # the resumed process sees only its own GPU
    trainer_mod.set_rng_state(state)
    assert torch.equal(fresh.states[0], torch.tensor([42], dtype=torch.uint8))


def test_old_all_device_rng_lists_restore_what_fits(monkeypatch):
    old = [torch.tensor([10 + i], dtype=torch.uint8) for i in range(8)]
    fake = _FakeCuda(monkeypatch, count=1, current=0)
    trainer_mod._set_cuda_rng_state(old)
    assert fake.states[0].item() == 10
    fake = _FakeCuda(monkeypatch, count=1, current=0)
    fake.current = 2  # pretend cuda:2 is current while the list holds two devices
    with pytest.warns(UserWarning, match="CUDA RNG states for 2 device"):
        trainer_mod._set_cuda_rng_state(old[:2])


# ---------------------------------------------------------------------------------------------- DDP
def _unused_parameters(model, inputs, **kw):
    out = model(inputs, **kw)
    sum(v.float().sum() for v in (out.values() if isinstance(out, dict) else [out])).backward()
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_find_unused_parameters_only_where_a_head_leaves_some_unused():
    from multimae import (ConvNeXtAdapter, DPTOutputAdapter, LinearOutputAdapter, MultiViT, PatchedInputAdapter,
                          SpatialOutputAdapter, MultiMAE)

    x = {"rgb": torch.randn(1, 3, 32, 32)}
    heads = {"dpt": (DPTOutputAdapter(num_classes=1, patch_size=8, hooks=[0, 1, 2, 3], layer_dims=[8, 8, 8, 8],
                                      feature_dim=8), dict(return_all_layers=True)),
             "convnext": (ConvNeXtAdapter(3, embed_dim=16, preds_per_patch=4, patch_size=8, depth=1), {}),
             "cls": (LinearOutputAdapter(3), {})}
    for name, (head, kw) in heads.items():
        model = MultiViT({"rgb": PatchedInputAdapter(3, 1, 8, image_size=32)}, {name: head}, dim_tokens=16, depth=4,
                         num_heads=2)
        unused = _unused_parameters(model, x, **kw)
        assert dist_utils.ddp_find_unused_parameters(model) == bool(unused), (name, unused)
        assert dist_utils.ddp_find_unused_parameters(model, requested=True)
    pre = MultiMAE({"rgb": PatchedInputAdapter(3, 1, 8, image_size=32)},
                   {"rgb": SpatialOutputAdapter(3, 1, 8, dim_tokens=16, num_heads=2, image_size=32, task="rgb",
                                                context_tasks=["rgb"])}, dim_tokens=16, depth=2, num_heads=2)
    out, _ = pre(x, num_encoded_tokens=4)
    out["rgb"].sum().backward()
    assert all(p.grad is not None for p in pre.parameters() if p.requires_grad)
    assert not dist_utils.ddp_find_unused_parameters(pre)


def test_find_unused_params_defaults_to_off():
    import run_pretraining_multimae
    from utils.config.parser import parse_args

    args = parse_args(run_pretraining_multimae.get_args_parser(), ["--device", "cpu"])
    assert args.find_unused_params is False and args.tf32 is True


# ---------------------------------------------------------------------------------------------- TF32, determinism
@pytest.fixture
def saved_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[4:6]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def test_tf32_is_on_for_cuda_runs_with_an_opt_out(monkeypatch, saved_flags):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    args = argparse.Namespace(device="cuda", dist_on_itp=False, local_rank=-1)
    try:
        assert dist_utils.init_distributed(args, "cuda").device.type == "cuda"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        dist_utils.init_distributed(args, "cuda", tf32=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args = argparse.Namespace(device="cpu", dist_on_itp=False, local_rank=-1)
        dist_utils.init_distributed(args, "cpu")  # CPU: the flags are left alone
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        dist_utils.destroy_distributed()


def test_deterministic_on_cuda_raises_instead_of_warning(monkeypatch, saved_flags):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "garbage")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dist_utils.set_deterministic(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dist_utils.set_deterministic(True)
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # CPU-only machines keep warning
    dist_utils.set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


# ---------------------------------------------------------------------------------------------- accumulators
def test_evaluation_accumulators_stay_on_the_prediction_device():
    dev = torch.device("meta")
    losses = MeanAccumulator()
    losses.update(n=0, loss=0.0)  # as the evaluators start, before the first batch
    cls = ClassificationMetrics(device=dev)
    seg = SegmentationMetrics(3, device=dev)
    depth = DepthMetrics(device=dev)
    for _ in range(2):
        losses.update(n=4, loss=torch.tensor(1.0, device=dev))
        logits = torch.randn(4, 10, device=dev)
        cls.update(logits, torch.zeros(4, dtype=torch.long, device=dev), torch.tensor(1.0, device=dev))
        seg.update(torch.randn(2, 3, 4, 4, device=dev), torch.zeros(2, 4, 4, dtype=torch.long, device=dev))
        depth.update(torch.rand(2, 1, 4, 4, device=dev), torch.rand(2, 1, 4, 4, device=dev))
    assert losses._sums["loss"].device == dev and cls.sums.device == dev
    assert seg.confusion.device == dev and depth.sums.device == dev


def test_classification_update_copies_nothing_from_the_host(monkeypatch):
    calls = []
    real = torch.tensor

    def spy(*a, **kw):
        calls.append(kw.get("device"))
        return real(*a, **kw)

    monkeypatch.setattr(torch, "tensor", spy)
    m = ClassificationMetrics()
    m.update(torch.randn(4, 10), torch.zeros(4, dtype=torch.long), 0.5)
    assert calls == []
    assert m.compute()["loss"] == pytest.approx(0.5)
