"""utils.finetune.models / common and the Trainer factory's schedules: DPT geometry derived from the encoder, dense heads on a tiny MultiViT, the no-padding evaluation
sampler, schedules (warmup_lr honoured), amp resolution, and the final test that strictly loads the best checkpoint."""
import pytest
import torch
from torch import nn

from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config.job import OptimConfig
from utils.engine.factory import build_schedules
from utils.finetune.common import EvalShardSampler, evaluate_best_checkpoint, resolve_finetune_amp
from utils.finetune.models import (EncoderInfo, build_dense_head, build_multivit, dpt_feature_dim, dpt_hooks,
                                   dpt_layer_dims, encoder_info)


def test_dpt_geometry_is_published_for_vit_b_and_scales_down():
    assert encoder_info("multivit_base") == EncoderInfo(768, 12)
    assert (dpt_hooks(12), dpt_layer_dims(768), dpt_feature_dim(768)) == ([2, 5, 8, 11], [96, 192, 384, 768], 256)
    assert encoder_info("multivit_tiny") == EncoderInfo(192, 12)
    assert (dpt_layer_dims(192), dpt_feature_dim(192)) == ([24, 48, 96, 192], 64)
    assert dpt_hooks(24) == [5, 11, 17, 23] and dpt_hooks(4) == [0, 1, 2, 3]
    assert encoder_info("multivit_tiny", depth=6).depth == 6
    with pytest.raises(ValueError, match="only 3"):
        dpt_hooks(3)


@pytest.mark.parametrize("kind", ["convnext", "dpt", "segmenter"])
def test_dense_heads_on_a_tiny_encoder(kind):
    enc = EncoderInfo(192, 4)
    head = build_dense_head(kind, 5, ["rgb", "depth"], 16, enc, decoder_dim=96, decoder_depth=1, preds_per_patch=16,
                            head_type="semseg")
    model = build_multivit("multivit_tiny", ["rgb", "depth"], {"seg": head}, 16, 32, depth=4)
    x = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    out = model(x, return_all_layers=kind == "dpt")["seg"]
    assert out.shape == (2, 5, 32, 32) and torch.isfinite(out).all()
    assert head.main_tasks == ["rgb", "depth"]
    if kind == "dpt":
        assert head.hooks == [0, 1, 2, 3] and head.layer_dims == [24, 48, 96, 192]
    else:
        assert head.proj_dec.in_features == 2 * 192  # tokens of both main tasks, concatenated


@pytest.mark.parametrize("n", [0, 1, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_every_sample_exactly_once(n, world):
    shards = [list(EvalShardSampler(n, rank, world)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(s) for s in shards] == [len(EvalShardSampler(n, r, world)) for r in range(world)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def _schedules(steps_per_epoch, epochs=3, **kw):
    """The fine-tuning schedules (warm-up fitted to the run) of the one Trainer factory."""
    base = dict(lr=1e-3, min_lr=0.0, warmup_lr=1e-5, warmup_epochs=1, warmup_steps=-1, weight_decay=0.05,
                weight_decay_end=None)
    return build_schedules(OptimConfig(**{**base, **kw}), 1e-3, epochs, steps_per_epoch, fit_warmup=True)


def test_schedule_warms_up_from_warmup_lr():
    lr, wd = _schedules(steps_per_epoch=4)
    assert len(lr) == len(wd) == 12
    assert lr[0] == pytest.approx(1e-5) and lr[3] == pytest.approx(1e-3)  # published: started at 0
    assert all(a > b for a, b in zip(lr[4:], lr[5:])) and (wd == 0.05).all()


def test_warmup_longer_than_the_run_is_shortened(capsys):
    lr, _ = _schedules(warmup_epochs=100, epochs=2, steps_per_epoch=3)
    assert len(lr) == 6 and lr[0] == pytest.approx(1e-5) and lr[-1] == pytest.approx(1e-3)
    assert "longer than the run" in capsys.readouterr().out


def test_amp_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_finetune_amp("auto", True, cpu) == "none"
    assert resolve_finetune_amp("auto", True, cuda) == "fp16"  # published default on GPUs
    assert resolve_finetune_amp("auto", False, cuda) == "none"  # e.g. the Hypersim configs (fp16: False)
    assert resolve_finetune_amp("auto", None, cuda) == "fp16"
    assert resolve_finetune_amp("bf16", False, cuda) == "bf16"


class _FakeTrainer:
    def __init__(self, model, output_dir):
        self.model, self.output_dir, self.global_step = model, str(output_dir), 7


def _weight_sum(model, loader):
    return {"w": float(sum(p.detach().sum() for p in model.parameters()))}


def test_final_test_loads_the_best_checkpoint_strictly(tmp_path):
    best, final = nn.Linear(3, 2), nn.Linear(3, 2)
    save_checkpoint(tmp_path, "best", {"model": best.state_dict(), "epoch": 4})
    loader = torch.utils.data.DataLoader(list(range(3)))
    rec = evaluate_best_checkpoint(_FakeTrainer(final, tmp_path), _weight_sum, loader)
    assert rec["test/w"] == pytest.approx(_weight_sum(best, None)["w"])  # not the final weights
    assert torch.equal(final.weight, best.weight)
    log = (tmp_path / "log.txt").read_text()
    assert "epoch 4" in log and "test/w" in log
    bigger = nn.Linear(3, 4)  # a checkpoint of another model is an error, not a silent partial load
    with pytest.raises(CheckpointError, match="does not fit"):
        evaluate_best_checkpoint(_FakeTrainer(bigger, tmp_path), _weight_sum, loader)


def test_final_test_without_best_checkpoint_says_so(tmp_path):
    model = nn.Linear(3, 2)
    rec = evaluate_best_checkpoint(_FakeTrainer(model, tmp_path), _weight_sum,
                                    torch.utils.data.DataLoader(list(range(2))))
    assert rec["test/w"] == pytest.approx(_weight_sum(model, None)["w"])
    assert "final weights" in (tmp_path / "log.txt").read_text()
