"""Dilated attention against a literal port of upstream torchscale ``DilatedAttention`` (odd layouts included),
attention backends, gradients, gradient checkpointing, CLS attention. Tiny shapes: runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_clip import SlideEncoderConfig, SlideEncoderModel
from wsi_clip.dilated_attention import attention_with_lse, chunked_attention_with_lse, dilated_attention

# ----------------------------------------------------------------------------------------------------------------
# Literal port of torchscale/component/dilated_attention.py (einops rearranges spelled out), exact attention.
# ----------------------------------------------------------------------------------------------------------------


def _pad_to_multiple(n: int, mult: int) -> int:
    return (mult - n % mult) % mult


def _ref_attention(q, k, v):  # '(b h) l d' each -> out 'b l (h d)' and lse [b, h, l], float64
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v.double(), lse


def upstream_dilated_attention(q, k, v, segment_length, dilated_ratio):
    """q, k, v: [b, L, H, d] projected. Returns [b, L, H, d] exactly as upstream (float64)."""
    bsz, tgt_len, num_heads, head_dim = q.shape

    def dense_to_sparse(x, ratio):
        length = x.size(1)
        padding, head_padding = _pad_to_multiple(length, ratio), _pad_to_multiple(num_heads, ratio)
        if padding > 0 or head_padding > 0:
            x = F.pad(x, (0, 0, 0, head_padding, 0, padding), value=0.0)
        b, lp, hp, d = x.shape
        x = x.reshape(b, lp // ratio, ratio, ratio, hp // ratio, d)  # b (l r1) (r2 h) d -> b l r1 r2 h d
        x = x.permute(0, 1, 4, 5, 2, 3)  # b l h d r1 r2
        x = torch.diagonal(x, offset=0, dim1=4, dim2=5)  # b l h d r
        x = x.permute(0, 1, 4, 2, 3).reshape(b, lp // ratio, hp, d)  # b l (r h) d
        if head_padding > 0:
            x = x[:, :, :num_heads]
        return x

    def sparse_to_dense(out, lse, ratio):  # out [b, l, H, d], lse [b, H, l]
        head_padding = _pad_to_multiple(num_heads, ratio)
        if head_padding > 0:
            out = F.pad(out, (0, 0, 0, head_padding), value=0.0)
            lse = F.pad(lse, (0, 0, 0, head_padding), value=-1e8)
        b, length, hp, d = out.shape
        out = out.reshape(b, length, ratio, hp // ratio, d).permute(0, 1, 3, 4, 2)  # b l h d r
        out = torch.diag_embed(out, offset=0, dim1=4, dim2=5)  # b l h d r1 r2
        out = out.permute(0, 5, 2, 1, 4, 3).reshape(b, hp, length * ratio, d)  # b (r2 h) (l r1) d
        lse = lse.reshape(b, ratio, hp // ratio, length).permute(0, 3, 2, 1)  # b l h r
        lse = torch.diag_embed(lse, offset=0, dim1=3, dim2=4)
        lse = lse.masked_fill_(lse == 0, -1e8)
        lse = lse.permute(0, 4, 2, 1, 3).reshape(b, hp, length * ratio, 1)  # b (r2 h) (l r1) 1
        if head_padding > 0:
            out, lse = out[:, :num_heads], lse[:, :num_heads]
        return out, lse

    def gathering(x, dr, sl):
        seq_len = x.size(1)
        sl = min(sl, seq_len)
        padding = _pad_to_multiple(seq_len, sl)
        if padding > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, padding), value=0.0)
        x = x.reshape(-1, sl, *x.shape[2:])  # b (n g) h d -> (b n) g h d
        x = dense_to_sparse(x, dr)
        return x.permute(0, 2, 1, 3).reshape(-1, x.size(1), x.size(3))  # (b h) l d

    outs, lses = [], []
    for sl, dr in zip(segment_length, dilated_ratio):
        qi, ki, vi = (gathering(t, dr, sl) for t in (q, k, v))
        out, lse = _ref_attention(qi, ki, vi)  # [(bn) h, l, d], [(bn) h, l]
        bn = out.shape[0] // num_heads
        out = out.reshape(bn, num_heads, -1, head_dim).permute(0, 2, 1, 3)  # b l h d
        lse = lse.reshape(bn, num_heads, -1)
        o, lse = sparse_to_dense(out, lse, dr)  # (b n) h g d, (b n) h g 1
        g = o.shape[2]
        o = (
            o.reshape(bsz, bn // bsz, num_heads, g, head_dim)
            .permute(0, 2, 1, 3, 4)
            .reshape(bsz * num_heads, -1, head_dim)[:, :tgt_len]
        )
        lse = (
            lse.reshape(bsz, bn // bsz, num_heads, g, 1)
            .permute(0, 2, 1, 3, 4)
            .reshape(bsz * num_heads, -1, 1)[:, :tgt_len]
        )
        outs.append(o)
        lses.append(lse)
    with torch.no_grad():  # as upstream: no gradient through the merge weights
        max_lse = torch.stack(lses, 0).max(0)[0]
        weights = [torch.exp(lse - max_lse) for lse in lses]
        total = torch.stack(weights, 0).sum(0)
    out = sum(o * (w / total) for o, w in zip(outs, weights))
    return out.reshape(bsz, num_heads, tgt_len, head_dim).permute(0, 2, 1, 3)  # b l h d


LAYOUTS = [
    # (L, heads, segment_length, dilated_ratio): what each one exercises
    (37, 4, [8, 16, 64], [1, 2, 4]),  # several segments, tails, whole-sequence branch
    (50, 6, [7, 12, 24, 100], [1, 2, 4, 8]),  # s % r != 0 with several segments (shifted layout), H % r != 0
    (9, 4, [1024, 5792], [1, 2]),  # every branch longer than L (the usual small-slide case)
    (33, 16, [4, 10, 33], [1, 2, 16]),  # 1-token tails, r = H
]


@pytest.mark.parametrize("length,heads,segments,ratios", LAYOUTS)
@pytest.mark.parametrize("mode", ["analytic-padding", "materialized-padding", "inference-workspace"])
def test_dilated_attention_matches_upstream_port(length, heads, segments, ratios, mode):
    torch.manual_seed(length)
    q, k, v = (torch.randn(2, length, heads, 8) for _ in range(3))
    ref = upstream_dilated_attention(q, k, v, segments, ratios)
    workspace = {} if mode == "inference-workspace" else None
    for _ in range(2 if workspace is not None else 1):  # second call reuses the buffers
        ours = dilated_attention(
            q,
            k,
            v,
            segments,
            ratios,
            materialize_padding=mode == "materialized-padding",
            max_call_elements=200,
            workspace=workspace,
        )
        assert ours.shape == (2, length, heads, 8)
        assert (ours.double() - ref).abs().max().item() < 2e-6


def test_zero_pad_keys_are_not_masked():
    """Upstream's zero pad keys enlarge the softmax: dropping them changes the output (so the port keeps them)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 4) for _ in range(3))
    ours = dilated_attention(q, k, v, [8], [1])
    masked_tail = torch.cat(
        [
            ours[:, :8],
            F.scaled_dot_product_attention(
                q[:, 8:].transpose(1, 2), k[:, 8:].transpose(1, 2), v[:, 8:].transpose(1, 2)
            ).transpose(1, 2),
        ],
        1,
    )
    # token 8 is alone in its segment with 7 zero keys: out = v8 * e^s / (e^s + 7)
    score = (q[0, 8] * k[0, 8]).sum(-1) / 2.0  # [H]
    expected = v[0, 8] * (torch.exp(score) / (torch.exp(score) + 7)).unsqueeze(-1)
    assert torch.allclose(ours[0, 8], expected, atol=1e-6)
    assert (masked_tail[0, 8] - ours[0, 8]).abs().max() > 0.1


def test_attention_backends_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 70, 16) for _ in range(3))
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    ref_out, ref_lse = torch.softmax(scores, -1) @ v.double(), torch.logsumexp(scores, -1)
    for backend in ("auto", "fused", "chunked"):
        out, lse = attention_with_lse(q, k, v, backend)
        assert lse.dtype == torch.float32 and lse.shape == (3, 4, 70)
        assert (out.double() - ref_out).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5
    # the chunked path splits queries once the score budget is exceeded
    import wsi_clip.dilated_attention as da

    budget, da.CHUNK_SCORE_ELEMENTS = da.CHUNK_SCORE_ELEMENTS, 1000
    try:
        out, lse = chunked_attention_with_lse(q, k, v)
    finally:
        da.CHUNK_SCORE_ELEMENTS = budget
    assert (out.double() - ref_out).abs().max() < 1e-5 and (lse.double() - ref_lse).abs().max() < 1e-5


def test_flash_attn_package_is_called_like_the_original_when_installed(monkeypatch):
    """flash-attn is optional: when importable it is called as upstream does (``[B, l, H, d]``,
    ``return_attn_probs=True``) and its outputs are mapped back; when not, nothing asks for it."""
    import sys
    import types

    import wsi_clip.dilated_attention as da

    calls = []

    def fake_flash_attn_func(q, k, v, dropout_p, causal, return_attn_probs):
        calls.append((tuple(q.shape), dropout_p, causal, return_attn_probs))
        out, lse = chunked_attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), F.pad(lse, (0, 128 - lse.shape[-1] % 128)), None  # lse rounded up, as v1

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash_attn_func))
    da._flash_attn_func.cache_clear()
    assert da._flash_attn_func() is fake_flash_attn_func
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 16) for _ in range(3))
    out, lse = da._flash_attn_with_lse(da._flash_attn_func(), q, k, v)
    ref_out, ref_lse = chunked_attention_with_lse(q, k, v)
    assert calls == [((2, 70, 4, 16), 0.0, False, True)]
    assert out.shape == q.shape and lse.shape == (2, 4, 70)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-6)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: the import fails
    da._flash_attn_func.cache_clear()
    assert da._flash_attn_func() is None
    da._flash_attn_func.cache_clear()  # later lookups see the real environment


@pytest.mark.parametrize("length,heads,segments,ratios", LAYOUTS[:2])
def test_gradients_match_upstream_port(length, heads, segments, ratios):
    """Upstream computes the merge weights under no_grad; gradients flow through the branch outputs only."""
    torch.manual_seed(1)
    base = [torch.randn(1, length, heads, 8, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(1, length, heads, 8, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_() for t in base]
    ref = upstream_dilated_attention(*ref_inputs, segments, ratios)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    ours_inputs = [t.float().requires_grad_() for t in base]
    ours = dilated_attention(*ours_inputs, segments, ratios)
    grads = torch.autograd.grad(ours, ours_inputs, grad_out.float())
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() / r.abs().max() < 1e-5


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Bytes of distinct storages autograd keeps for backward while ``fn()`` builds its graph."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_training_keeps_dense_qkv_not_dilated_copies(monkeypatch):
    """On CPU the fused path regathers each branch's dilated q/k/v in backward: same gradients as keeping the
    copies, and less memory held between forward and backward."""
    import wsi_clip.dilated_attention as da

    torch.manual_seed(2)
    length, heads, segments, ratios = 50, 6, [7, 12, 24, 100], [1, 2, 4, 8]
    base = [torch.randn(1, length, heads, 8) for _ in range(3)]
    grad_out = torch.randn(1, length, heads, 8)

    def run(need=(True, True, True)):
        inputs = [t.clone().requires_grad_(n) for t, n in zip(base, need)]
        out, saved = _saved_bytes(lambda: dilated_attention(*inputs, segments, ratios))
        wanted = [t for t in inputs if t.requires_grad]
        return out, saved, torch.autograd.grad(out, wanted, grad_out)

    calls = []
    real_apply = da._RegatheredCpuAttention.apply
    monkeypatch.setattr(da._RegatheredCpuAttention, "apply", lambda *a: calls.append(1) or real_apply(*a))
    out, saved_regather, grads = run()
    assert len(calls) > 0
    partial = run(need=(False, True, False))[2]  # only k needs a gradient

    def keep_copies(seg, ratio, *qkv):
        return da.attention_with_lse(*(da._dilate(t, seg, ratio) for t in qkv))

    monkeypatch.setattr(da._RegatheredCpuAttention, "apply", keep_copies)
    ref_out, saved_plain, ref_grads = run()
    assert torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-6 * r.abs().max()
    assert (partial[0] - ref_grads[1]).abs().max() <= 1e-6 * ref_grads[1].abs().max()
    assert saved_regather < 0.75 * saved_plain, (saved_regather, saved_plain)


def test_training_falls_back_when_the_fused_kernel_fails(monkeypatch):
    """A kernel error in training (e.g. a dtype without a fused CPU kernel) falls back to the portable path once
    and for all for that device/dtype, with the same outputs and gradients."""
    import wsi_clip.dilated_attention as da

    torch.manual_seed(3)
    inputs = [torch.randn(1, 37, 4, 8, requires_grad=True) for _ in range(3)]
    ref = dilated_attention(*inputs, [8, 16, 64], [1, 2, 4], backend="chunked")
    ref_grads = torch.autograd.grad(ref.sum(), inputs)

    def broken(*args):
        raise RuntimeError("no fused kernel")

    monkeypatch.setattr(da._RegatheredCpuAttention, "apply", broken)
    monkeypatch.setattr(da, "_FUSED_FAILED", set())
    out = dilated_attention(*inputs, [8, 16, 64], [1, 2, 4])
    assert da._FUSED_FAILED == {("cpu", torch.float32)}
    assert torch.allclose(out, ref, atol=1e-6)
    for g, r in zip(torch.autograd.grad(out.sum(), inputs), ref_grads):
        assert torch.allclose(g, r, atol=1e-5)
    with pytest.raises(RuntimeError, match="no fused kernel"):  # backend="fused" never falls back
        dilated_attention(*inputs, [8, 16, 64], [1, 2, 4], backend="fused")


def _tiny_config(**overrides) -> SlideEncoderConfig:
    base = dict(
        input_dim=24,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        segment_length=[8, 16, 64],
        dilated_ratio=[1, 2, 4],
        dropout=0.0,
        drop_path_rate=0.0,
        slide_ngrids=64,
        inference_chunk_size=16,
    )
    base.update(overrides)
    return SlideEncoderConfig(**base)


def _tiny_inputs(batch: int, tiles: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, tiles, 24, generator=g)
    coords = torch.randint(0, 64 * 256, (batch, tiles, 2), generator=g)
    return features, coords


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    model = SlideEncoderModel(_tiny_config(dropout=0.1, drop_path_rate=0.2)).train()
    features, coords = _tiny_inputs(2, 30)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 21:] = False

    def grads():
        torch.manual_seed(123)
        out = model(features, coords, mask)
        loss = out.pooler_output.square().sum() + (out.last_hidden_state[:, 1:] * mask.unsqueeze(-1)).sum()
        model.zero_grad()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_plain, plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing and model.layers[0].gradient_checkpointing
    recomputed = []
    model.layers[0].self_attn_layer_norm.register_forward_hook(lambda *_: recomputed.append(1))
    loss_ckpt, ckpt = grads()
    assert len(recomputed) == 2  # forward + recomputation in backward
    assert loss_plain == pytest.approx(loss_ckpt, rel=1e-6)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name
    assert plain["layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_inference_path_equals_autograd_path():
    """Eval + no_grad uses chunked in-place layers, reused buffers and analytic tail padding; with gradients the
    plain path runs. Same numbers."""
    torch.manual_seed(0)
    model = SlideEncoderModel(_tiny_config()).eval()
    features, coords = _tiny_inputs(1, 45)
    with torch.no_grad():
        fast = model(features, coords, output_hidden_states=True)
    slow = model(features, coords, output_hidden_states=True)
    assert slow.last_hidden_state.requires_grad
    assert (fast.last_hidden_state - slow.last_hidden_state).abs().max() < 1e-5
    for a, b in zip(fast.hidden_states, slow.hidden_states):
        assert (a - b).abs().max() < 1e-5
    # the saved states are distinct tensors even though the layers work in place
    assert len({s.data_ptr() for s in fast.hidden_states}) == len(fast.hidden_states)


def test_chunked_backend_equals_fused():
    torch.manual_seed(0)
    fused = SlideEncoderModel(_tiny_config(attention_backend="fused")).eval()
    chunked = SlideEncoderModel(_tiny_config(attention_backend="chunked")).eval()
    chunked.load_state_dict(fused.state_dict())
    features, coords = _tiny_inputs(2, 40)
    with torch.no_grad():
        a, b = fused(features, coords), chunked(features, coords)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max() < 1e-5


def test_cls_attention_is_last_layer_full_attention_row():
    torch.manual_seed(0)
    model = SlideEncoderModel(_tiny_config()).eval()
    features, coords = _tiny_inputs(2, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False
    with torch.no_grad():
        out = model(features, coords, mask, output_hidden_states=True, output_cls_attention=True)
        attn = model.cls_attention(features, coords, mask)
    assert attn.shape == (2, 4, 20) and out.tile_keys.shape == (2, 20, 32)
    assert torch.equal(attn, out.cls_attention)
    last = model.layers[-1]
    for b, n in ((0, 20), (1, 13)):
        x = last.self_attn_layer_norm(out.hidden_states[-2][b : b + 1, : n + 1])
        q = last.self_attn.q_proj(x).view(1, n + 1, 4, 8)
        k = last.self_attn.k_proj(x).view(1, n + 1, 4, 8)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", q[0, 0], k[0]) / math.sqrt(8), -1)  # [H, n+1]
        assert torch.allclose(attn[b, :, :n], probs[:, 1:], atol=1e-6)
        assert torch.allclose(out.tile_keys[b, :n], k[0, 1:].reshape(n, 32), atol=1e-6)
    assert attn[1, :, 13:].abs().max() == 0
    # rows sum to 1 minus the CLS self-attention
    assert torch.all(attn.sum(-1) < 1) and torch.all(attn.sum(-1) > 0)
