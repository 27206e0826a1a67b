"""Engine, optimiser, metric and two-stage RGB-D behaviours that mutation testing found unguarded: each test
fails when the corresponding line is changed (train mode at the epoch start, the EMA update, weight decay
only on decayed groups, GradScaler resume, the lr scaling with ``update_freq``, no gradient skipping while
clipping, the two-sided depth delta ratio, the detached distillation teacher)."""
import pytest
import torch
from torch import nn

from utils.engine.optim import cosine_scheduler
from utils.engine.trainer import Trainer
from utils.finetune.metrics import DepthMetrics, depth_metrics

from test_engine import _trainer


# ---------------------------------------------------------------------------------------------- trainer
def test_every_epoch_starts_in_train_mode():
    trainer, loader = _trainer(epochs=2)
    seen = []
    step = trainer.step_fn

    def spy(model, batch):
        seen.append(model.training)
        model.eval()  # an evaluation callback or the step itself may leave the model in eval mode
        return step(model, batch)

    trainer.step_fn = spy
    trainer.model.eval()
    trainer.fit(loader)
    per_epoch = trainer.steps_per_epoch
    # the first step of each epoch sees train mode although the previous step switched to eval
    assert [seen[i] for i in range(0, len(seen), per_epoch)] == [True, True]


def test_ema_follows_every_optimizer_step():
    trainer, loader = _trainer(epochs=1, ema=True)
    ema = trainer.model_ema.module
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    trainer.fit(loader)
    after, model = ema.state_dict(), trainer.model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved, "the EMA weights never changed"
    # after decay-0.9 updates the EMA sits between its start and the trained weights
    w = "fc1.weight"
    assert (after[w] - model[w]).norm() < (before[w] - model[w]).norm()


def test_weight_decay_schedule_never_reaches_no_decay_groups():
    from test_engine import _Net, _data, _loader, _step_fn

    model = _Net()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim == 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05, "lr_scale": 1.0},
                                   {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0}], lr=1e-3)
    steps = 8
    trainer = Trainer(model, optimizer, _step_fn(), lr_schedule=cosine_scheduler(1e-2, 1e-4, 1, steps),
                      wd_schedule=cosine_scheduler(0.05, 0.01, 1, steps), steps_per_epoch=steps, epochs=1)
    loader = _loader(_data(), 8)
    groups = trainer.optimizer.param_groups
    no_decay = [g for g in groups if g["weight_decay"] == 0]
    assert no_decay and any(g["weight_decay"] > 0 for g in groups)
    hp = trainer.set_hparams(3)
    assert hp["weight_decay"] == pytest.approx(trainer.wd_schedule[3]) and hp["weight_decay"] > 0
    assert all(g["weight_decay"] == 0 for g in no_decay)
    trainer.fit(loader)
    assert all(g["weight_decay"] == 0 for g in no_decay)


def test_grad_scaler_state_is_restored_on_resume(tmp_path):
    trainer, _ = _trainer(amp="fp16")
    assert trainer.scaler is not None
    saved = {**trainer.scaler.state_dict(), "scale": 1234.0, "_growth_tracker": 7}  # as after some overflows
    trainer.scaler.load_state_dict(saved)
    ckpt = trainer.checkpoint_state(epoch=0)
    fresh, _ = _trainer(amp="fp16")
    assert fresh.scaler.get_scale() != 1234.0
    fresh.load_state(ckpt)
    assert fresh.scaler.get_scale() == 1234.0
    assert fresh.scaler.state_dict() == saved


def _counting_optimizer(trainer):
    steps = []
    original = trainer.optimizer.step

    def step(*a, **kw):
        steps.append(1)
        return original(*a, **kw)

    trainer.optimizer.step = step
    return steps


def _big_gradient(trainer):
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, 10.0)


def test_skip_grad_is_off_while_clipping():
    trainer, _ = _trainer(clip_grad=1.0, skip_grad=0.5)
    steps = _counting_optimizer(trainer)
    _big_gradient(trainer)
    norm = trainer.optimizer_step()
    assert norm > 0.5 and steps == [1], "clipping is on: the step must be clipped and taken, not skipped"
    trainer, _ = _trainer(skip_grad=0.5)  # without clipping the same gradient is skipped
    steps = _counting_optimizer(trainer)
    _big_gradient(trainer)
    trainer.optimizer_step()
    assert steps == []


# ---------------------------------------------------------------------------------------------- lr scaling
class _Loader(list):
    """Stands in for a DataLoader: only its length is read."""


def test_pretrain_lr_scales_with_update_freq(tmp_path):
    import run_pretraining_multimae
    from utils.config.parser import parse_args
    from utils.dist import DistContext
    from utils.jobs import Parts
    from utils.pretrain.config import PretrainConfig
    from utils.pretrain.multimae import MultiMAEPretraining

    cfg = parse_args(run_pretraining_multimae.get_args_parser(),
                     ["--batch_size", "4", "--update_freq", "3", "--blr", "1e-4", "--epochs", "1",
                      "--warmup_epochs", "0", "--device", "cpu", "--output_dir", str(tmp_path)],
                     config_class=PretrainConfig)
    ctx = DistContext(0, 1, 0, False, None, torch.device("cpu"))
    plan = MultiMAEPretraining().plan(cfg, ctx, Parts(nn.Linear(2, 2), _Loader(range(6))))
    assert plan.lr == pytest.approx(1e-4 * 4 * 3 / 256)


def test_finetune_cls_lr_scales_with_update_freq(tmp_path):
    import run_finetuning_cls
    from utils.config.parser import parse_args
    from utils.engine.factory import peak_lr

    args = parse_args(run_finetuning_cls.get_args_parser(),
                      ["--batch_size", "4", "--update_freq", "2", "--blr", "1e-3", "--epochs", "1",
                       "--warmup_epochs", "0", "--device", "cpu", "--output_dir", str(tmp_path)])
    args.lr = None
    lr, _ = peak_lr(args, args.batch_size, args.update_freq, 1)
    assert lr == pytest.approx(1e-3 * 4 * 2 / 256)


# ---------------------------------------------------------------------------------------------- depth metrics
def test_depth_delta_ratio_is_two_sided():
    """delta_k counts max(p/t, t/p) < 1.25^k (1.25, 1.5625, 1.953125): a prediction 1.5x too small counts
    like one 1.5x too large, not as within 1.25."""
    under = depth_metrics(torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 3.0))
    over = depth_metrics(torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 2.0))
    for m in (under, over):
        assert (m["delta1"], m["delta2"], m["delta3"]) == (0.0, 1.0, 1.0)
    acc = DepthMetrics()
    acc.update(torch.tensor([[[[1.0, 4.0]]]]), torch.tensor([[[[2.0, 2.0]]]]))  # ratios 2 and 2
    assert acc.compute()["delta3"] == 0.0


# ---------------------------------------------------------------------------------------------- RGB-D stage 2
def test_distillation_loss_sends_no_gradient_to_the_teacher_features():
    from multimae.rgbd_contrastive import max_pool_distill_loss

    student = torch.randn(2, 5, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 4, requires_grad=True)
    max_pool_distill_loss(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_stage2_teacher_runs_without_autograd(tmp_path):
    from test_rgbd_contrastive import batch, save_stage1, tiny_args
    from utils.pretrain.rgbd import build_rgbd_model, build_rgbd_step

    args1 = tiny_args(separate_encoders=True)
    stage1 = build_rgbd_model(args1)
    args2 = tiny_args(method="rgbd_stage2", separate_encoders=True,
                      teacher_checkpoint=save_stage1(tmp_path, args1, stage1))
    student = build_rgbd_model(args2)
    step = build_rgbd_step(args2, torch.device("cpu"))
    step.teacher.requires_grad_(True)  # even a teacher whose weights could learn gets no gradient
    grad_modes = []
    encode = step.teacher.encode_visible

    def spy(*a, **kw):
        grad_modes.append(torch.is_grad_enabled())
        return encode(*a, **kw)

    step.teacher.encode_visible = spy
    loss, logs = step(student, batch())
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    loss.backward()
    opt.step()
    loss, logs = step(student, batch())
    assert logs["distill_loss"] > 0
    loss.backward()
    assert grad_modes == [False, False]
    assert all(p.grad is None for p in step.teacher.parameters())
