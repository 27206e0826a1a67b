"""Modality registry: builders reproduce the published modules; a new modality is one registration."""
import json
import os

import pytest
import torch

import multimae
from multimae.criterion import MaskedCrossEntropyLoss, MaskedL1Loss, MaskedMSELoss
from multimae.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from multimae.multimae import MultiMAE
from multimae.output_adapters import SpatialOutputAdapter
from utils.data.datasets import MultiModalImageFolder
from utils.data.modalities import (MODALITIES, Modality, build_input_adapters, build_pretrain_losses,
                              build_pretrain_output_adapters, get_modality, ordered_domains, parse_domains,
                              register_modality, unregister_modality)
from utils.data.synthetic import make_synthetic_dataset
from utils.data.transforms import PretrainTransform

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
DOMAINS = ['rgb', 'depth', 'semseg']


def test_registered_table_matches_published_domain_conf():
    expected = {'rgb': (3, 1, 'mse'), 'depth': (1, 1, 'l1'), 'semseg': (133, 4, 'ce'), 'mask_valid': (1, 1, None)}
    for name, (channels, stride, loss) in expected.items():
        m = get_modality(name)
        assert (m.num_channels, m.stride_level, m.loss) == (channels, stride, loss)
    assert get_modality('semseg').num_classes == 133


def test_builders_produce_documented_modules():
    ins = build_input_adapters(DOMAINS, patch_size=16, image_size=64)
    assert [type(a) for a in ins.values()] == [PatchedInputAdapter, PatchedInputAdapter, SemSegInputAdapter]
    assert (ins['rgb'].num_channels, ins['depth'].num_channels) == (3, 1)
    sem = ins['semseg']
    assert (sem.num_classes, sem.stride_level, sem.dim_class_emb, sem.interpolate_class_emb) == (133, 4, 64, False)
    outs = build_pretrain_output_adapters(DOMAINS, DOMAINS, 16, 64, dim_tokens=32, depth=1, num_heads=4,
                                          extra_norm_pix_loss=True)
    assert list(outs) == DOMAINS + ['norm_rgb']
    assert all(isinstance(a, SpatialOutputAdapter) for a in outs.values())
    assert [(a.num_channels, a.stride_level, a.task) for a in outs.values()] == [
        (3, 1, 'rgb'), (1, 1, 'depth'), (133, 4, 'semseg'), (3, 1, 'rgb')]
    losses = build_pretrain_losses(DOMAINS, 16, extra_norm_pix_loss=True)
    assert [type(v) for v in losses.values()] == [MaskedMSELoss, MaskedL1Loss, MaskedCrossEntropyLoss, MaskedMSELoss]
    assert losses['semseg'].stride == 4 and losses['norm_rgb'].norm_pix and not losses['rgb'].norm_pix


def test_registry_model_reproduces_published_fixture():
    """Modules built from the registry load the published weights strictly and give the same outputs/losses."""
    fx = torch.load(os.path.join(FIXTURES, 'public_pretrain.pt'), weights_only=True)
    ins = build_input_adapters(DOMAINS, 16, 64)
    outs = build_pretrain_output_adapters(DOMAINS, DOMAINS, 16, 64, dim_tokens=32, depth=1, num_heads=4,
                                          extra_norm_pix_loss=True)
    model = MultiMAE(ins, outs, num_global_tokens=1, dim_tokens=64, depth=2, num_heads=4).eval()
    model.load_state_dict(fx['state_dict'], strict=True)
    losses = build_pretrain_losses(DOMAINS, 16, extra_norm_pix_loss=True)
    for b, sample in enumerate(fx['samples']):
        x = {k: v[b:b + 1] for k, v in fx['inputs'].items()}
        with torch.no_grad():
            preds, masks = model(x, mask_inputs=True, task_masks=sample['task_masks'], num_encoded_tokens=8)
        for task, loss_fn in losses.items():
            src = 'rgb' if task == 'norm_rgb' else task
            torch.testing.assert_close(preds[task], sample['preds'][task], atol=1e-5, rtol=0)
            value = loss_fn(preds[task].float(), x[src], mask=masks[src])
            torch.testing.assert_close(value, sample['losses'][task].float(), atol=1e-5, rtol=0)


def test_vit_b_config_has_released_key_layout():
    with torch.device('meta'):
        ins = build_input_adapters(DOMAINS, 16, 224)
        outs = build_pretrain_output_adapters(DOMAINS, DOMAINS, 16, 224, dim_tokens=256, depth=2, num_heads=8,
                                              extra_norm_pix_loss=True)
        model = multimae.create_model('pretrain_multimae_base', input_adapters=ins, output_adapters=outs)
    with open(os.path.join(FIXTURES, 'vitb_keys.json')) as f:
        expected = json.load(f)['multimae']
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == expected


def test_lookup_errors_and_domain_order():
    with pytest.raises(ValueError, match="unknown modality 'semsg'.*did you mean 'semseg'"):
        get_modality('semsg')
    with pytest.raises(ValueError, match="already registered"):
        register_modality(Modality('rgb', num_channels=3))
    with pytest.raises(ValueError, match="kind must be one of"):
        Modality('x', num_channels=1, kind='image')
    with pytest.raises(ValueError, match="needs num_classes"):
        Modality('x', num_channels=1, kind='label')
    assert parse_domains('rgb-depth-semseg') == DOMAINS
    with pytest.raises(ValueError, match="unknown modality 'dpth'"):
        parse_domains('rgb-dpth')
    assert ordered_domains(['semseg', 'rgb'], ['rgb', 'depth', 'semseg']) == ['semseg', 'rgb', 'depth']
    with pytest.raises(ValueError, match="'mask_valid' cannot be an input"):
        build_input_adapters(['rgb', 'mask_valid'], 16, 64)
    with pytest.raises(ValueError, match="needs 'rgb' among the input domains.*no_extra_norm_pix_loss"):
        build_pretrain_output_adapters(['depth'], ['depth'], 16, 64, extra_norm_pix_loss=True)


@pytest.fixture
def normal_modality():
    MODALITIES.pop('normal', None)  # the fine-tuning code may have registered its Taskonomy 'normal' already
    m = register_modality(Modality('normal', num_channels=3, kind='dense', decoder='rgb', value_scale=1 / 255,
                                   value_range=(0.0, 1.0), loss='l1', hflip_negate_channels=(0,)))
    yield m
    unregister_modality('normal')
    assert 'normal' not in MODALITIES


def test_new_modality_pretrains_for_a_step(tmp_path, normal_modality):
    """Registering 'normal' is all it takes: data loading, adapters, loss and one optimisation step."""
    torch.manual_seed(0)
    make_synthetic_dataset(str(tmp_path), num_train=4, num_val=0, image_size=32, seed=0, with_normals=True)
    domains = ['rgb', 'normal']
    ds = MultiModalImageFolder(str(tmp_path / 'train'), domains, transform=PretrainTransform(32))
    batch = torch.utils.data.default_collate([ds[i][0] for i in range(len(ds))])
    assert batch['normal'].shape == (4, 3, 32, 32) and 0 <= batch['normal'].min() and batch['normal'].max() <= 1
    ins = build_input_adapters(domains, 16, 32)
    outs = build_pretrain_output_adapters(domains, domains, 16, 32, dim_tokens=32, depth=1, num_heads=4)
    losses = build_pretrain_losses(domains, 16)
    assert isinstance(ins['normal'], PatchedInputAdapter) and ins['normal'].num_channels == 3
    assert isinstance(losses['normal'], MaskedL1Loss)
    model = MultiMAE(ins, outs, dim_tokens=32, depth=1, num_heads=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.input_adapters['normal'].proj.weight.detach().clone()
    preds, masks = model(batch, num_encoded_tokens=4)
    loss = sum(losses[t](preds[t].float(), batch[t], mask=masks[t]) for t in domains)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.output_adapters['normal'].out_proj.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.input_adapters['normal'].proj.weight)
