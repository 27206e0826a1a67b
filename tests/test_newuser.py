"""A new user's path: --help states defaults, CLI typos get suggestions, no silent demo data, clear messages."""
from __future__ import annotations

import argparse
import re

import pytest

from utils.config import ConfigError, add_bool_arg, create_parser, parse_args


def _help_of(parser: argparse.ArgumentParser) -> str:
    return re.sub(r'\s+', ' ', parser.format_help())


def test_help_states_every_default_and_the_registered_models():
    import run_finetuning_cls
    import run_pretraining_multimae
    text = _help_of(run_pretraining_multimae.get_args_parser())
    assert '--batch_size BATCH_SIZE batch size per process (default: 256)' in text
    assert '--decoder_dim DECODER_DIM (default: 256)' in text          # no help text of its own
    assert '--amp {auto,bf16,fp16,none}' in text and '(default: auto)' in text
    assert 'registered: pretrain_multimae_base, pretrain_multimae_huge' in text
    assert 'multivit_base' not in text.split('--model MODEL')[1].split('--num_encoded_tokens')[0]
    assert text.count('(default: True) --no_') >= 1 and '(default: True) (default' not in text
    cls_text = _help_of(run_finetuning_cls.get_args_parser())
    assert 'registered: multivit_base, multivit_huge' in cls_text
    assert '--model_ema_decay MODEL_EMA_DECAY (default: 0.9999)' in cls_text


def _parser() -> argparse.ArgumentParser:
    p = create_parser('t')
    p.add_argument('--layer_decay', type=float, default=0.75)
    p.add_argument('--epochs', type=int, default=3)
    add_bool_arg(p, 'amp_flag', False, 'x')
    return p


def test_cli_typo_gets_the_closest_flag_one_line_each():
    with pytest.raises(ConfigError) as exc:
        parse_args(_parser(), ['--lr_decay', '0.1', '--epoch=4', 'stray', '--epochs', '2'], exit_on_error=False)
    assert exc.value.errors == ["unknown argument '--lr_decay'; did you mean '--layer_decay'?",
                                "unknown argument '--epoch'; did you mean '--epochs'?",
                                "unexpected argument 'stray' (every setting is a --flag)"]


def test_cli_typo_exits_2_with_the_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(_parser(), ['--lr_decay', '0.1'])
    assert exc.value.code == 2
    assert "unknown argument '--lr_decay'; did you mean '--layer_decay'?" in capsys.readouterr().err


def test_negative_numbers_are_values_not_flags():
    p = create_parser('t')
    p.add_argument('--shift', type=float, default=0.0)
    assert parse_args(p, ['--shift', '-1.5'], exit_on_error=False).shift == -1.5


# ------------------------------------------------------------------------------------------ item 3: no demo default
def test_pretraining_needs_a_data_path():
    import run_pretraining_multimae as script
    with pytest.raises(ConfigError) as exc:
        script.parse_config([], exit_on_error=False)
    assert ("--data_path is required: a split folder with <modality>/<class>/<image> (for the demo: "
            "data/synthetic/train)") in exc.value.errors
    from utils.pretrain.config import PretrainConfig
    assert PretrainConfig().data_path == ''


def test_cls_needs_both_split_folders():
    from run_finetuning_cls import get_args_parser
    from utils.finetune.cls import validate_cls_args
    with pytest.raises(ConfigError) as exc:
        parse_args(get_args_parser(), [], validate=validate_cls_args, exit_on_error=False)
    assert sum('is required: a split folder' in e for e in exc.value.errors) == 2
    assert any(e.startswith('--eval_data_path is required') and 'data/synthetic/val' in e for e in exc.value.errors)


# ------------------------------------------------------------------------------------------ item 4: messages
TINY = ["--model", "pretrain_multimae_tiny", "--input_size", "32", "--patch_size", "8", "--num_encoded_tokens",
        "12", "--decoder_dim", "32", "--decoder_depth", "0", "--decoder_num_heads", "2", "--batch_size", "8",
        "--epochs", "1", "--max_steps_per_epoch", "2", "--warmup_epochs", "40", "--num_workers", "0",
        "--device", "cpu", "--print_freq", "1", "--save_vis_freq", "0", "--in_domains", "rgb", "--out_domains",
        "rgb", "--no_extra_norm_pix_loss"]


def test_tiny_pretraining_run_messages_console_copy_and_finished_rerun(synthetic_root, tmp_path, capsys):
    import run_pretraining_multimae as script
    out = tmp_path / "out"
    argv = [*TINY, "--data_path", str(synthetic_root / "train"), "--output_dir", str(out)]
    script.main(script.parse_config(argv, exit_on_error=False))
    printed = capsys.readouterr().out
    assert ("warning: warm-up of 80 steps is longer than the run (2 steps): the learning rate never reaches "
            "its peak") in printed
    assert re.search(r"^Run: epoch 1/1 done  elapsed \d+:\d\d:\d\d  ETA 0:00:00$", printed, re.M)
    console = (out / "console.txt").read_text()
    assert "Training epochs 0..0" in console and "Run: epoch 1/1 done" in console
    script.main(script.parse_config(argv, exit_on_error=False))
    printed = capsys.readouterr().out
    assert (f"Nothing to train: {out} holds a finished run (epoch 1 of 1). To continue it, raise --epochs and add "
            "--allow_config_change; or use another --output_dir") in printed
    assert "Training epochs" not in printed
    assert console in (out / "console.txt").read_text()  # appended, not replaced
    # a resume with another --epochs says that the schedules change, and how to keep them
    with pytest.warns(UserWarning, match=r"checkpoint-last\.pth comes from a run of 1 epochs, this run has --epochs "
                                         r"2: the learning-rate and weight-decay schedules are those of 2 epochs, so "
                                         r"from epoch 1 on .* pass --epochs 1 to continue its schedule unchanged"):
        script.main(script.parse_config([*argv, "--epochs", "2", "--allow_config_change"], exit_on_error=False))
    assert "Training epochs 1..1" in capsys.readouterr().out


def test_own_warnings_shown_others_only_on_request():
    import warnings

    from utils.runner import show_own_warnings
    for show_all, expected in ((False, ['ours']), (True, ['ours', 'theirs'])):
        with warnings.catch_warnings(record=True) as seen:
            show_own_warnings(show_all)
            warnings.warn_explicit('ours', UserWarning, 'x.py', 1, module='utils.engine.optim', registry={})
            warnings.warn_explicit('theirs', UserWarning, 'y.py', 1, module='timm.layers', registry={})
        assert [str(w.message) for w in seen] == expected


def test_resumed_epoch_counts_on_from_the_resumed_step():
    from utils.logger import MetricLogger
    lines = []
    ml = MetricLogger(printer=lines.append)
    assert list(ml.log_every(range(6), print_freq=2, header='Epoch: [1]', total=60, start=54)) == list(range(6))
    counters = [re.search(r'\[\s*(\d+)/(\d+)\]', ln).groups() for ln in lines if '/' in ln.split()[2]]
    assert counters == [('54', '60'), ('56', '60'), ('58', '60'), ('59', '60')]
    assert lines[-1].startswith('Epoch: [1] Total time:')


def test_weight_report_is_short_on_the_console_and_complete_in_a_file(tmp_path):
    from utils.weights import FinetuneLoadReport
    loaded = [f"encoder.{i}.{p}" for i in range(12) for p in ("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight")]
    dropped = [f"output_adapters.{d}.blocks.{i}.w" for d in ("rgb", "depth", "semseg") for i in range(20)]
    report = FinetuneLoadReport("w.pth", "MultiMAE", loaded=loaded + ["global_tokens"], missing=["head.weight"],
                                dropped=dropped, interpolated={"input_adapters.rgb.pos_emb": ((1, 8, 2, 2), (1, 8, 3, 3))})
    path = report.write(tmp_path)
    summary = report.summary(path).splitlines()
    assert len(summary) == 7
    assert summary[1] == "  loaded: 37 (encoder x36, global_tokens x1)"
    assert summary[4].startswith("  dropped before loading: 60 (output_adapters.rgb x20")
    assert "input_adapters.rgb.pos_emb (1, 8, 2, 2) -> (1, 8, 3, 3)" in summary[5]
    assert summary[6] == f"  every key: {tmp_path / 'load_report.txt'}"
    full = path.read_text()
    assert "encoder.{0-11}.attn.qkv.weight" in full and "output_adapters.semseg.blocks.{0-19}.w" in full
    assert full.count("\n") > len(summary)


# ------------------------------------------------------------------------------------------ item 5: picture titles
def test_finetune_prediction_pictures_have_column_titles():
    import numpy as np
    import torch

    from utils.finetune.depth import _RegressionRender
    from utils.finetune.dense import render_grid
    plain = render_grid([[np.zeros((8, 8, 3), np.uint8)] * 3], tile=32)
    titled = render_grid([[np.zeros((8, 8, 3), np.uint8)] * 3], tile=32, titles=['rgb', 'depth pred', 'x'])
    assert titled.shape[0] == plain.shape[0] + 14 and (titled[:14] < 128).any() and (titled[14:] == plain).all()
    assert (titled[:14, 2 * 34:] < 128).any()  # the third column has its title too
    x = {'rgb': torch.zeros(1, 3, 16, 16), 'depth': torch.rand(1, 1, 16, 16)}
    picture = _RegressionRender(['depth'])(x, {'depth': torch.rand(1, 1, 16, 16)})
    assert picture.shape[0] == 14 + 128 + 2 and (picture[:14, 2 * 130:] < 128).any()


# ------------------------------------------------------------------------------------------ item 5: the semseg grid
def test_full_resolution_semseg_says_semseg_is_given_at_a_quarter():
    import torch

    from multimae import MultiMAE, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=64), "semseg": SemSegInputAdapter(5, 4, 16, image_size=64)}
    outs = {"rgb": SpatialOutputAdapter(3, 1, 16, dim_tokens=16, num_heads=2, image_size=64, task="rgb",
                                        context_tasks=["rgb", "semseg"])}
    model = MultiMAE(ins, outs, dim_tokens=16, depth=1, num_heads=2)
    x = {"rgb": torch.randn(1, 3, 64, 64), "semseg": torch.randint(0, 5, (1, 16, 16))}
    model(x, num_encoded_tokens=8)  # semseg at 1/4 of the image: fine
    x["semseg"] = torch.randint(0, 5, (1, 64, 64))
    with pytest.raises(ValueError, match=r"input task 'semseg' has 256 tokens but the decoder grid \(4, 4\) has 16; "
                                         r".*stride level s is given at 1/s of the image size: semseg maps at 1/4"):
        model(x, num_encoded_tokens=8)


# ------------------------------------------------------------------------------------------ item 6: tools/visualize.py
def test_visualize_flags_read_plainly_and_a_doc_runs_it():
    from pathlib import Path

    from tools import visualize
    text = _help_of(visualize.get_args_parser())
    assert "--paste " in text and "--no_paste " in text and "no_no_paste" not in text
    args = visualize.get_args_parser().parse_args(["--checkpoint", "c.pth", "--no_paste"])
    assert args.paste is False
    docs = "".join(p.read_text() for p in Path(__file__).resolve().parents[1].glob("*.md"))
    assert "python tools/visualize.py --checkpoint output/demo/checkpoint-last.pth" in docs  # run by test_docs.py


def test_a_shard_data_path_passes_the_start_up_checks(tmp_path):
    import run_pretraining_multimae as script
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    for source in (str(manifest), f"{tmp_path}/train-{{000000..000003}}.tar", "pipe:cat manifest.json"):
        assert script.parse_config(["--data_path", source], exit_on_error=False).data_path == source
    with pytest.raises(ConfigError, match=r"--data_path: .*nothing.* \(expected <data_path>/<modality>/<class>/<image>\)"):
        script.parse_config(["--data_path", str(tmp_path / "nothing")], exit_on_error=False)
