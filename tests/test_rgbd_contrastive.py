"""Two-stage RGB-D pre-training (multimae/rgbd_contrastive.py, utils/pretrain/rgbd.py): the invariants of the
method (InfoNCE at log N, zero noise targets at sigma 0, zero distillation at the start of stage 2, 80 %
masking keeps 39 of 196 patches, invalid depth never scored), key layout for fine-tuning, and short runs of
both stages through run_pretraining_multimae.py."""
import argparse
import math

import pytest
import torch

from multimae.rgbd_contrastive import (MODALITIES, decoder_inputs, gather_tokens, dirichlet_visible_split, keep_to_mask,
                                    masked_pixel_mse, max_pool_distill_loss, num_visible_patches, patch_info_nce,
                                    random_keep)
from utils.pretrain.config import PretrainConfig
from utils.pretrain.rgbd import RGBDStage1Step, RGBDStage2Step, build_rgbd_model, build_rgbd_step

P, S = 8, 32  # patch size, image size: 16 patches per modality


def tiny_args(**kw) -> PretrainConfig:
    args = dict(method="rgbd_stage1", model="pretrain_multimae_tiny", encoder_depth=2, encoder_dim=32,
                encoder_num_heads=2, num_global_tokens=1, patch_size=P, input_size=S, drop_path=0.0,
                separate_encoders=False, proj_dim=16, proj_hidden_dim=None, temperature=0.07, learn_temperature=True,
                rgb_reconstruction=False, decoder_xattn_residual=True, decoder_dim=32, decoder_depth=1,
                decoder_num_heads=2, decoder_use_task_queries=True, decoder_use_xattn=True, teacher_checkpoint="",
                distill_weight=1.0,
                recon_weight=1.0, denoise_weight=1.0, mask_ratio=0.8, mask_sampler="independent", alphas=1.0,
                sigma_max=1.0, teacher_input="full", standardize_depth=True, use_mask_valid=True,
                min_valid_fraction=0.5, contrast_negatives="image")
    args.update(kw)
    return PretrainConfig().replace(**args)


def batch(B=2, invalid_box=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, 1, S, S, dtype=torch.bool)
    if invalid_box:
        valid[:, :, :P, :2 * P] = False  # two whole patches invalid
        valid[:, :, P:P + 3, 3 * P:] = False  # a few rows of two more patches
    x = {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.rand(B, 1, S, S, generator=g),
         "mask_valid": valid}
    return x, torch.zeros(B, dtype=torch.long)


def save_stage1(tmp_path, args, model) -> str:
    path = tmp_path / "stage1.pth"
    torch.save({"model": model.state_dict(), "args": vars(args), "epoch": 0}, path)
    return str(path)


# --------------------------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_info_nce_is_log_n_for_equal_features(negatives):
    B, N = 3, 16
    z = torch.nn.functional.normalize(torch.randn(1, 1, 8), dim=-1).expand(B, N, 8)
    loss = patch_info_nce(z, z, torch.tensor(1 / 0.07), negatives=negatives)
    n = N if negatives == "image" else B * N
    assert loss.item() == pytest.approx(math.log(n), rel=1e-6)
    # with invalid patches: log of the number of valid candidates
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[:, :6] = False
    loss = patch_info_nce(z, z, torch.tensor(1 / 0.07), valid, negatives=negatives)
    n = N - 6 if negatives == "image" else B * (N - 6)
    assert loss.item() == pytest.approx(math.log(n), rel=1e-6)


def test_info_nce_valid_mask_equals_dropping_the_patches():
    B, N = 2, 12
    za = torch.nn.functional.normalize(torch.randn(B, N, 8), dim=-1)
    zb = torch.nn.functional.normalize(za + 0.5 * torch.randn(B, N, 8), dim=-1)
    valid = torch.zeros(B, N, dtype=torch.bool)
    valid[:, 3:10] = True
    masked = patch_info_nce(za, zb, torch.tensor(10.0), valid)
    kept = patch_info_nce(za[:, 3:10], zb[:, 3:10], torch.tensor(10.0))
    assert masked.item() == pytest.approx(kept.item(), rel=1e-6)
    # symmetric: swapping the modalities gives the same loss
    assert patch_info_nce(zb, za, torch.tensor(10.0)).item() == pytest.approx(
        patch_info_nce(za, zb, torch.tensor(10.0)).item(), rel=1e-6)


def _smooth_images(B, g):
    # low-frequency random images, so patches differ from each other and from image to image
    return torch.nn.functional.interpolate(torch.randn(B, 3, 4, 4, generator=g), size=(S, S), mode="bilinear")


def _train_stage1(negatives, depth_from_rgb, steps=60):
    torch.manual_seed(0)
    model = build_rgbd_model(tiny_args())
    step = RGBDStage1Step(P, negatives, standardize_depth=False, use_mask_valid=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        rgb = _smooth_images(8, g)
        depth = (rgb[:, :1] - rgb[:, 2:]) if depth_from_rgb else _smooth_images(8, g)[:, :1]
        loss, logs = step(model, ({"rgb": rgb, "depth": depth}, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, logs


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_stage1_loss_falls_when_depth_is_a_function_of_rgb(negatives):
    first, last, logs = _train_stage1(negatives, depth_from_rgb=True)
    n = 16 if negatives == "image" else 8 * 16
    assert last < 0.6 * math.log(n) and last < 0.5 * first, (first, last)
    assert logs["patch_acc"].item() > 0.5  # chance: 1/16


def test_stage1_loss_cannot_fall_for_independent_depth_with_batch_negatives():
    # fresh depth unrelated to the rgb at every step: only the patch position is shared, which leaves 8
    # indistinguishable candidates (one per image), so the loss cannot go below log(8)
    first, last, _ = _train_stage1("batch", depth_from_rgb=False)
    assert last > 0.95 * math.log(8), (first, last)


def test_within_image_negatives_are_solved_by_the_patch_position_alone():
    # Features that only encode the patch position (the same in every image and both modalities) solve the
    # InfoNCE with the other patches of the same image as negatives: its loss goes to 0. With the whole batch
    # as negatives they leave one candidate per image: log(B). The step logs patch_acc_other_image (retrieval
    # against the depth of another image) to expose this shortcut.
    B, N = 4, 16
    z = torch.eye(N).expand(B, N, N)
    assert patch_info_nce(z, z, torch.tensor(100.0), negatives="image").item() < 1e-6
    assert patch_info_nce(z, z, torch.tensor(100.0), negatives="batch").item() == pytest.approx(math.log(B), rel=1e-5)

    def positional_model(x):
        return {"z": {"rgb": z, "depth": z}, "logit_scale": torch.tensor(100.0)}

    def content_model(x):  # the embedding of a patch is its (depth-derived) content
        zz = torch.nn.functional.normalize(torch.randn(B, N, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
        return {"z": {"rgb": zz, "depth": zz}, "logit_scale": torch.tensor(100.0)}

    x = {"rgb": torch.zeros(B, 3, 4 * P, 4 * P), "depth": torch.zeros(B, 1, 4 * P, 4 * P)}
    logs = RGBDStage1Step(P, standardize_depth=False)(positional_model, (x, None))[1]
    assert logs["patch_acc"].item() == 1.0 and logs["patch_acc_other_image"].item() == 1.0
    logs = RGBDStage1Step(P, standardize_depth=False)(content_model, (x, None))[1]
    assert logs["patch_acc"].item() == 1.0 and logs["patch_acc_other_image"].item() < 0.3


def _train_stage1_logs(negatives, separate_encoders, depth_from_rgb, content_scale, steps=60):
    # low-contrast content (content_scale) leaves the position embedding the strongest signal in the tokens
    torch.manual_seed(0)
    model = build_rgbd_model(tiny_args(separate_encoders=separate_encoders))
    step = RGBDStage1Step(P, negatives, standardize_depth=False, use_mask_valid=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        rgb = content_scale * _smooth_images(8, g)
        depth = (rgb[:, :1] - rgb[:, 2:]) if depth_from_rgb else content_scale * _smooth_images(8, g)[:, :1]
        loss, logs = step(model, ({"rgb": rgb, "depth": depth}, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.item() for k, v in logs.items()}


def _solved_by_position(logs) -> bool:
    # retrieval as good against another image's depth as against its own: the features match positions
    return logs["patch_acc"] > 0.5 and logs["patch_acc_other_image"] > 0.8 * logs["patch_acc"]


@pytest.mark.parametrize("separate_encoders", [False, True])
def test_default_stage1_cannot_solve_the_contrast_by_position(separate_encoders):
    # depth independent of the rgb: only the patch position links the two streams. Within-image negatives
    # (the paper's) are then solved perfectly by position, with one encoder per modality as well; the
    # default negatives (same position, other images) leave the contrast at chance.
    shortcut = _train_stage1_logs("image", separate_encoders, depth_from_rgb=False, content_scale=0.3)
    assert _solved_by_position(shortcut), shortcut
    default = PretrainConfig().contrast_negatives
    logs = _train_stage1_logs(default, separate_encoders, depth_from_rgb=False, content_scale=0.3)
    assert not _solved_by_position(logs) and logs["patch_acc"] < 0.25, logs  # chance 1/16
    assert logs["loss"] > 0.95 * math.log(8), logs  # 8 images: log(8) at chance
    # depth that is a function of the rgb: the default learns content, which does not match another image
    logs = _train_stage1_logs(default, separate_encoders, depth_from_rgb=True, content_scale=1.0)
    assert logs["patch_acc_position"] > 0.5 and logs["patch_acc"] > 0.5, logs  # chance 1/8, 1/16
    assert logs["patch_acc_other_image"] < 0.5 * logs["patch_acc"] and not _solved_by_position(logs), logs


# --------------------------------------------------------------------------------------------- stage 2
def test_80_percent_masking_keeps_39_of_196_per_modality():
    assert num_visible_patches(196, 0.8) == 39
    step = RGBDStage2Step(None, 16, mask_ratio=0.8, distill_weight=0.0)
    keep = step.sample_keep(4, 196, torch.device("cpu"))
    for m in MODALITIES:
        assert keep[m].shape == (4, 39)
        assert all(len(set(row.tolist())) == 39 for row in keep[m])
        assert torch.equal(keep[m], keep[m].sort(dim=1).values)
        assert (keep_to_mask(keep[m], 196).sum(dim=1) == 196 - 39).all()
    assert not torch.equal(keep["rgb"], keep["depth"])  # drawn independently
    # the model encodes 39 + 1 global tokens per stream at 224 px / patch 16
    model = build_rgbd_model(tiny_args(method="rgbd_stage2", patch_size=16, input_size=224, encoder_depth=1))
    x = {"rgb": torch.randn(2, 3, 224, 224), "depth": torch.randn(2, 1, 224, 224)}
    keep = step.sample_keep(2, 196, torch.device("cpu"))
    out = model(x, torch.zeros(2), keep)
    assert {m: tuple(f.shape) for m, f in out["features"].items()} == {"rgb": (2, 40, 32), "depth": (2, 40, 32)}
    assert out["preds"]["depth"].shape == (2, 1, 224, 224)


def test_dirichlet_split_keeps_the_total():
    torch.manual_seed(0)
    splits = [dirichlet_visible_split(78, 196, alpha=1.0) for _ in range(200)]
    assert all(a + b == 78 and 1 <= a <= 77 for a, b in splits)
    assert len({a for a, _ in splits}) > 20  # really random
    step = RGBDStage2Step(None, 16, mask_sampler="dirichlet", distill_weight=0.0)
    keep = step.sample_keep(3, 196, torch.device("cpu"))
    assert keep["rgb"].shape[1] + keep["depth"].shape[1] == 78
    # streams of different lengths go through the encoder one by one and meet in the decoder
    step = RGBDStage2Step(None, P, mask_ratio=0.5, mask_sampler="dirichlet", distill_weight=0.0)
    model = build_rgbd_model(tiny_args(method="rgbd_stage2"))
    loss, logs = step(model, batch())
    assert torch.isfinite(loss) and logs["recon_loss"] > 0 and logs["denoise_loss"] > 0


def test_decoder_inputs_put_every_visible_token_back_at_its_position():
    B, N, G = 2, 16, 1
    keep = {m: random_keep(B, N, 5 if m == "rgb" else 3) for m in MODALITIES}
    # token value = its global position (rgb 0..N-1, depth N..2N-1); global tokens -1
    feats = {m: torch.cat([keep[m].float().unsqueeze(-1) + i * N, -torch.ones(B, G, 1)], dim=1)
             for i, m in enumerate(MODALITIES)}
    context, info, ids_keep, ids_restore = decoder_inputs(feats, keep, N, G, (S, S))
    assert context.shape == (B, 8 + 2 * G, 1) and info["num_global_tokens"] == 2 and info["num_task_tokens"] == 2 * N
    visible = context[:, :8]
    full = torch.cat([visible, torch.full((B, 2 * N - 8, 1), -5.0)], dim=1)
    full = torch.gather(full, 1, ids_restore.unsqueeze(-1))
    placed = full.squeeze(-1)
    for b in range(B):
        for pos in range(2 * N):
            assert placed[b, pos] in (pos, -5.0)
    assert (placed >= 0).sum().item() == B * 8
    assert torch.equal(torch.gather(placed, 1, ids_keep), visible.squeeze(-1))


def test_stage2_decoder_has_a_residual_around_the_cross_attention():
    from multimae import SpatialOutputAdapter
    from multimae.rgbd_contrastive import ResidualXattnSpatialOutputAdapter

    kw = dict(num_channels=1, stride_level=1, patch_size_full=P, image_size=S, dim_tokens=16, num_heads=2,
              task="depth", context_tasks=list(MODALITIES), dim_tokens_enc=16)
    plain, residual = SpatialOutputAdapter(**kw), ResidualXattnSpatialOutputAdapter(**kw)
    residual.load_state_dict(plain.state_dict())  # same keys and shapes
    q, ctx = torch.randn(2, 16, 16), torch.randn(2, 5, 16)
    attended = plain.decoder(plain.query_norm(q), plain.context_norm(ctx))
    torch.testing.assert_close(plain._cross_attend(q, ctx), attended + plain.mlp(plain.out_norm(attended)))
    x = plain.query_norm(q) + attended
    torch.testing.assert_close(residual._cross_attend(q, ctx), x + plain.mlp(plain.out_norm(x)))
    model = build_rgbd_model(tiny_args(method="rgbd_stage2", rgb_reconstruction=True))
    assert all(type(a) is ResidualXattnSpatialOutputAdapter for a in model.output_adapters.values())
    model = build_rgbd_model(tiny_args(method="rgbd_stage2", decoder_xattn_residual=False))
    assert list(model.output_adapters) == ["depth"] and type(model.output_adapters["depth"]) is SpatialOutputAdapter


def test_sigma_zero_gives_zero_noise_targets():
    step = RGBDStage2Step(None, P, sigma_max=0.0, distill_weight=0.0)
    depth = torch.randn(4, 1, S, S)
    sigma, noise = step.sample_noise(depth, None)
    assert torch.equal(sigma, torch.zeros(4)) and torch.equal(noise, torch.zeros_like(depth))
    # in a step the model gets the clean depth and the denoising loss is the prediction's own energy
    seen = {}
    model = build_rgbd_model(tiny_args(method="rgbd_stage2"))

    def spy(x, sigma, keep):
        seen.update(x=x, sigma=sigma, keep=keep)
        out = model(x, sigma, keep)
        seen["pred"] = out["preds"]["noise"]  # the denoising head: (B, k, p*p) for the visible depth patches
        return out

    x, _ = batch(invalid_box=False)
    _, logs = step(spy, (x, None))
    from utils.data.depth import robust_standardize
    assert torch.equal(seen["x"]["depth"], robust_standardize(x["depth"]))
    assert torch.equal(seen["sigma"], torch.zeros(2))
    assert seen["pred"].shape == (2, seen["keep"]["depth"].shape[1], P * P)
    expected = seen["pred"].pow(2).mean()
    assert logs["denoise_loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_noise_is_sigma_times_gaussian_on_valid_pixels_only():
    torch.manual_seed(0)
    step = RGBDStage2Step(None, P, sigma_max=2.0, distill_weight=0.0)
    depth = torch.zeros(512, 1, S, S)
    valid = torch.rand(512, 1, S, S) > 0.3
    sigma, noise = step.sample_noise(depth, valid)
    assert 0 <= sigma.min() and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.0) < 0.1
    assert torch.equal(noise[~valid], torch.zeros_like(noise[~valid]))
    std = noise.flatten(1).pow(2).sum(1).div(valid.flatten(1).sum(1)).sqrt()
    torch.testing.assert_close(std, sigma, rtol=0.1, atol=0.02)


def test_denoising_loss_falls_far_below_predicting_no_noise():
    # E[sigma^2] = 1/3 for sigma ~ U[0, 1] is the loss of predicting zero noise; the denoising head starts
    # at the deviation from the patch mean and learns, from the noise level and the depth structure, how
    # much of the deviation is noise
    torch.manual_seed(0)
    model = build_rgbd_model(tiny_args(method="rgbd_stage2", distill_weight=0.0))
    step = RGBDStage2Step(None, P, sigma_max=1.0, distill_weight=0.0, standardize_depth=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(60):
        rgb = _smooth_images(16, g)
        depth = rgb[:, :1] + (rgb[:, 1:2] > 0).float()  # smooth, with edges
        loss, logs = step(model, ({"rgb": rgb, "depth": depth}, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["denoise_loss"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < 0.7 * (1 / 3) and last < 0.6 * first, (first, last)
    assert logs["denoise_weight"].item() == 1.0 and logs["recon_weight"].item() == 1.0


@pytest.mark.parametrize("teacher_input,mask_ratio,sigma_max", [("same", 0.8, 1.0), ("full", 0.0, 0.0)])
def test_distillation_is_exactly_zero_at_the_first_stage2_step(tmp_path, teacher_input, mask_ratio, sigma_max):
    torch.manual_seed(0)
    args1 = tiny_args(separate_encoders=True)
    stage1 = build_rgbd_model(args1)
    args2 = tiny_args(method="rgbd_stage2", separate_encoders=True,
                      teacher_checkpoint=save_stage1(tmp_path, args1, stage1), teacher_input=teacher_input,
                      mask_ratio=mask_ratio, sigma_max=sigma_max, distill_norm="both")
    # (distill_norm 'both': the student's raw features equal the teacher's at the start, but not their
    # layer-normed version, which the default 'target' compares them with)
    student = build_rgbd_model(args2)
    step = build_rgbd_step(args2, torch.device("cpu"))
    assert not any(p.requires_grad for p in step.teacher.parameters()) and not step.teacher.training
    loss, logs = step(student, batch())
    assert logs["distill_loss"].item() == 0.0
    assert logs["distill_rgb_loss"].item() == 0.0 and logs["distill_depth_loss"].item() == 0.0
    loss.backward()
    # the student's encoder moves away after two updates: then the distillation is positive. (Without
    # hidden patches and noise the first update reaches the encoder only through the denoising head,
    # whose last layer starts at zero and so passes no gradient back yet.)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    opt.step()
    opt.zero_grad()
    step(student, batch())[0].backward()
    opt.step()
    assert step(student, batch())[1]["distill_loss"].item() > 0


def test_distillation_compares_max_pooled_features():
    s = torch.tensor([[[1.0, 5.0], [3.0, 0.0]]])
    t = torch.tensor([[[3.0, 2.0], [0.0, 1.0], [-1.0, 4.0]]])
    # max pools: s -> (3, 5), t -> (3, 4): smooth-L1 per feature (0, 0.5), mean 0.25
    assert max_pool_distill_loss(s, t).item() == pytest.approx(0.25)
    # an invalid token is left out of the max: t without its last token -> (3, 2): (0 + |5-2|-0.5) / 2
    assert max_pool_distill_loss(s, t, teacher_valid=torch.tensor([[True, True, False]])).item() == pytest.approx(1.25)


def test_distillation_pools_teacher_features_of_the_student_tokens_layer_normed():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 8)
    # per token, layer norm removes scale and offset: a teacher 100 s + 3 is matched exactly
    assert max_pool_distill_loss(s, 100 * s + 3, normalize="both").item() < 1e-5
    assert max_pool_distill_loss(torch.nn.functional.layer_norm(s, (8,)), 100 * s + 3, normalize="target").item() < 1e-5
    assert max_pool_distill_loss(s, 100 * s + 3).item() > 50

    class Teacher:  # random full-image features (seeded by the caller); the student's tokens are keep[m] of them
        def encode_visible(self, x, keep=None):
            B = x["rgb"].shape[0]
            return {m: torch.cat([torch.randn(B, 16, 8) + 10 * torch.arange(16.0)[None, :, None],
                                  torch.zeros(B, 1, 8)], dim=1) for m in MODALITIES}

        def patch_tokens(self, f):
            return f[:, :-1]

    teacher = Teacher()
    keep = {m: random_keep(2, 16, 3) for m in MODALITIES}
    student = {m: torch.cat([torch.randn(2, 3, 8), torch.zeros(2, 1, 8)], dim=1) for m in MODALITIES}
    x = torch.zeros(2, 3, S, S)
    torch.manual_seed(1)
    full = teacher.encode_visible({"rgb": x})
    for tokens, expected_pool in (("matched", lambda t, k: gather_tokens(t, k)), ("all", lambda t, k: t)):
        step = RGBDStage2Step(teacher, P, distill_tokens=tokens)
        torch.manual_seed(1)
        out = step.distill(student, x, x[:, :1], x[:, :1], keep, None)
        for m in MODALITIES:
            ref = max_pool_distill_loss(student[m][:, :3], expected_pool(full[m][:, :-1], keep[m]), normalize="target")
            assert out[f"distill_{m}"].item() == pytest.approx(ref.item(), rel=1e-6), (tokens, m)


# --------------------------------------------------------------------------------------------- invalid depth
def _garbage_invalid_depth(x):
    y = dict(x)
    y["depth"] = torch.where(x["mask_valid"], x["depth"], torch.full_like(x["depth"], 50.0))
    return y


@pytest.mark.parametrize("standardize", [True, False])
def test_invalid_depth_changes_no_loss(tmp_path, standardize):
    x, label = batch()
    args1 = tiny_args(standardize_depth=standardize)
    stage1 = build_rgbd_model(args1)
    step1 = build_rgbd_step(args1, torch.device("cpu"))
    a = step1(stage1, (x, label))[1]
    b = step1(stage1, (_garbage_invalid_depth(x), label))[1]
    assert a == b
    args2 = tiny_args(method="rgbd_stage2", standardize_depth=standardize, rgb_reconstruction=True,
                      teacher_checkpoint=save_stage1(tmp_path, args1, stage1))
    student, step2 = build_rgbd_model(args2), build_rgbd_step(args2, torch.device("cpu"))
    with torch.random.fork_rng():
        a = step2(student, (x, label))[1]
    b = step2(student, (_garbage_invalid_depth(x), label))[1]
    assert set(a) >= {"recon_loss", "denoise_loss", "rgb_recon_loss", "distill_loss"} and a == b


def test_stage2_starts_from_the_stage1_encoder_unless_told_not_to(tmp_path):
    """--init_from_teacher (default) copies stage 1's encoder into the student; --no_init_from_teacher leaves it
    random while the teacher still is the stage-1 model."""
    args1 = tiny_args(separate_encoders=True)
    torch.manual_seed(0)
    stage1 = build_rgbd_model(args1)
    ckpt = save_stage1(tmp_path, args1, stage1)
    ref = stage1.state_dict()
    for init in (True, False):
        args2 = tiny_args(method="rgbd_stage2", separate_encoders=True, teacher_checkpoint=ckpt,
                          init_from_teacher=init)
        torch.manual_seed(1)
        student = build_rgbd_model(args2).state_dict()
        shared = [k for k in student if k.startswith(("encoder.", "input_adapters.")) and k.endswith("weight")
                  and student[k].std() > 0]
        assert shared and all(k in ref for k in shared)
        equal = [torch.equal(student[k], ref[k]) for k in shared]
        assert all(equal) if init else not any(equal)
        teacher = build_rgbd_step(args2, torch.device("cpu")).teacher
        assert all(torch.equal(v, ref[k]) for k, v in teacher.state_dict().items())


def test_invalid_pixels_and_patches_are_left_out_of_the_losses():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 1, S, S), torch.randn(2, 1, S, S)
    valid = torch.rand(2, 1, S, S) > 0.4
    mask = keep_to_mask(random_keep(2, 16, 5), 16)
    ref = masked_pixel_mse(pred, target, mask, P, valid)
    bad = torch.where(valid, pred, torch.full_like(pred, 1e3))
    assert masked_pixel_mse(bad, target, mask, P, valid).item() == pytest.approx(ref.item(), rel=1e-6)
    # by hand: mean over the scored valid pixels of each sample, then over samples
    w = mask.reshape(2, 4, 4).repeat_interleave(P, 1).repeat_interleave(P, 2).unsqueeze(1) * valid
    per = [((pred[i] - target[i]) ** 2 * w[i]).sum() / w[i].sum() for i in range(2)]
    assert ref.item() == pytest.approx(sum(per).item() / 2, rel=1e-5)
    # distillation: an invalid token's value does not matter
    s, t = torch.randn(2, 5, 4), torch.randn(2, 7, 4)
    tv = torch.rand(2, 7) > 0.3
    t2 = torch.where(tv.unsqueeze(-1), t, torch.full_like(t, 99.0))
    assert max_pool_distill_loss(s, t, None, tv).item() == max_pool_distill_loss(s, t2, None, tv).item()


# --------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("method", ["rgbd_stage1", "rgbd_stage2"])
def test_checkpoints_fine_tune_rgb_only(method):
    from multimae import PatchedInputAdapter, create_model
    from utils.weights import load_finetune_weights

    model = build_rgbd_model(tiny_args(method=method, separate_encoders=True, distill_weight=0.0))
    vit = create_model("multivit_tiny", input_adapters={"rgb": PatchedInputAdapter(3, 1, P, image_size=S)},
                       output_adapters=None, depth=2, dim_tokens=32, num_heads=2)
    report = load_finetune_weights(vit, {"model": model.state_dict()}, log=None)
    assert not report.missing
    x = torch.randn(2, 3, S, S)
    model.eval()
    torch.testing.assert_close(vit(x), model.encode_visible({"rgb": x})["rgb"])


# --------------------------------------------------------------------------------------------- the script
# the tiny configs, shrunk further: 2-block encoder 64 wide, 32 px images, 8 px patches
SHRINK = ["--encoder_depth", "2", "--encoder_dim", "64", "--encoder_num_heads", "2", "--input_size", "32",
          "--patch_size", "8", "--decoder_dim", "32", "--decoder_num_heads", "2", "--proj_dim", "32",
          "--batch_size", "8", "--epochs", "4", "--blr", "2e-2", "--num_workers", "0", "--print_freq", "4",
          "--deterministic"]


def _parse(argv):
    import run_pretraining_multimae as script
    from utils.config import parse_args
    from utils.pretrain.rgbd import validate_method_args

    return parse_args(script.get_args_parser(), argv, validate=validate_method_args, exit_on_error=False)


def _epoch_losses(out):
    import json
    lines = (out / "log.txt").read_text().splitlines()
    return [json.loads(line)["[Epoch] loss"] for line in lines]


def test_both_stages_run_through_the_script_and_learn(synthetic_root, tmp_path):
    import run_pretraining_multimae as script
    from multimae import PatchedInputAdapter, create_model
    from utils.weights import load_finetune_weights

    data = ["--data_path", str(synthetic_root / "train")]
    out1, out2 = tmp_path / "stage1", tmp_path / "stage2"
    script.main(_parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage1_tiny.yaml", *SHRINK, *data,
                        "--output_dir", str(out1)]))
    loss1 = _epoch_losses(out1)
    # falls, and below log(16) = 2.77, the loss of features that tell the 16 patches of an image apart no better
    # than chance
    assert len(loss1) == 4 and loss1[-1] < 0.85 * loss1[0] and loss1[-1] < 0.92 * math.log(16), loss1
    ckpt1 = out1 / "checkpoint-last.pth"
    script.main(_parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage2_tiny.yaml", *SHRINK, *data,
                        "--output_dir", str(out2), "--teacher_checkpoint", str(ckpt1)]))
    loss2 = _epoch_losses(out2)
    assert len(loss2) == 4 and loss2[-1] < 0.8 * loss2[0], loss2
    # the result fine-tunes RGB-only: every encoder weight of a MultiViT comes from the checkpoint
    vit = create_model("multivit_tiny", input_adapters={"rgb": PatchedInputAdapter(3, 1, 8, image_size=32)},
                       output_adapters=None, depth=2, dim_tokens=64, num_heads=2)
    report = load_finetune_weights(vit, str(out2 / "checkpoint-last.pth"), log=None)
    assert not report.missing and report.loaded
    # stage 2 moved the encoder away from stage 1
    sd1 = torch.load(ckpt1, weights_only=True)["model"]
    assert not torch.equal(sd1["encoder.0.attn.qkv.weight"], vit.state_dict()["encoder.0.attn.qkv.weight"])


def test_script_checks_the_method_arguments(synthetic_root, tmp_path):
    from utils.config import ConfigError

    data = ["--data_path", str(synthetic_root / "train")]
    with pytest.raises(ConfigError, match="needs --teacher_checkpoint"):
        _parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage2_tiny.yaml", *data, "--teacher_checkpoint", ""])
    with pytest.raises(ConfigError, match="uses --in_domains rgb-depth"):
        _parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage1_tiny.yaml", *data, "--in_domains", "rgb-semseg"])
    with pytest.raises(ConfigError, match="task_balancer uncertainty is a MultiMAE option"):
        _parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage1_tiny.yaml", *data, "--task_balancer", "uncertainty"])
    with pytest.raises(ConfigError, match="mask_ratio"):
        _parse(["-c", "cfgs/pretrain/rgbd_contrastive_stage1_tiny.yaml", *data, "--mask_ratio", "1.0"])
    # a stage-2 student must have the architecture of its stage-1 teacher
    args1 = tiny_args()
    path = save_stage1(tmp_path, args1, build_rgbd_model(args1))
    with pytest.raises(ValueError, match="--encoder_dim 48"):
        build_rgbd_model(tiny_args(method="rgbd_stage2", encoder_dim=48, teacher_checkpoint=path))
    multimae = _parse(["--in_domains", "rgb-depth", "--num_encoded_tokens", "8", *data])
    assert multimae.method == "multimae"


@pytest.mark.parametrize("name", ["rgbd_contrastive_stage1", "rgbd_contrastive_stage2"])
def test_vit_b_configs_parse(name, synthetic_root, tmp_path):
    (tmp_path / "stage1.pth").write_bytes(b"")
    args = _parse(["-c", f"cfgs/pretrain/{name}.yaml", "--data_path", str(synthetic_root / "train"),
                   "--teacher_checkpoint", str(tmp_path / "stage1.pth")])
    assert args.model == "pretrain_multimae_base" and args.separate_encoders and args.input_size == 224
    if name.endswith("stage2"):
        assert (args.mask_ratio, args.rgb_reconstruction, args.recon_weight, args.denoise_weight,
                args.distill_weight) == (0.8, False, 1.0, 1.0, 1.0)


# --------------------------------------------------------------------------------- joint stage 2, cheap stage 1
def test_joint_stage2_attends_across_modalities_and_starts_from_the_rgb_encoder(tmp_path):
    torch.manual_seed(0)
    args1 = tiny_args(separate_encoders=True)
    stage1 = build_rgbd_model(args1)
    common = dict(method="rgbd_stage2", separate_encoders=True, teacher_checkpoint=save_stage1(tmp_path, args1, stage1))
    joint, streams = (build_rgbd_model(tiny_args(joint_encoder=j, **common)).eval() for j in (True, False))
    assert not hasattr(joint, "depth_encoder") and hasattr(streams, "depth_encoder")
    for k, v in stage1.encoder.state_dict().items():  # the one joint encoder is stage 1's rgb encoder
        assert torch.equal(joint.encoder.state_dict()[k], v), k
    x, _ = batch()
    N = (S // P) ** 2
    keep = {m: random_keep(2, N, 5) for m in MODALITIES}
    sigma = torch.zeros(2)
    other = dict(x, depth=torch.rand_like(x["depth"]))
    with torch.no_grad():
        for model, mixes in ((joint, True), (streams, False)):
            a, b = (model(inp, sigma, keep)["features"]["rgb"] for inp in (x, other))
            assert a.shape == (2, 5 + 1, 32)
            # rgb features depend on the depth input only when the modalities share one sequence
            assert (not torch.allclose(a, b)) == mixes
    loss, logs = build_rgbd_step(tiny_args(joint_encoder=True, **common), torch.device("cpu"))(joint.train(), batch())
    assert torch.isfinite(loss) and logs["distill_loss"].item() > 0  # raw student vs layer-normed teacher


def test_stage1_patch_fraction_contrasts_one_position_subset_per_batch():
    torch.manual_seed(0)
    model = build_rgbd_model(tiny_args())
    seen = []

    def spy(x, keep=None):
        seen.append(keep)
        return type(model).forward(model, x, keep)

    model.forward = spy
    N = (S // P) ** 2
    loss, logs = RGBDStage1Step(P, "position", standardize_depth=False, patch_fraction=0.25)(model, batch(B=3))
    keep = seen[-1]
    assert keep["rgb"].shape == (3, N // 4) and torch.equal(keep["rgb"], keep["depth"])
    assert (keep["rgb"] == keep["rgb"][:1]).all()  # the same positions in every image
    z = model(batch(B=3)[0], keep)["z"]["rgb"]
    assert z.shape == (3, N // 4, 16) and torch.isfinite(loss) and 0.0 <= logs["patch_acc_position"].item() <= 1.0
    RGBDStage1Step(P, "position", patch_fraction=1.0)(model, batch(B=3))
    assert seen[-1] is None  # all patches: no subset
    with pytest.raises(ValueError, match="patch_fraction must be in"):
        RGBDStage1Step(P, patch_fraction=0.0)
