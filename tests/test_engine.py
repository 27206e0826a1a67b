"""The shared training engine on a toy regression problem: schedules, accumulation, clipping/skipping,
AMP modes, non-finite losses, checkpoints, exact resume, EMA, callbacks and log.txt."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from utils.engine.trainer import NonFiniteLossError, Trainer, get_rng_state, move_to_device, resolve_amp, set_rng_state
from utils.engine.optim import cosine_scheduler, create_optimizer, pretrain_param_groups
from utils.pretrain.task_balancing import UncertaintyWeightingStrategy


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.randn(4, 2, generator=g)
    return TensorDataset(x, x @ w + 0.05 * torch.randn(n, 2, generator=g))


def _loader(ds, batch_size):
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, drop_last=True, seed=0)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)


def _step_fn(balancer=None):
    def step(model, batch):
        x, y = batch
        pred = model(x)
        losses = {"a": nn.functional.mse_loss(pred[:, 0], y[:, 0]), "b": nn.functional.l1_loss(pred[:, 1], y[:, 1])}
        weighted = balancer(losses) if balancer is not None else losses
        return sum(weighted.values()), {f"{k}_loss": v.detach() for k, v in losses.items()}
    return step


def _trainer(tmp_path=None, epochs=3, batch_size=8, update_freq=1, opt="adamw", seed=0, balancer=False,
             ema=False, **kw):
    torch.manual_seed(seed)
    model = _Net()
    bal = UncertaintyWeightingStrategy(["a", "b"]) if balancer else None
    groups = pretrain_param_groups(model, bal, weight_decay=0.05, balancer_lr_scale=0.5)
    args = type("A", (), dict(opt=opt, lr=None, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                              momentum=0.9))
    optimizer = create_optimizer(args, groups)
    ds = _data()
    loader = _loader(ds, batch_size)
    steps = len(ds) // (batch_size * update_freq)
    lr = cosine_scheduler(5e-2, 1e-4, epochs, steps, warmup_epochs=1)
    wd = cosine_scheduler(0.05, 0.01, epochs, steps)
    model_ema = None
    if ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=0.9)
    trainer = Trainer(model, optimizer, _step_fn(bal), lr_schedule=lr, wd_schedule=wd, steps_per_epoch=steps,
                      epochs=epochs, update_freq=update_freq, output_dir=str(tmp_path) if tmp_path else "",
                      modules={"loss_balancer": bal} if bal is not None else None, model_ema=model_ema,
                      save_ckpt_freq=2, print_freq=3, config={"seed": seed}, **kw)
    return trainer, loader


def test_loss_falls_and_files(tmp_path, capsys):
    trainer, loader = _trainer(tmp_path, epochs=4, extra_log={"n_parameters": 7})
    rec = trainer.fit(loader)
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3] and lines[-1] == json.loads(json.dumps(rec))
    assert lines[-1]["[Epoch] loss"] < 0.5 * lines[0]["[Epoch] loss"]
    assert {"[Epoch] a_loss", "[Epoch] grad_norm", "[Epoch] lr", "[Epoch] min_lr", "[Epoch] weight_decay"} <= set(rec)
    assert rec["n_parameters"] == 7
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint-1.pth" in names and "checkpoint-3.pth" in names and "checkpoint-last.pth" in names
    assert "checkpoint-0.pth" not in names and "checkpoint-2.pth" not in names
    ck = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ck["epoch"] == 3 and ck["global_step"] == 4 * 8 and ck["args"] == {"seed": 0}
    assert set(ck) >= {"model", "optimizer", "scaler", "rng"}
    out = capsys.readouterr().out
    assert "Epoch: [0]" in out and "eta:" in out and "lr:" in out


def test_schedules_reach_param_groups():
    trainer, loader = _trainer(epochs=2, balancer=True)
    hp = trainer.set_hparams(11)
    lr, wd = trainer.lr_schedule[11], trainer.wd_schedule[11]
    g_model, g_bal = trainer.optimizer.param_groups
    assert g_model["lr"] == pytest.approx(lr) and g_bal["lr"] == pytest.approx(0.5 * lr)
    assert g_model["weight_decay"] == g_bal["weight_decay"] == pytest.approx(wd)
    assert hp == {"lr": pytest.approx(lr), "min_lr": pytest.approx(0.5 * lr), "weight_decay": pytest.approx(wd)}
    # a group that starts without weight decay never gets one
    trainer.optimizer.param_groups[1]["weight_decay"] = 0.0
    trainer._decay_groups = [0]
    trainer.set_hparams(3)
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_sampler_set_epoch_every_epoch(tmp_path):
    trainer, loader = _trainer(epochs=3)
    seen = []
    orig = loader.sampler.set_epoch
    loader.sampler.set_epoch = lambda e: (seen.append(e), orig(e))
    trainer.fit(loader)
    assert seen == [0, 1, 2]


def test_grad_accumulation_equals_big_batch():
    # SGD without momentum/decay makes the update linear in the gradient: 2 x 8 accumulated == 1 x 16.
    def run(bs, uf):
        trainer, _ = _trainer(epochs=1, batch_size=bs, update_freq=uf, opt="sgd")
        for g in trainer.optimizer.param_groups:
            g["weight_decay"], g["momentum"], g["nesterov"] = 0.0, 0.0, False
        trainer.wd_schedule, trainer.model.drop.p = None, 0.0
        ds = _data()
        loader = DataLoader(ds, batch_size=bs, shuffle=False)
        trainer.train_one_epoch(loader, 0)
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    big, acc = run(16, 1), run(8, 2)
    torch.testing.assert_close(acc, big, rtol=1e-5, atol=1e-6)
    assert not torch.equal(big, run(8, 1))


def test_clip_and_skip_grad():
    trainer, loader = _trainer(epochs=1, clip_grad=1e-3)
    w0 = trainer.model.fc1.weight.detach().clone()
    x, y = next(iter(loader))
    loss, _ = trainer.step_fn(trainer.model, (x, y))
    loss.backward()
    raw = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters()])
    norm = trainer.optimizer_step()
    assert norm.item() == pytest.approx(raw.item()) and raw.item() > 1e-3  # the pre-clip norm is reported
    assert not torch.equal(w0, trainer.model.fc1.weight)

    trainer, loader = _trainer(epochs=1, skip_grad=1e-6)
    trainer.set_hparams(5)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    loss, _ = trainer.step_fn(trainer.model, next(iter(loader)))
    loss.backward()
    trainer.optimizer_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


@pytest.mark.parametrize("amp", ["bf16", "fp16", "none"])
def test_amp_modes_on_cpu(amp):
    trainer, loader = _trainer(epochs=1, amp=amp)
    assert (trainer.scaler is not None) == (amp == "fp16")
    stats = trainer.train_one_epoch(loader, 0)
    assert math.isfinite(stats["loss"])
    assert resolve_amp("auto", "cpu") == "none" and resolve_amp("auto", "cuda") == "fp16"


def test_nonfinite_loss_stops_without_checkpoint(tmp_path):
    trainer, loader = _trainer(tmp_path, epochs=2)
    inner = trainer.step_fn
    calls = {"n": 0}

    def bad_step(model, batch):
        calls["n"] += 1
        loss, logs = inner(model, batch)
        if calls["n"] == 6:
            loss = loss * float("nan")
        return loss, logs

    trainer.step_fn = bad_step
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 5/8 \(global step 5\).*a_loss="):
        trainer.fit(loader)
    assert not any(p.name.startswith("checkpoint") for p in tmp_path.iterdir())


def _state(trainer):
    params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name, m in trainer.modules.items():
        params.update({f"{name}.{k}": v.clone() for k, v in m.state_dict().items()})
    if trainer.model_ema is not None:
        params.update({f"ema.{k}": v.clone() for k, v in trainer.model_ema.module.state_dict().items()})
    return params


def test_resume_is_bit_identical(tmp_path):
    full, loader = _trainer(tmp_path / "full", epochs=4, balancer=True, ema=True)
    full.fit(loader)

    first, loader = _trainer(tmp_path / "split", epochs=4, balancer=True, ema=True)
    # run two epochs and stop, as a killed job would
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        first.train_one_epoch(loader, epoch)
        first.save_epoch(epoch)
    torch.manual_seed(1234)  # a fresh process starts from a different RNG state
    second, loader = _trainer(tmp_path / "split", epochs=4, balancer=True, ema=True, seed=99)
    assert second.resume(str(tmp_path / "split" / "checkpoint-last.pth"))
    assert second.start_epoch == 2 and second.global_step == 16
    second.fit(loader)
    a, b = _state(full), _state(second)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["loss_balancer.log_vars"], torch.zeros(2))


def test_callbacks_and_best_checkpoint(tmp_path):
    scores = iter([0.3, 0.5, 0.4])
    trainer, loader = _trainer(tmp_path, epochs=3, best_metric="val/acc", save_ckpt=True)
    calls = []

    def cb(tr, epoch, stats):
        calls.append((epoch, round(stats["loss"], 6)))
        return {"val/acc": next(scores)}

    trainer.fit(loader, callbacks=[cb])
    assert [c[0] for c in calls] == [0, 1, 2]
    best = torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["best_value"] == 0.5
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["val/acc"] for r in lines] == [0.3, 0.5, 0.4]


def test_rng_state_roundtrip_and_move_to_device():
    import random

    import numpy as np

    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(()).item())
    set_rng_state(torch.load(_save(state), weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == a
    batch = ({"rgb": torch.ones(2)}, torch.tensor([1, 2]), [torch.zeros(1)], "name")
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved[0]["rgb"].shape == (2,) and moved[3] == "name"


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
