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
