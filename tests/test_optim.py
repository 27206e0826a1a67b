"""Schedules, parameter groups, optimizer factory and task balancing."""
import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from utils.engine.optim import (
    cosine_scheduler,
    create_optimizer,
    finetune_param_groups,
    pretrain_param_groups,
    weight_decay_scheduler,
)
from utils.pretrain.task_balancing import NoWeightingStrategy, UncertaintyWeightingStrategy, build_task_balancer


# ----------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("epochs,niter,warm", [(10, 7, 2), (3, 5, 1), (4, 3, 0)])
def test_cosine_schedule_invariants(epochs, niter, warm):
    base = 8e-4
    s = cosine_scheduler(base, 0.0, epochs, niter, warmup_epochs=warm)
    assert s.shape == (epochs * niter,)
    w = warm * niter
    if w:
        assert s[0] == 0.0
        assert s[w - 1] == pytest.approx(base, abs=0)
        np.testing.assert_allclose(s[:w], np.linspace(0, base, w))
    assert s[w] == pytest.approx(base, abs=0)
    tail = s[w:]
    assert np.all(np.diff(tail) < 0), "must strictly decrease after the warm-up"
    assert np.all(tail > 0), "cosine part never reaches the final value exactly"
    m = len(tail)
    np.testing.assert_allclose(tail, 0.5 * base * (1 + np.cos(np.pi * np.arange(m) / m)))


def test_warmup_steps_without_warmup_epochs_and_start_value():
    # Published code fails an assertion here; we honour warmup_steps and the start value (warmup_lr).
    s = cosine_scheduler(1.0, 0.1, epochs=2, niter_per_ep=5, warmup_epochs=0, start_warmup_value=0.2,
                         warmup_steps=3)
    assert len(s) == 10
    np.testing.assert_allclose(s[:3], [0.2, 0.6, 1.0])
    assert s[3] == 1.0 and s[-1] > 0.1
    # warmup_steps wins over warmup_epochs, as published
    assert np.count_nonzero(cosine_scheduler(1.0, 0, 3, 4, warmup_epochs=2, warmup_steps=2) < 1.0) == 1 + 9


def test_warmup_longer_than_schedule_is_cut_off():
    with pytest.warns(UserWarning, match="warm-up of 40 iterations"):
        s = cosine_scheduler(1.0, 0, epochs=2, niter_per_ep=10, warmup_epochs=4)
    np.testing.assert_allclose(s, np.linspace(0, 1.0, 40)[:20])


def test_weight_decay_schedule():
    np.testing.assert_array_equal(weight_decay_scheduler(0.05, None, 3, 4), np.full(12, 0.05))
    s = weight_decay_scheduler(0.04, 0.4, 3, 4)
    assert s[0] == pytest.approx(0.04) and np.all(np.diff(s) > 0) and s[-1] < 0.4


# ------------------------------------------------------------------------------------ param groups
class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(1, 2, 4))
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.emb = nn.Embedding(5, 4)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)

    def no_weight_decay(self):
        return {"tokens", "emb"}


def _names(model, group):
    ids = {id(p): n for n, p in model.named_parameters()}
    return sorted(ids[id(p)] for p in group["params"] if id(p) in ids)


def test_pretrain_groups_published_decay_everything():
    m, bal = _Toy(), UncertaintyWeightingStrategy(["rgb", "depth"])
    groups = pretrain_param_groups(m, bal, weight_decay=0.05, balancer_lr_scale=0.1)
    assert len(groups) == 2
    assert _names(m, groups[0]) == ["emb.weight", "lin.bias", "lin.weight", "norm.bias", "norm.weight", "tokens"]
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["lr_scale"] == 1.0
    assert groups[1]["params"] == [bal.log_vars]
    assert groups[1]["weight_decay"] == 0.05 and groups[1]["lr_scale"] == 0.1
    # no balancer parameters -> no empty group
    assert len(pretrain_param_groups(m, NoWeightingStrategy(), 0.05)) == 1


def test_pretrain_groups_decay_filter():
    m, bal = _Toy(), UncertaintyWeightingStrategy(["rgb"])
    groups = {g["name"]: g for g in pretrain_param_groups(m, bal, 0.05, decay_filter=True)}
    assert _names(m, groups["model_decay"]) == ["lin.weight"]
    assert _names(m, groups["model_no_decay"]) == ["emb.weight", "lin.bias", "norm.bias", "norm.weight", "tokens"]
    assert groups["model_no_decay"]["weight_decay"] == 0.0
    assert groups["balancer"]["weight_decay"] == 0.0


@pytest.mark.parametrize("opt,cls,extra", [
    ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.95), "eps": 1e-8}),
    ("adam", torch.optim.Adam, {"betas": (0.9, 0.95)}),
    ("sgd", torch.optim.SGD, {"nesterov": True, "momentum": 0.8}),
    ("nesterov", torch.optim.SGD, {"nesterov": True}),
    ("momentum", torch.optim.SGD, {"nesterov": False, "momentum": 0.8}),
    ("fused_adamw", torch.optim.AdamW, {}),
])
def test_create_optimizer(opt, cls, extra):
    m = _Toy()
    args = types.SimpleNamespace(opt=opt, lr=1e-3, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                                 momentum=0.8)
    o = create_optimizer(args, pretrain_param_groups(m, None, 0.05))
    assert type(o) is cls
    g = o.param_groups[0]
    assert g["lr_scale"] == 1.0 and g["weight_decay"] == 0.05
    for k, v in extra.items():
        assert g[k] == v, k


def test_create_optimizer_lamb_and_unknown():
    m = _Toy()
    args = types.SimpleNamespace(opt="lamb", lr=1e-3, weight_decay=0.0, opt_eps=None, opt_betas=None, momentum=0.9)
    assert type(create_optimizer(args, pretrain_param_groups(m, None, 0.0))).__name__ == "Lamb"
    args.opt = "adamq"
    with pytest.raises(ValueError, match="adamq"):
        create_optimizer(args, pretrain_param_groups(m, None, 0.0))


def _multivit(depth=12, dim=32):
    from multimae import create_model
    from multimae.input_adapters import PatchedInputAdapter, SemSegInputAdapter
    from multimae.output_adapters import LinearOutputAdapter

    inputs = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=32),
              "semseg": SemSegInputAdapter(10, 4, 16, image_size=32, dim_class_emb=8)}
    return create_model("multivit_tiny", input_adapters=inputs,
                        output_adapters={"cls": LinearOutputAdapter(5)}, dim_tokens=dim, depth=depth,
                        num_heads=2)


def test_layer_decay_scales_vit_b_depth():
    # 12 blocks, layer_decay 0.75 -> input adapters / global tokens 0.75^13, block i 0.75^(12-i),
    # output adapter 1; global_tokens not decayed.
    model = _multivit()
    groups = finetune_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    scale_of, wd_of = {}, {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            scale_of[ids[id(p)]] = g["lr_scale"]
            wd_of[ids[id(p)]] = g["weight_decay"]
    assert scale_of["global_tokens"] == pytest.approx(0.75 ** 13)
    assert scale_of["input_adapters.rgb.proj.weight"] == pytest.approx(0.02376, abs=1e-5)
    for i in range(12):
        assert scale_of[f"encoder.{i}.attn.qkv.weight"] == pytest.approx(0.75 ** (12 - i)), i
    assert scale_of["encoder.0.attn.qkv.weight"] == pytest.approx(0.03168, abs=1e-5)
    head = [n for n in scale_of if n.startswith("output_adapters.")]
    assert head and all(scale_of[n] == 1.0 for n in head)
    assert wd_of["global_tokens"] == 0.0
    assert wd_of["encoder.3.norm1.weight"] == 0.0 and wd_of["encoder.3.mlp.fc1.bias"] == 0.0
    assert wd_of["encoder.3.mlp.fc1.weight"] == 0.05
    assert all("lr_scale" in g and "weight_decay" in g for g in groups)
    assert wd_of["input_adapters.semseg.class_emb.weight"] == 0.05  # published: 'class_emb' never matches
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(scale_of) == sorted(trainable)


def test_layer_decay_no_lr_scale_list_and_scale_input_lr():
    model = _multivit(depth=2)
    ids = {id(p): n for n, p in model.named_parameters()}

    def scales(groups):
        return {ids[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}

    s = scales(finetune_param_groups(model, 0.05, 0.5, no_lr_scale_list=["input_adapters.rgb"]))
    assert s["input_adapters.rgb.proj.weight"] == 1.0
    assert s["input_adapters.semseg.proj.weight"] == pytest.approx(0.5 ** 3)
    assert s["encoder.0.attn.qkv.weight"] == pytest.approx(0.5 ** 2)
    s = scales(finetune_param_groups(model, 0.05, 0.5, scale_input_lr=False))
    assert s["input_adapters.semseg.proj.weight"] == 1.0 and s["global_tokens"] == 1.0
    assert s["encoder.1.attn.qkv.weight"] == pytest.approx(0.5)
    s = scales(finetune_param_groups(model, 0.05, None))
    assert set(s.values()) == {1.0}


# ------------------------------------------------------------------------------------ task balancing
def test_uncertainty_weighting_formula_and_name_mapping():
    bal = UncertaintyWeightingStrategy(["rgb", "depth", "semseg", "norm_rgb"])
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.1, -0.2, 0.3, 0.5]))
    losses = {"semseg": torch.tensor(2.0), "norm_rgb": torch.tensor(0.5), "rgb": torch.tensor(1.0),
              "depth": torch.tensor(0.0)}
    out = bal(losses)
    assert list(out) == list(losses)
    assert out["semseg"].item() == pytest.approx(math.exp(-0.3) * 2.0 + 0.3)
    assert out["rgb"].item() == pytest.approx(math.exp(-0.1) * 1.0 + 0.1)
    assert out["norm_rgb"].item() == pytest.approx(math.exp(-0.5) * 0.5 + 0.5)
    assert out["depth"].item() == 0.0  # exactly-zero raw loss stays 0
    # order of the dict does not matter
    rev = bal(dict(reversed(list(losses.items()))))
    assert all(rev[k].item() == out[k].item() for k in losses)
    sum(out.values()).backward()
    assert bal.log_vars.grad[2].item() == pytest.approx(1 - math.exp(-0.3) * 2.0)
    assert bal.log_vars.grad[1].item() == 0.0


def test_uncertainty_weighting_unknown_task_and_state_dict():
    bal = UncertaintyWeightingStrategy(["rgb", "depth"])
    with pytest.raises(KeyError, match="'dpeth'.*did you mean 'depth'"):
        bal({"dpeth": torch.tensor(1.0)})
    with torch.no_grad():
        bal.log_vars.fill_(0.7)
    other = build_task_balancer("uncertainty", ["rgb", "depth"])
    other.load_state_dict(bal.state_dict())
    assert list(bal.state_dict()) == ["log_vars"]
    assert torch.equal(other.log_vars, bal.log_vars)
    nw = build_task_balancer("none", ["rgb"])
    assert nw.state_dict() == {} and nw({"rgb": torch.tensor(3.0)})["rgb"].item() == 3.0
    with pytest.raises(ValueError, match="task_balancer"):
        build_task_balancer("gradnorm", ["rgb"])


def test_create_optimizer_fuses_adamw_on_cpu_and_matches_the_plain_loop():
    """The default AdamW is torch's fused kernel on the CPU too; ``fused=False`` is the published loop. Five
    steps on the same gradients agree to fp32 rounding (relative to the distance the weights moved)."""
    args = types.SimpleNamespace(opt="adamw", lr=1e-2, weight_decay=0.05, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                                 momentum=0.9)
    torch.manual_seed(0)
    a, b = _Toy(), _Toy()
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]
    oa = create_optimizer(args, pretrain_param_groups(a, None, 0.05))
    ob = create_optimizer(args, pretrain_param_groups(b, None, 0.05), fused=False)
    assert all(g["fused"] for g in oa.param_groups) and not any(g["fused"] for g in ob.param_groups)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    moved = [(pb - p0).abs().max() for p0, pb in zip(start, b.parameters())]
    assert max(moved) > 1e-2
    for m, pa, pb in zip(moved, a.parameters(), b.parameters()):
        assert (pa - pb).abs().max() <= 1e-4 * max(m, 1e-6)
