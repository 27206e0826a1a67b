"""Checkpoints in the published layouts ({'model', 'optimizer', 'epoch', 'scaler', 'args': argparse.Namespace}
(+ 'loss_balancer' for pre-training)): optimizer-group mapping, resuming pre-training, fine-tuning and evaluating."""
import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import run_finetuning_cls
import run_pretraining_multimae
from utils.checkpoint import CheckpointError
from utils.config import parse_args
from utils.engine.optim_state import load_optimizer_state, match_optimizer_state
from utils.pretrain.multimae import validate_pretrain_args

PRETRAIN_TINY = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8",
                 "--num_encoded_tokens", "12", "--decoder_dim", "64", "--decoder_depth", "0", "--decoder_num_heads",
                 "2", "--batch_size", "8", "--warmup_epochs", "0", "--blr", "1e-2", "--num_workers", "0",
                 "--device", "cpu", "--print_freq", "100", "--save_vis_freq", "0", "--save_ckpt_freq", "1"]


def _adam_state(params, groups):
    """An AdamW state dict as torch writes it: per-parameter buffers keyed by position, the given groups
    (lists of positions) with the published pre-training group settings."""
    state = {i: {"step": torch.tensor(3.0), "exp_avg": torch.full_like(p, 0.1 * (i + 1)),
                 "exp_avg_sq": torch.full_like(p, 0.01 * (i + 1))} for i, p in enumerate(params)}
    settings = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, amsgrad=False, maximize=False,
                    foreach=None, capturable=False, differentiable=False, fused=None, lr_scale=1.0)
    return {"state": state, "param_groups": [{**settings, "params": g} for g in groups]}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))


def test_published_empty_second_group_is_dropped():
    net = _net()
    params = list(net.parameters())
    published = _adam_state(params, [list(range(len(params))), []])  # model group + empty balancer group
    ours = torch.optim.AdamW([{"params": params, "name": "model", "lr_scale": 1.0}], lr=1.0)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        ours.load_state_dict(published)  # what torch alone does with it
    load_optimizer_state(ours, published, "pub.pth")
    assert len(ours.param_groups) == 1 and ours.param_groups[0]["name"] == "model"
    assert ours.param_groups[0]["betas"] == (0.9, 0.95)
    for i, p in enumerate(params):
        assert torch.equal(ours.state[p]["exp_avg"], torch.full_like(p, 0.1 * (i + 1)))


def test_groups_matched_by_distinct_sizes_and_ambiguous_layouts_refused():
    net = _net()
    w1, b1, nw, nb, w2 = list(net.parameters())
    # saved: [no-decay (3 params)], [decay (2 params)]; ours: decay first
    published = _adam_state([nb, b1, nw, w1, w2], [[0, 1, 2], [3, 4]])
    ours = torch.optim.AdamW([{"params": [w1, w2]}, {"params": [nb, b1, nw], "weight_decay": 0.0}], lr=1.0)
    load_optimizer_state(ours, published)
    assert torch.equal(ours.state[w2]["exp_avg"], torch.full_like(w2, 0.5))
    assert torch.equal(ours.state[nb]["exp_avg"], torch.full_like(nb, 0.1))
    # two saved groups of 2 and 2 against ours of 3 and 1: nothing to match -> a clear error
    bad = _adam_state([w1, b1, nw, nb], [[0, 1], [2, 3]])
    ours = torch.optim.AdamW([{"params": [w1, b1, nw]}, {"params": [nb]}], lr=1.0)
    with pytest.raises(CheckpointError, match=r"2 group\(s\) with \[2, 2\] parameters, this run 2 group\(s\) with "
                                              r"\[3, 1\]"):
        match_optimizer_state(ours, bad, "x.pth")
    # same counts in order, but the parameters are in another order: the buffer shapes give it away
    swapped = _adam_state([w2, w1], [[0, 1]])
    with pytest.raises(CheckpointError, match="'exp_avg' of parameter 0 .* shape \\(2, 4\\).* has \\(4, 3\\)"):
        match_optimizer_state(torch.optim.AdamW([w1, w2], lr=1.0), swapped)


def _published_layout(ckpt: dict, args: dict) -> dict:
    """Our checkpoint rewritten in the published layout: one model group plus an empty second group, no
    'name' keys, no RNG/step extras, args as an argparse.Namespace."""
    opt = ckpt["optimizer"]
    (group,) = opt["param_groups"]
    group = {k: v for k, v in group.items() if k not in ("name", "param_names")}
    return {"model": ckpt["model"], "optimizer": {"state": opt["state"],
                                                  "param_groups": [group, {**group, "params": []}]},
            "epoch": ckpt["epoch"], "scaler": {}, "args": argparse.Namespace(**args), "loss_balancer": {}}


def test_pretraining_resumes_from_published_layout(synthetic_root, tmp_path):
    def run(out, *extra):
        argv = [*PRETRAIN_TINY, "--data_path", str(synthetic_root / "train"), "--output_dir", str(out), *extra]
        cfg = parse_args(run_pretraining_multimae.get_args_parser(), argv, validate=validate_pretrain_args,
                         exit_on_error=False)
        return run_pretraining_multimae.main(cfg)

    run(tmp_path / "ours", "--epochs", "1")
    ours = torch.load(tmp_path / "ours" / "checkpoint-0.pth", weights_only=True)
    path = tmp_path / "published.pth"
    torch.save(_published_layout(ours, {"model": "pretrain_multimae_tiny", "epochs": 1}), path)
    trainer = run(tmp_path / "resumed", "--epochs", "2", "--resume", str(path))
    assert trainer.start_epoch == 1
    resumed = torch.load(tmp_path / "resumed" / "checkpoint-1.pth", weights_only=True)
    assert resumed["epoch"] == 1 and len(resumed["optimizer"]["param_groups"]) == 1
    first = next(iter(resumed["optimizer"]["state"].values()))
    assert first["step"].item() == 2 * (32 // 8)  # the loaded 4 Adam steps continued by 4 more


def test_cls_finetunes_and_evaluates_from_published_finetuning_layout(tmp_path):
    from utils.data.synthetic import make_synthetic_dataset
    from utils.finetune.cls import build_cls_model

    data = tmp_path / "data"
    make_synthetic_dataset(str(data), num_train=8, num_val=4, image_size=32)
    base = ["--model", "multivit_tiny", "--input_size", "32", "--nb_classes", "4", "--data_set", "image_folder",
            "--data_path", str(data / "train"), "--eval_data_path", str(data / "val"), "--batch_size", "4",
            "--num_workers", "0", "--device", "cpu", "--mixup", "0", "--cutmix", "0", "--aa", "",
            "--warmup_epochs", "0", "--print_freq", "100"]
    cfg = run_finetuning_cls.parse_config(base, exit_on_error=False)
    model = build_cls_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    published = {"model": model.state_dict(), "optimizer": _adam_state(params, [list(range(len(params)))]),
                 "epoch": 0, "scaler": {}, "args": argparse.Namespace(nb_classes=4, model="multivit_tiny")}
    path = tmp_path / "checkpoint-0.pth"
    torch.save(published, path)
    record = run_finetuning_cls.main(run_finetuning_cls.parse_config(
        base + ["--eval", "--resume", str(path), "--output_dir", str(tmp_path / "eval")], exit_on_error=False))
    assert 0.0 <= record["test_acc1"] <= 100.0
    out = tmp_path / "ft"
    run_finetuning_cls.main(run_finetuning_cls.parse_config(
        base + ["--finetune", str(path), "--epochs", "1", "--output_dir", str(out)], exit_on_error=False))
    logged = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert any("test_acc1" in r for r in logged)
