"""utils.config: CLI > YAML > defaults, strict YAML keys and types, bool pairs, list args, round trip."""
import argparse

import pytest
import torch
import yaml

from utils.config import (OMIT, ConfigError, add_bool_arg, add_checkpoint_args, add_dist_args, check_list_arg,
                          add_optim_args, add_runtime_args, add_wandb_args, args_to_dict, closest,
                          create_parser, load_yaml_config, parse_args, save_config, split_list)


def make_parser() -> argparse.ArgumentParser:
    """A cut-down pre-training parser (published names and defaults)."""
    p = create_parser('test')
    p.add_argument('--batch_size', type=int, default=256)
    p.add_argument('--epochs', type=int, default=1600)
    p.add_argument('--in_domains', type=str, default='rgb-depth-semseg')
    p.add_argument('--alphas', type=float, default=1.0)
    p.add_argument('--task_balancer', type=str, default='none', choices=['none', 'uncertainty'])
    add_bool_arg(p, 'standardize_depth', False, 'standardise depth')
    add_bool_arg(p, 'decoder_use_xattn', True, 'cross-attention in the decoder')
    add_bool_arg(p, 'use_mask_valid', False, 'mask invalid depth', no_name='no_mask_valid')
    add_optim_args(p, opt_betas=[0.9, 0.95], blr=1e-4, warmup_epochs=40, layer_decay=0.75)
    add_checkpoint_args(p)
    add_runtime_args(p)
    add_dist_args(p)
    add_wandb_args(p)
    return p


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_match_published_values():
    args = parse_args(make_parser(), [])
    assert args.batch_size == 256 and args.blr == 1e-4 and args.opt_betas == [0.9, 0.95]
    assert args.decoder_use_xattn is True and args.standardize_depth is False
    assert args.auto_resume is True and args.pin_mem is True and args.dist_url == 'env://'
    assert args.weight_decay == 0.05 and args.clip_grad is None and args.warmup_epochs == 40
    assert args.config == []


def test_precedence_cli_over_yaml_over_default(tmp_path):
    cfg = write(tmp_path, 'a.yaml', 'batch_size: 32\nepochs: 5\nblr: 2.0e-4\n')
    args = parse_args(make_parser(), ['-c', cfg, '--epochs', '7'])
    assert args.batch_size == 32          # YAML beats default
    assert args.epochs == 7               # CLI beats YAML
    assert args.blr == 2e-4
    assert args.alphas == 1.0             # default where neither says anything
    assert args.config == [cfg]


def test_later_config_files_win(tmp_path):
    a = write(tmp_path, 'a.yaml', 'batch_size: 32\nepochs: 5\n')
    b = write(tmp_path, 'b.yaml', 'epochs: 9\n')
    args = parse_args(make_parser(), ['--config', a, b])
    assert (args.batch_size, args.epochs) == (32, 9)


def test_parser_is_reusable_after_yaml(tmp_path):
    p = make_parser()
    parse_args(p, ['-c', write(tmp_path, 'a.yaml', 'batch_size: 3\n')])
    assert parse_args(p, []).batch_size == 256


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    cfg = write(tmp_path, 'x.yaml', 'lr_decay: 0.5\n')
    with pytest.raises(ConfigError) as err:
        parse_args(make_parser(), ['-c', cfg], exit_on_error=False)
    assert str(err.value) == f"unknown config key 'lr_decay' in {cfg}; did you mean 'layer_decay'?"


def test_unknown_key_exits_with_status_2(tmp_path, capsys):
    cfg = write(tmp_path, 'x.yaml', 'batch_szie: 4\n')
    with pytest.raises(SystemExit) as ex:
        parse_args(make_parser(), ['-c', cfg])
    assert ex.value.code == 2
    assert "did you mean 'batch_size'?" in capsys.readouterr().err


def test_yaml_strings_converted_through_type(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; argparse's type must turn it into a float.
    cfg = write(tmp_path, 'a.yaml', "blr: 1e-4\nbatch_size: '64'\nepochs: 10.0\nopt_betas: ['0.9', 0.999]\n")
    args = parse_args(make_parser(), ['-c', cfg])
    assert args.blr == pytest.approx(1e-4) and isinstance(args.blr, float)
    assert args.batch_size == 64 and isinstance(args.batch_size, int)
    assert args.epochs == 10 and isinstance(args.epochs, int)
    assert args.opt_betas == [0.9, 0.999]


@pytest.mark.parametrize('text, expected', [
    ('batch_size: abc\n', "config key 'batch_size' in {}: expected int, got 'abc'"),
    ('epochs: 2.5\n', "config key 'epochs' in {}: expected int, got 2.5"),
    ('alphas: true\n', "config key 'alphas' in {}: expected float, got True"),
    ('standardize_depth: 1\n', "config key 'standardize_depth' in {}: expected true or false, got 1"),
    ('opt_betas: 0.9\n', "config key 'opt_betas' in {}: expected a list of float, got 0.9"),
    ('task_balancer: uncertain\n',
     "config key 'task_balancer' in {}: invalid choice 'uncertain' (choose from 'none', 'uncertainty')"),
    ('batch_size: null\n', "config key 'batch_size' in {}: null is not allowed (default is 256)"),
    ('in_domains: [rgb, depth]\n', "config key 'in_domains' in {}: expected str, got ['rgb', 'depth']"),
])
def test_wrong_type_is_an_error_naming_key_file_and_type(tmp_path, text, expected):
    cfg = write(tmp_path, 'bad.yaml', text)
    with pytest.raises(ConfigError) as err:
        load_yaml_config(make_parser(), cfg)
    assert str(err.value) == expected.format(cfg)


def test_all_errors_reported_together_with_validator(tmp_path):
    cfg = write(tmp_path, 'bad.yaml', 'lr_decay: 0.5\nbatch_size: x\n')

    def validate(args):
        return [] if args.epochs > args.warmup_epochs else [
            f'--epochs ({args.epochs}) must exceed --warmup_epochs ({args.warmup_epochs})']

    with pytest.raises(ConfigError) as err:
        parse_args(make_parser(), ['-c', cfg, '--epochs', '10'], validate=validate, exit_on_error=False)
    assert len(err.value.errors) == 3
    assert err.value.errors[2] == '--epochs (10) must exceed --warmup_epochs (40)'
    assert str(err.value).startswith('3 configuration errors:')


def test_validator_sees_final_values():
    seen = {}
    parse_args(make_parser(), ['--batch_size', '5'], validate=lambda a: seen.update(b=a.batch_size) or [])
    assert seen == {'b': 5}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match='config file not found: .*nope.yaml'):
        parse_args(make_parser(), ['-c', str(tmp_path / 'nope.yaml')], exit_on_error=False)
    cfg = write(tmp_path, 'broken.yaml', 'batch_size: [1, 2\n')
    with pytest.raises(ConfigError, match=r'cannot parse config file .*broken.yaml \(line \d+\)'):
        parse_args(make_parser(), ['-c', cfg], exit_on_error=False)
    cfg = write(tmp_path, 'dup.yaml', 'batch_size: 1\nbatch_size: 2\n')
    with pytest.raises(ConfigError, match="duplicate key 'batch_size'"):
        parse_args(make_parser(), ['-c', cfg], exit_on_error=False)
    cfg = write(tmp_path, 'list.yaml', '- 1\n- 2\n')
    with pytest.raises(ConfigError, match='must hold a mapping'):
        parse_args(make_parser(), ['-c', cfg], exit_on_error=False)


def test_empty_yaml_is_fine(tmp_path):
    assert parse_args(make_parser(), ['-c', write(tmp_path, 'e.yaml', '')]).batch_size == 256


def test_bool_pairs_cli_and_yaml(tmp_path):
    p = make_parser()
    assert parse_args(p, ['--standardize_depth']).standardize_depth is True
    # Published store_true-with-default-True flag can now be turned off.
    assert parse_args(p, ['--no_decoder_use_xattn']).decoder_use_xattn is False
    assert parse_args(p, ['--no_mask_valid']).use_mask_valid is False
    assert parse_args(p, ['--use_mask_valid']).use_mask_valid is True
    cfg = write(tmp_path, 'b.yaml', 'decoder_use_xattn: false\nstandardize_depth: true\n')
    args = parse_args(p, ['-c', cfg])
    assert args.decoder_use_xattn is False and args.standardize_depth is True
    assert parse_args(p, ['-c', cfg, '--decoder_use_xattn']).decoder_use_xattn is True
    assert parse_args(p, ['-c', cfg, '--no_standardize_depth']).standardize_depth is False


def test_no_prefix_abbreviations():
    with pytest.raises(SystemExit):
        parse_args(make_parser(), ['--batch', '3'])


def test_list_args(tmp_path):
    p = make_parser()
    assert parse_args(p, ['--opt_betas', '0.8', '0.9']).opt_betas == [0.8, 0.9]
    cfg = write(tmp_path, 'l.yaml', 'opt_betas: [0.5, 0.6]\nin_domains: rgb-depth\n')
    args = parse_args(p, ['-c', cfg])
    assert args.opt_betas == [0.5, 0.6]
    assert split_list(args.in_domains) == ['rgb', 'depth']
    assert split_list('') == [] and split_list(None) == []


def test_null_allowed_where_default_is_none(tmp_path):
    cfg = write(tmp_path, 'n.yaml', 'clip_grad: 3.0\n')
    cfg2 = write(tmp_path, 'm.yaml', 'clip_grad: null\n')
    assert parse_args(make_parser(), ['-c', cfg]).clip_grad == 3.0
    assert parse_args(make_parser(), ['-c', cfg, cfg2]).clip_grad is None


def test_group_overrides_and_omit():
    p = create_parser()
    add_optim_args(p, lr=3e-4, warmup_epochs=1, skip_grad=OMIT)
    args = parse_args(p, [])
    assert args.lr == 3e-4 and args.warmup_epochs == 1
    assert not hasattr(args, 'skip_grad') and not hasattr(args, 'blr') and not hasattr(args, 'layer_decay')
    with pytest.raises(TypeError, match="unknown override 'warmup_epoch'; did you mean 'warmup_epochs'"):
        add_optim_args(create_parser(), warmup_epoch=1)
    p = create_parser()
    add_wandb_args(p, log_images_wandb=False, log_images_freq=5)
    add_checkpoint_args(p, save_ckpt=True, save_ckpt_freq=200)
    args = parse_args(p, ['--no_save_ckpt', '--log_images_wandb'])
    assert args.save_ckpt is False and args.log_images_wandb is True and args.save_ckpt_freq == 200


def test_local_rank_alias():
    assert parse_args(make_parser(), ['--local-rank=3']).local_rank == 3


def test_save_config_round_trip(tmp_path):
    p = make_parser()
    src = write(tmp_path, 'src.yaml', 'batch_size: 12\nopt_betas: [0.9, 0.99]\nclip_grad: 1.5\n')
    args = parse_args(p, ['-c', src, '--no_decoder_use_xattn', '--in_domains', 'rgb-depth', '--blr', '3e-4'])
    args.lr = 1.7e-5          # derived at run time: recorded as a comment only
    args.distributed = False
    path = save_config(args, tmp_path / 'out')
    assert path == tmp_path / 'out' / 'config.yaml'
    text = path.read_text()
    assert '# lr: 1.7e-05' in text and '\nlr:' not in text
    assert 'config' not in yaml.safe_load(text)
    again = parse_args(p, ['-c', str(path)])
    expected = {k: v for k, v in vars(args).items() if k not in ('config', 'lr', 'distributed')}
    assert {k: v for k, v in vars(again).items() if k != 'config'} == expected
    assert again.decoder_use_xattn is False and again.opt_betas == [0.9, 0.99] and again.blr == 3e-4


def test_args_to_dict_is_weights_only_loadable(tmp_path):
    args = parse_args(make_parser(), [])
    args.device_obj = torch.device('cpu')
    args.shape = (1, 2)
    args.path = tmp_path
    d = args_to_dict(args)
    assert d['device_obj'] == 'cpu' and d['shape'] == [1, 2] and d['path'] == str(tmp_path)
    torch.save({'args': d}, tmp_path / 'c.pth')
    assert torch.load(tmp_path / 'c.pth', weights_only=True)['args'] == d


def test_resolved_args_hide_bookkeeping():
    args = parse_args(make_parser(), [])
    assert '_declared' not in vars(args)
    assert repr(args).startswith('Namespace(')


def test_closest():
    assert closest('lr_decay', ['layer_decay', 'lr']) == 'layer_decay'
    assert closest('zzz', ['layer_decay']) is None


def test_check_list_arg_in_validator():
    def validate(args):
        return check_list_arg(args, 'in_domains', ['rgb', 'depth', 'semseg'])

    with pytest.raises(ConfigError) as err:
        parse_args(make_parser(), ['--in_domains', 'rgb-dept-xyz'], validate=validate, exit_on_error=False)
    assert err.value.errors == [
        "--in_domains: unknown value 'dept' (expected one of: rgb, depth, semseg); did you mean 'depth'?",
        "--in_domains: unknown value 'xyz' (expected one of: rgb, depth, semseg)"]
    assert parse_args(make_parser(), ['--in_domains', 'semseg-rgb'], validate=validate).in_domains == 'semseg-rgb'
