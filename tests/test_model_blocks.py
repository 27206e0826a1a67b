"""Building blocks: sin-cos embedding closed form, attention kernels, initialisation."""
import math

import pytest
import torch
import torch.nn as nn

from multimae import MultiMAE, MultiViT, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter
from multimae.multimae_utils import (
    Attention,
    Block,
    CrossAttention,
    Mlp,
    build_2d_sincos_posemb,
    get_attention_impl,
    pair,
    set_attention_impl,
)


@pytest.fixture
def attention_impl():
    """Restore the process-wide attention implementation after the test."""
    before = get_attention_impl()
    yield set_attention_impl
    set_attention_impl(before)


# ---------------------------------------------------------------------------------------------- sin-cos
@pytest.mark.parametrize("h,w,dim", [(3, 5, 8), (5, 3, 16), (4, 4, 32), (1, 7, 4)])
def test_sincos_posemb_matches_closed_form(h, w, dim):
    emb = build_2d_sincos_posemb(h, w, embed_dim=dim)
    assert emb.shape == (1, dim, h, w) and emb.dtype == torch.float32
    q = dim // 4
    omega = [1.0 / 10000.0 ** (k / q) for k in range(q)]
    for a in range(h):
        for b in range(w):
            n = a * w + b
            i, j = n // h, n % h
            expect = ([math.sin(i * o) for o in omega] + [math.cos(i * o) for o in omega]
                      + [math.sin(j * o) for o in omega] + [math.cos(j * o) for o in omega])
            torch.testing.assert_close(emb[0, :, a, b], torch.tensor(expect), atol=1e-5, rtol=0)


def test_sincos_square_grid_first_quarter_encodes_row():
    emb = build_2d_sincos_posemb(6, 6, embed_dim=16)
    omega = 1.0 / 10000.0 ** (torch.arange(4) / 4)
    for a in range(6):
        for b in range(6):
            torch.testing.assert_close(emb[0, :4, a, b], torch.sin(a * omega), atol=1e-6, rtol=0)
            torch.testing.assert_close(emb[0, 8:12, a, b], torch.sin(b * omega), atol=1e-6, rtol=0)


def test_sincos_rejects_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_2d_sincos_posemb(2, 2, embed_dim=6)


def test_pair():
    assert pair(3) == (3, 3) and pair((2, 5)) == (2, 5)


# ---------------------------------------------------------------------------------------------- attention
def _explicit_attention(q, k, v, scale):
    return ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sdpa_and_math_attention_agree(attention_impl, dropout):
    attn = Attention(32, num_heads=4, qkv_bias=True, attn_drop=dropout, proj_drop=dropout).eval()
    xattn = CrossAttention(32, num_heads=4, qkv_bias=True, attn_drop=dropout, proj_drop=dropout).eval()
    x, ctx = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    out = {}
    for impl in ("sdpa", "math"):
        attention_impl(impl)
        out[impl] = (attn(x), xattn(x, ctx))
    for a, b in zip(out["sdpa"], out["math"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_matches_hand_written_formula(attention_impl):
    """Fused qkv layout (B, N, 3, heads, head_dim) and kv layout (B, M, 2, heads, head_dim), k first."""
    attention_impl("sdpa")
    B, N, M, D, H = 2, 6, 4, 16, 2
    attn, xattn = Attention(D, num_heads=H, qkv_bias=True), CrossAttention(D, num_heads=H, qkv_bias=True)
    x, ctx = torch.randn(B, N, D), torch.randn(B, M, D)
    qkv = attn.qkv(x).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    ref = _explicit_attention(qkv[0], qkv[1], qkv[2], (D // H) ** -0.5).transpose(1, 2).reshape(B, N, D)
    torch.testing.assert_close(attn(x), attn.proj(ref), atol=1e-5, rtol=0)
    q = xattn.q(x).reshape(B, N, H, D // H).transpose(1, 2)
    kv = xattn.kv(ctx).reshape(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)
    ref = _explicit_attention(q, kv[0], kv[1], (D // H) ** -0.5).transpose(1, 2).reshape(B, N, D)
    torch.testing.assert_close(xattn(x, ctx), xattn.proj(ref), atol=1e-5, rtol=0)


def test_whole_model_sdpa_equals_math_forward_and_backward(attention_impl):
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=64), "semseg": SemSegInputAdapter(5, 4, 16, image_size=64)}
    outs = {"rgb": SpatialOutputAdapter(3, 1, 16, dim_tokens=32, depth=1, num_heads=4, image_size=64, task="rgb",
                                        context_tasks=["rgb", "semseg"])}
    model = MultiMAE(ins, outs, dim_tokens=64, depth=2, num_heads=4, drop_path_rate=0.0)
    x = {"rgb": torch.randn(2, 3, 64, 64), "semseg": torch.randint(0, 5, (2, 16, 16))}
    results = {}
    for impl in ("sdpa", "math"):
        attention_impl(impl)
        torch.manual_seed(1)  # same masks for both
        preds, _ = model(x, num_encoded_tokens=10)
        model.zero_grad()
        preds["rgb"].square().mean().backward()
        results[impl] = (preds["rgb"].detach(), model.encoder[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(results["sdpa"][0], results["math"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(results["sdpa"][1], results["math"][1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype,num_keys,fused", [(torch.float32, 20, True), (torch.bfloat16, 20, False),
                                                   (torch.float16, 20, False), (torch.bfloat16, 1024, True)])
def test_auto_attention_dispatch_on_cpu(attention_impl, monkeypatch, dtype, num_keys, fused):
    """'auto' (the default) calls the fused kernel except for short low-precision sequences on CPU, and
    gives the same numbers either way."""
    import multimae.multimae_utils as mu

    calls = []
    real = mu.F.scaled_dot_product_attention
    monkeypatch.setattr(mu.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attention_impl("auto")
    assert get_attention_impl() == "auto"
    attn = CrossAttention(32, num_heads=4).to(dtype)
    x, ctx = torch.randn(2, 5, 32, dtype=dtype), torch.randn(2, num_keys, 32, dtype=dtype)
    out = attn(x, ctx)
    assert bool(calls) == fused
    attention_impl("sdpa" if not fused else "math")
    other = attn(x, ctx)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), other.float(), atol=tol, rtol=tol)


def test_unknown_attention_impl_rejected(attention_impl):
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention_impl("flash3")


def test_mlp_has_no_dropout_between_activation_and_fc2():
    mlp = Mlp(8, 16, drop=0.5)
    assert mlp.drop1.p == 0.0 and mlp.drop2.p == 0.5
    mlp.train()
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    out = mlp(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], (mlp.fc2(mlp.act(mlp.fc1(x))) * 2)[kept])


def test_block_is_prenorm_residual():
    blk = Block(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(2, 5, 16)
    y = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), y + blk.mlp(blk.norm2(y)))
    assert isinstance(blk.drop_path1, nn.Identity) and isinstance(blk.drop_path2, nn.Identity)


def test_layers_are_timms_with_the_same_keys_and_dropout_placement():
    from timm.layers import Attention as TimmAttention, Mlp as TimmMlp
    from timm.models.vision_transformer import Block as TimmBlock

    blk = Block(16, num_heads=2, qkv_bias=True, drop=0.3, attn_drop=0.2)
    assert isinstance(blk, TimmBlock) and isinstance(blk.attn, TimmAttention) and isinstance(blk.mlp, TimmMlp)
    assert list(blk.state_dict()) == [f"{p}.{t}" for p in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                            "mlp.fc2") for t in ("weight", "bias")]
    assert (blk.attn.attn_drop.p, blk.attn.proj_drop.p, blk.mlp.drop1.p, blk.mlp.drop2.p) == (0.2, 0.3, 0.0, 0.3)
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="not supported"):
        blk.attn(torch.randn(1, 3, 16), is_causal=True)


# ---------------------------------------------------------------------------------------------- initialisation
def test_published_initialisation():
    torch.manual_seed(0)
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=64), "semseg": SemSegInputAdapter(7, 4, 16, image_size=64)}
    outs = {"rgb": SpatialOutputAdapter(3, 1, 16, dim_tokens=32, depth=1, num_heads=4, image_size=64, task="rgb",
                                        context_tasks=["rgb", "semseg"])}
    model = MultiMAE(ins, outs, dim_tokens=64, depth=2, num_heads=4)

    def uniform_bound_ok(w, bound):
        return w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.8 * bound

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            fused = 3 if "qkv" in name else 2 if "kv" in name else 1
            assert uniform_bound_ok(m.weight, math.sqrt(6.0 / (out_f // fused + in_f))), name
            if m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0, name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    w = model.input_adapters.rgb.proj.weight
    assert uniform_bound_ok(w, math.sqrt(6.0 / (w.shape[0] + w[0].numel())))
    assert torch.count_nonzero(model.output_adapters.rgb.mask_token) == 0
    for tensor in (model.global_tokens, model.input_adapters.semseg.class_emb.weight,
                   model.output_adapters.rgb.task_embeddings.rgb):
        assert 0.005 < tensor.std() < 0.04 and tensor.abs().max() <= 2.0
    assert not model.input_adapters.rgb.pos_emb.requires_grad
    assert not model.output_adapters.rgb.pos_emb.requires_grad
    torch.testing.assert_close(model.input_adapters.rgb.pos_emb.data, build_2d_sincos_posemb(4, 4, 64))


def test_multivit_global_tokens_are_last():
    ins = {"rgb": PatchedInputAdapter(3, 1, 16, image_size=32)}
    model = MultiViT(ins, None, num_global_tokens=2, dim_tokens=32, depth=0, num_heads=4).eval()
    tokens = model(torch.randn(2, 3, 32, 32))  # depth 0: the encoder is the identity
    assert tokens.shape == (2, 4 + 2, 32)
    torch.testing.assert_close(tokens[:, -2:], model.global_tokens.expand(2, -1, -1))


def _queries_and_context_full_sequence(adapter, tokens, info, ids_keep, ids_restore):
    """The decoder inputs built the long way: every input position (visible token or mask token, back in
    input order, plus its embedding), then the task's positions and the ids_keep positions picked out."""
    B, _, d = tokens.shape
    n_global = info["num_global_tokens"]
    visible, global_tokens = tokens[:, :-n_global], tokens[:, -n_global:]
    mask = adapter.mask_token.expand(B, info["num_task_tokens"] - visible.shape[1], d)
    full = torch.gather(torch.cat([visible, mask], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
    full = full + adapter._context_embeddings(info, adapter._grid(info["image_size"]))
    task = info["tasks"][adapter.task]
    context = torch.gather(full, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
    return full[:, task["start_idx"]:task["end_idx"]], torch.cat([context, global_tokens], 1)


@pytest.mark.parametrize("same_shuffle", [True, False])
def test_decoder_queries_and_context_match_the_full_sequence(same_shuffle):
    """Gathering only the query and context rows gives the values and gradients of building the whole
    (B, N_total, d) sequence first, also for an ids_keep that is not the head of ids_restore's shuffle."""
    torch.manual_seed(0)
    adapter = SpatialOutputAdapter(3, 1, 16, dim_tokens=16, depth=0, num_heads=2, image_size=32, task="depth",
                                   context_tasks=["rgb", "depth"], dim_tokens_enc=16)
    B, n_vis, n_total = 3, 5, 8
    info = {"tasks": {"rgb": {"num_tokens": 4, "start_idx": 0, "end_idx": 4},
                      "depth": {"num_tokens": 4, "start_idx": 4, "end_idx": 8}},
            "image_size": (32, 32), "num_task_tokens": n_total, "num_global_tokens": 1}
    shuffle = torch.argsort(torch.rand(B, n_total), dim=1)
    ids_restore = torch.argsort(shuffle, dim=1)
    ids_keep = shuffle[:, :n_vis] if same_shuffle else torch.argsort(torch.rand(B, n_total), dim=1)[:, :n_vis]
    tokens = torch.randn(B, n_vis + 1, 16, requires_grad=True)
    got = adapter.get_queries_and_context(tokens, info, ids_keep, ids_restore)
    want = _queries_and_context_full_sequence(adapter, tokens, info, ids_keep, ids_restore)
    params = [tokens, adapter.mask_token, *adapter.task_embeddings.values()]
    weights = [torch.randn_like(t) for t in got]
    grads_got = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), params)
    grads_want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), params)
    for g, w in zip(got + grads_got, want + grads_want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert got[0].shape == (B, 4, 16) and got[1].shape == (B, n_vis + 1, 16)
