"""The typed, frozen job configs: each equals its entry script's arguments and defaults, is frozen, round-trips
through config.yaml, and exposes the shared sections."""
import argparse
import dataclasses

import pytest

import run_finetuning_cls
import run_finetuning_depth
import run_finetuning_semseg
import run_finetuning_taskonomy
import run_pretraining_multimae
from utils.config import parse_args, save_config
from utils.config.job import OptimConfig, RuntimeConfig
from utils.finetune.config import ClsConfig, DepthConfig, SemSegConfig, TaskonomyConfig
from utils.pretrain.config import PretrainConfig

SCRIPTS = [(run_pretraining_multimae, PretrainConfig), (run_finetuning_cls, ClsConfig),
           (run_finetuning_semseg, SemSegConfig), (run_finetuning_depth, DepthConfig),
           (run_finetuning_taskonomy, TaskonomyConfig)]


def _declared(parser):
    out = {}
    for a in parser._actions:
        if a.dest in ("help", argparse.SUPPRESS) or a.dest in out:
            continue
        out[a.dest] = tuple(a.default) if isinstance(a.default, list) else a.default
    return out


@pytest.mark.parametrize("script,cls", SCRIPTS, ids=lambda x: getattr(x, "__name__", ""))
def test_fields_equal_the_scripts_arguments_and_defaults(script, cls):
    declared = _declared(script.get_args_parser())
    declared["config"] = ()
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in cls.omitted}
    assert set(fields) == set(declared), (sorted(set(fields) - set(declared)), sorted(set(declared) - set(fields)))
    assert {k: fields[k] for k in declared} == declared


def test_parsed_config_is_frozen_typed_and_round_trips(tmp_path):
    parser = run_pretraining_multimae.get_args_parser()
    cfg = parse_args(parser, ["--batch_size", "8", "--opt_betas", "0.9", "0.99", "--data_path", str(tmp_path)],
                     config_class=PretrainConfig)
    assert isinstance(cfg, PretrainConfig) and cfg.batch_size == 8 and cfg.opt_betas == (0.9, 0.99)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 16
    assert isinstance(cfg.optim, OptimConfig) and cfg.optim.opt_betas == (0.9, 0.99) and cfg.optim.blr == 1e-4
    assert isinstance(cfg.runtime, RuntimeConfig) and cfg.runtime.amp == "auto"
    assert cfg.optim.lr is None and "lr" not in cfg.to_dict()  # not a pre-training argument
    assert cfg.to_dict()["opt_betas"] == [0.9, 0.99]  # plain lists for checkpoints and YAML
    path = save_config(cfg, tmp_path)
    again = parse_args(parser, ["-c", str(path)], config_class=PretrainConfig)
    assert again.replace(config=()) == cfg.replace(config=())


def test_a_parser_and_class_mismatch_names_the_fields():
    ns = argparse.Namespace(**{**PretrainConfig().to_dict(), "not_an_argument": 1})
    del ns.batch_size
    with pytest.raises(TypeError, match=r"without an argument \['batch_size'\].*without a field \['not_an_argument'\]"):
        PretrainConfig.from_namespace(ns)


def test_validators_see_the_frozen_config(tmp_path):
    seen = []

    def check(cfg):
        seen.append(type(cfg))
        return [] if cfg.epochs > 0 else ["--epochs must be > 0"]

    parse_args(run_finetuning_semseg.get_args_parser(), ["--data_path", str(tmp_path)], validate=check,
               config_class=SemSegConfig, exit_on_error=False)
    assert seen == [SemSegConfig]
