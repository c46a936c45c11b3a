"""LongNet dilated attention with Prov-GigaPath's exact numerics, without flash-attn, batched over ragged slides.

Hub-shipped helper of ``modeling_slide_encoder.py``: imports only stdlib and torch.

What upstream (torchscale ``DilatedAttention``, as used by Prov-GigaPath) computes, and what this module reproduces:

* Per branch ``(segment_length sl, ratio r)``: ``s = min(sl, L)``; the sequence is zero-padded at its end to whole
  segments of ``s``; each segment is zero-padded at its end to a multiple of ``r``; head group ``j`` (contiguous
  heads ``j*g .. j*g+g-1``, ``g = ceil(H / r)``) attends among the segment positions ``i*r + j``. Padding is applied
  to the *projected* q/k/v, so pad keys are exact zeros: logit 0, value 0, **not masked**.
* Branch outputs are put back in the layout "padded segments concatenated, then cut to L" (when ``s`` is not a
  multiple of ``r`` and there are several segments this shifts positions; upstream does it, so do we).
* Branches are merged per token and head with ``softmax(lse)`` weights computed in fp32 without gradient.

Differences that do not change the numbers (beyond float rounding):

* Zero keys of a trailing, mostly empty segment are not materialised at inference: their effect on a query is
  ``extra`` keys with logit 0, i.e. ``lse' = logaddexp(lse, log(extra))`` and ``out' = out * exp(lse - lse')``.
  With gradients enabled the pad keys are materialised, so gradients are exactly upstream's too.
* Slides of a ragged batch are processed by groups of equal length, so every slide sees exactly the zero padding
  it would see alone (B=1) and batch padding never enters any softmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Upstream's log-sum-exp for (position, head) pairs that a branch does not cover (``sparse_to_dense``).
UNCOVERED_LSE = -1e8
# Score elements per chunk in the portable attention fallback (64 MiB of fp32 scores).
CHUNK_SCORE_ELEMENTS = 1 << 24

_FUSED_FAILED: set[tuple[str, torch.dtype]] = set()  # (device type, dtype) whose fused kernel raised once
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # not a reason to fall back


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------------------------------
# Attention kernels that return the log-sum-exp
# --------------------------------------------------------------------------------------------------------------


def chunked_attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Portable exact attention: fp32 scores in query chunks, ``logsumexp``, then ``exp(s - lse) @ v``.

    q, k, v: ``[B, H, l, d]`` → ``(out [B, H, l, d] in v's dtype, lse [B, H, l] float32)``. Differentiable in
    q, k, v (the lse is only used for the detached branch merge).
    """
    batch, heads, length, head_dim = q.shape
    scale = head_dim**-0.5
    rows = max(1, CHUNK_SCORE_ELEMENTS // max(1, batch * heads * k.shape[-2]))
    kt = k.float().transpose(-1, -2)  # [B, H, d, l]
    vf = v.float()
    outs, lses = [], []
    for start in range(0, length, rows):
        scores = torch.matmul(q[:, :, start : start + rows].float() * scale, kt)  # [B, H, rows, l]
        lse = torch.logsumexp(scores, dim=-1)  # [B, H, rows]
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf).to(v.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2).detach()


@functools.cache
def _flash_attn_func() -> Callable | None:
    """The flash-attn package's ``flash_attn_func`` when it is installed (optional, never required), else ``None``."""
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch / CUDA: PyTorch's kernels do the job
        return None
    return flash_attn_func


def _flash_attn_with_lse(flash_attn_func: Callable, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The original's call: ``flash_attn_func(..., return_attn_probs=True)`` on ``[B, l, H, d]`` gives the output and
    the log-sum-exp ``[B, H, l]`` (older releases round the lse length up: cut to l)."""
    out, lse, _ = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, causal=False, return_attn_probs=True
    )
    return out.transpose(1, 2), lse[..., : q.shape[-2]]


def _fused_attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """Fused kernels that return the lse: PyTorch's CPU flash kernel; on CUDA the flash-attn package when installed,
    else PyTorch's flash / memory-efficient kernels. ``None`` where there is none."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    if q.device.type == "cuda":
        head_dim = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
            flash_attn_func = _flash_attn_func()
            if flash_attn_func is not None:
                return _flash_attn_with_lse(flash_attn_func, q, k, v)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[-2]]
    return None


def _fused_allowed(q: Tensor, backend: str) -> bool:
    """Whether to try the fused kernel: ``"fused"`` always, ``"auto"`` until it has failed for q's device/dtype."""
    return backend == "fused" or (backend == "auto" and (q.device.type, q.dtype) not in _FUSED_FAILED)


def _try_fused(
    q: Tensor, backend: str, call: Callable[[], tuple[Tensor, Tensor] | None]
) -> tuple[Tensor, Tensor] | None:
    """``call()``; with ``backend="auto"`` a kernel error (not out-of-memory) returns ``None`` and disables the fused
    kernel for q's device/dtype once and for all, so the caller falls back to the portable path."""
    try:
        return call()
    except _OUT_OF_MEMORY:
        raise
    except (RuntimeError, NotImplementedError, AttributeError):
        if backend == "fused":
            raise
        _FUSED_FAILED.add((q.device.type, q.dtype))
        return None


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact bidirectional softmax attention (scale ``d**-0.5``) plus the per-query log-sum-exp.

    q, k, v: ``[B, H, l, d]``. Returns ``out [B, H, l, d]`` and ``lse [B, H, l]`` (float32). ``backend``:
    ``"auto"`` uses the fused kernel of the device when it runs (falling back to chunked matmul once and for all
    for that device/dtype if it raises), ``"fused"`` requires it, ``"chunked"`` always uses the portable path.
    """
    if _fused_allowed(q, backend):
        result = _try_fused(q, backend, lambda: _fused_attention_with_lse(q, k, v))
        if result is not None:
            return result[0], result[1].float()
        if backend == "fused":
            raise RuntimeError(
                f"attention_backend='fused' has no kernel for device {q.device.type!r}; "
                "use attention_backend='auto' or 'chunked'."
            )
    return chunked_attention_with_lse(q, k, v)


# --------------------------------------------------------------------------------------------------------------
# Layout helpers: dense [G, L, H, ...] <-> sparse per-branch [G*m, H, l, ...]
# --------------------------------------------------------------------------------------------------------------


def _dilate(x: Tensor, seg: int, ratio: int, scratch: Tensor | None = None) -> Tensor:
    """``[G, m*seg, H, d]`` (m whole segments) → ``[G*m, H, l, d]``, upstream ``gathering`` + ``dense_to_sparse``.

    Each segment is zero-padded to ``seg_r = ceil(seg / r) * r`` and heads to ``r * g``; head group ``j`` keeps the
    positions ``i*r + j``, so sparse head ``j*g + h`` is dense head ``j*g + h`` (order preserved), ``l = seg_r / r``.
    ``scratch`` (flat, large enough): write the result there instead of allocating (inference).
    """
    groups, length, heads, head_dim = x.shape
    m = length // seg
    seg_r, g = _ceil_to(seg, ratio), -(-heads // ratio)
    x = x.reshape(groups * m, seg, heads, head_dim)
    if ratio == 1:
        return x.transpose(1, 2)  # [G*m, H, seg, d], a view
    if scratch is None or g * ratio != heads:
        if seg_r != seg or g * ratio != heads:
            x = F.pad(x, (0, 0, 0, g * ratio - heads, 0, seg_r - seg))  # upstream's unmasked zero pads
        x = x.view(groups * m, seg_r // ratio, ratio, ratio, g, head_dim).diagonal(dim1=2, dim2=3)  # [G*m,l,g,d,r]
        x = x.permute(0, 4, 2, 1, 3).reshape(groups * m, ratio * g, seg_r // ratio, head_dim)  # [G*m, r*g, l, d]
        return x[:, :heads] if g * ratio != heads else x
    # Same result written into scratch, padding only the last, partial row of each segment.
    full, rem = divmod(seg, ratio)
    length_r = seg_r // ratio
    dest = scratch[: groups * m * heads * length_r * head_dim].view(groups * m, ratio, g, length_r, head_dim)
    dest_by_pos = dest.permute(0, 3, 2, 4, 1)  # [G*m, l, g, d, r]
    if full:
        dest_by_pos[:, :full].copy_(
            x[:, : full * ratio].view(groups * m, full, ratio, ratio, g, head_dim).diagonal(dim1=2, dim2=3)
        )
    if rem:
        last = dest_by_pos[:, full]  # [G*m, g, d, r]: groups j >= rem see a zero pad
        last.zero_()
        last[..., :rem].copy_(x[:, full * ratio :].view(groups * m, rem, ratio, g, head_dim).diagonal(dim1=1, dim2=2))
    return dest.view(groups * m, heads, length_r, head_dim)


def _scratch(workspace: dict | None, name: str, numel: int, like: Tensor) -> Tensor | None:
    """A flat reusable buffer of at least ``numel`` elements (``None`` without a workspace)."""
    if workspace is None:
        return None
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = like.new_empty(numel)
    return buf


def _region(buf: Tensor, start: int, m: int, seg_r: int, ratio: int, heads: int) -> Tensor:
    """Diagonal view of ``buf [G, P, Hp, *e]`` rows ``start .. start + m*seg_r`` → ``[G, m, l, g, *e, r]``:
    element ``[.., s, i, h, .., j]`` is position ``start + s*seg_r + i*r + j``, head ``j*g + h`` (the positions and
    heads that sparse head ``j*g + h``, index ``i`` of segment ``s`` writes to); ``g = ceil(heads / r)``."""
    groups, _, _, *extra = buf.shape
    g = -(-heads // ratio)
    sub = buf[:, start : start + m * seg_r, : ratio * g]
    return sub.view(groups, m, seg_r // ratio, ratio, ratio, g, *extra).diagonal(dim1=3, dim2=4)


def _to_region(y: Tensor, groups: int, ratio: int) -> Tensor:
    """Sparse ``[G*m, H, l, *e]`` → ``[G, m, l, g, *e, r]`` (the layout of :func:`_region`)."""
    gm, heads, length, *extra = y.shape
    g = -(-heads // ratio)
    if g * ratio != heads:
        pad = [0, 0] * len(extra) + [0, 0, 0, g * ratio - heads]
        y = F.pad(y, pad)
    y = y.view(groups, gm // groups, ratio, g, length, *extra)
    order = (0, 1, 4, 3) + tuple(range(5, 5 + len(extra))) + (2,)
    return y.permute(order)


def _from_region(z: Tensor, heads: int) -> Tensor:
    """Inverse of :func:`_to_region`: ``[G, m, l, g, *e, r]`` → sparse ``[G*m, H, l, *e]``."""
    groups, m, length, g, *rest = z.shape
    extra, ratio = rest[:-1], rest[-1]
    order = (0, 1, len(z.shape) - 1, 3, 2) + tuple(range(4, 4 + len(extra)))
    z = z.permute(order).reshape(groups * m, ratio * g, length, *extra)
    return z[:, :heads]


def _buffer(
    workspace: dict | None, name: str, like: Tensor, shape: tuple[int, ...], dtype: torch.dtype, fill: float
) -> Tensor:
    """A filled scratch tensor, reused across layers through ``workspace`` when given (inference): large fresh
    allocations cost page faults on every layer (glibc serves them with mmap), reused ones do not."""
    if workspace is None:
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    key = f"{name}:{tuple(shape)}:{dtype}"
    buf = workspace.get(key)
    if buf is None or buf.device != like.device:
        buf = workspace[key] = torch.empty(shape, dtype=dtype, device=like.device)
    return buf.fill_(fill)


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_length: list[int],
    dilated_ratio: list[int],
    backend: str = "auto",
    materialize_padding: bool | None = None,
    max_call_elements: int | None = None,
    workspace: dict | None = None,
) -> Tensor:
    """LongNet multi-branch dilated attention of slides that all have the same length ``L`` (no batch padding).

    q, k, v: ``[G, L, H, d]`` projected queries / keys / values (any strides). Returns ``[G, L, H, d]`` (before
    ``inner_attn_ln``), in q's dtype.

    Branches are merged per (position, head) with the upstream formula ``out = Σ o_i·exp(lse_i - M) / Σ
    exp(lse_i - M)``, fp32 weights that carry no gradient. With a ``workspace`` (inference) each kernel output is
    folded into a running merge right away, so none outlives its call; otherwise the weights are computed first
    and the weighted pieces are scattered by :class:`_ScatterPieces`, whose backward is a plain gather.

    Args:
        backend: attention kernel, see :func:`attention_with_lse`. When autograd records on CPU with the fused
            kernel, each call goes through :class:`_RegatheredCpuAttention`, which keeps the dense q/k/v for
            backward instead of their per-branch dilated copies (same gradients; at 16k tiles without
            checkpointing 16 % lower peak memory and 5 % faster).
        materialize_padding: compute a short last segment's zero pad keys explicitly instead of folding them in
            analytically. Both give upstream's outputs; only the former gives upstream's gradients, so the
            default is "whenever autograd records".
        max_call_elements: split a branch into kernel calls of about this many q elements (whole segments);
            ``None`` = one call per branch. Small calls keep every temporary small and reusable.
        workspace: dict for reusing the merge buffers across calls (inference).
    """
    groups, length, heads, head_dim = q.shape
    records = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if materialize_padding is None:
        materialize_padding = records
    regather = records and q.device.type == "cpu" and _fused_allowed(q, backend)
    # Layout of every branch: (ratio, seg, seg_r, whole segments, tail tokens, segments per kernel call);
    # total = rows of the merge buffers (the concatenated padded segments).
    layout, total = [], length
    for sl, ratio in zip(segment_length, dilated_ratio):
        seg = min(sl, length)
        seg_r = _ceil_to(seg, ratio)
        n_full, tail = divmod(length, seg)
        if tail and materialize_padding:  # upstream: the sequence is zero-padded to whole segments
            n_full, tail = n_full + 1, 0
        per_segment = groups * seg_r * heads * head_dim
        step = n_full if max_call_elements is None else max(1, min(n_full, max_call_elements // per_segment))
        layout.append((ratio, seg, seg_r, n_full, tail, step))
        total = max(total, n_full * seg_r + _ceil_to(tail, ratio))
    padded = max(n * s for _, s, _, n, _, _ in layout)
    if padded > length:  # only when padding is materialised
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, padded - length)) for t in (q, k, v))

    hp = max(_ceil_to(heads, r) for r in dilated_ratio)
    online = workspace is not None
    acc = _buffer(workspace, "acc", q, (groups, total, hp, head_dim), torch.float32, 0.0) if online else None
    run_max = _buffer(workspace, "max", q, (groups, total, hp, 1), torch.float32, float("-inf"))
    run_sum = _buffer(workspace, "sum", q, (groups, total, hp, 1), torch.float32, 0.0)
    scratch_numel = (
        groups
        * heads
        * head_dim
        * max(max(step * seg_r, _ceil_to(tail, ratio)) for ratio, seg, seg_r, _, tail, step in layout)
    )
    scratch = [_scratch(workspace, f"dilate{i}", scratch_numel, q) for i in range(3)]
    pieces: list[tuple[Tensor, Tensor, tuple[int, int, int, int]]] = []

    def merge(out: Tensor, lse: Tensor, start: int, m: int, seg_r: int, ratio: int) -> None:
        """Running max / sum of exp(lse) per (position, head); online: also the running weighted sum."""
        lse = lse.masked_fill(lse == 0, UNCOVERED_LSE)  # upstream quirk: an lse of exactly 0 counts as absent
        with torch.no_grad():
            m_reg = _region(run_max, start, m, seg_r, ratio, heads)  # [G, m, l, g, 1, r]
            s_reg = _region(run_sum, start, m, seg_r, ratio, heads)
            lse_r = _to_region(lse.unsqueeze(-1), groups, ratio)
            new_max = torch.maximum(m_reg, lse_r)
            old_scale, new_scale = torch.exp(m_reg - new_max), torch.exp(lse_r - new_max)
            s_reg.mul_(old_scale).add_(new_scale)
            m_reg.copy_(new_max)
            if online:  # kernel outputs are ours to scale in place (no autograd here)
                out_r = _to_region(out, groups, ratio)
                scaled = out_r.mul_(new_scale) if out.dtype == torch.float32 else out_r.float() * new_scale
                _region(acc, start, m, seg_r, ratio, heads).mul_(old_scale).add_(scaled)
        if not online:
            pieces.append((out, lse, (start, m, seg_r, ratio)))

    def attend(*qkv: Tensor) -> tuple[Tensor, Tensor]:
        return attention_with_lse(*qkv, backend=backend)

    for ratio, seg, seg_r, n_full, tail, step in layout:
        for first in range(0, n_full, step):
            m = min(step, n_full - first)
            dense = [_rows(t, first * seg, (first + m) * seg) for t in (q, k, v)]  # [G, m*seg, H, d]
            result = None
            if regather:
                result = _try_fused(q, backend, lambda: _RegatheredCpuAttention.apply(seg, ratio, *dense))
                regather = result is not None  # no fused kernel for this dtype: the plain path from now on
            if result is None:
                result = attend(*(_dilate(t, seg, ratio, buf) for t, buf in zip(dense, scratch)))
            out, lse = result
            merge(out, lse, first * seg_r, m, seg_r, ratio)
        if tail:
            # Short last segment: upstream zero-pads it to seg_r, i.e. (seg_r - tail_r) / r extra keys per head
            # group with logit 0 and value 0; fold them in analytically instead of computing them.
            tail_r = _ceil_to(tail, ratio)
            out, lse = attend(
                *(_dilate(_rows(t, n_full * seg, length), tail, ratio, buf) for t, buf in zip((q, k, v), scratch))
            )
            extra = (seg_r - tail_r) // ratio
            if extra:
                lse_new = torch.logaddexp(lse, torch.full_like(lse, math.log(extra)))
                out = out * torch.exp(lse - lse_new).to(out.dtype).unsqueeze(-1)
                lse = lse_new
            merge(out, lse, n_full * seg_r, 1, tail_r, ratio)

    run_sum.masked_fill_(run_sum == 0, 1.0)  # uncovered (position, head) pairs get 0, as upstream
    if online:
        acc = acc.div_(run_sum)
        return (acc[:, :length, :heads] if total > length or hp > heads else acc).to(q.dtype)
    weighted = []
    for out, lse, (start, m, seg_r, ratio) in pieces:
        with torch.no_grad():
            m_reg, s_reg = (_from_region(_region(t, start, m, seg_r, ratio, heads), heads) for t in (run_max, run_sum))
            weight = torch.exp(lse.unsqueeze(-1) - m_reg) / s_reg  # [G*m, H, l, 1], upstream's merge weight
        weighted.append(out * weight.to(out.dtype))
    shape = (groups, total, hp, head_dim, length, heads)
    return _ScatterPieces.apply(shape, [place for _, _, place in pieces], *weighted).to(q.dtype)


class _RegatheredCpuAttention(torch.autograd.Function):
    """One kernel call of a dilated branch on CPU with the fused kernel, for training.

    Autograd would keep the branch's dilated copies of q/k/v ``[G*m, H, l, d]`` (gathered, zero-padded; ``1/r`` of
    q/k/v each) until backward, on top of the dense q/k/v the layer keeps anyway. Here backward gathers them again
    from the dense q/k/v (a cheap copy, no attention recomputation) and scatters the kernel's gradients back through
    the gather's own autograd graph, so the gradients are exactly those of the plain path.
    """

    @staticmethod
    def forward(ctx, seg: int, ratio: int, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(_dilate(t, seg, ratio) for t in (q, k, v))
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.seg, ctx.ratio = seg, ratio
        lse = lse.float()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_lse: Tensor | None):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.enable_grad():
            dense = [t.detach().requires_grad_(needs) for t, needs in zip((q, k, v), ctx.needs_input_grad[2:])]
            gathered = [_dilate(t, ctx.seg, ctx.ratio) for t in dense]
        kernel_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, *(t.detach() for t in gathered), out, lse, 0.0, False
        )
        wanted = [i for i, t in enumerate(dense) if t.requires_grad]
        grads = (
            torch.autograd.grad(
                [gathered[i] for i in wanted], [dense[i] for i in wanted], [kernel_grads[i] for i in wanted]
            )
            if wanted
            else ()
        )
        result: list[Tensor | None] = [None, None, None]
        for i, grad in zip(wanted, grads):
            result[i] = grad
        return (None, None, *result)


class _ScatterPieces(torch.autograd.Function):
    """Sum of weighted sparse pieces in the dense layout ``[G, L, H, d]`` (fp32). Each (position, head) of a piece is
    written once, so the gradient of a piece is a gather of the output gradient (no full-size copies per piece,
    unlike in-place writes into views under autograd)."""

    @staticmethod
    def forward(ctx, shape: tuple[int, ...], places: list[tuple[int, int, int, int]], *pieces: Tensor) -> Tensor:
        groups, total, hp, head_dim, length, heads = shape
        acc = pieces[0].new_zeros((groups, total, hp, head_dim), dtype=torch.float32)
        for (start, m, seg_r, ratio), piece in zip(places, pieces):
            _region(acc, start, m, seg_r, ratio, heads).add_(_to_region(piece, groups, ratio))
        ctx.shape, ctx.places, ctx.dtypes = shape, places, [p.dtype for p in pieces]
        return acc[:, :length, :heads]

    @staticmethod
    def backward(ctx, grad: Tensor):
        groups, total, hp, head_dim, length, heads = ctx.shape
        grad = F.pad(grad.float(), (0, 0, 0, hp - heads, 0, total - length))  # [G, total, Hp, d]
        grads = [
            _from_region(_region(grad, start, m, seg_r, ratio, heads), heads).to(dtype)
            for (start, m, seg_r, ratio), dtype in zip(ctx.places, ctx.dtypes)
        ]
        return (None, None, *grads)


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    """``x[:, start:stop]`` without a slice node when it is all of ``x`` (a slice's backward allocates a full
    zero gradient)."""
    return x if start == 0 and stop == x.shape[1] else x[:, start:stop]


def _length_groups(lengths: list[int]) -> list[tuple[int, list[int]]]:
    """Batch rows grouped by their number of real tokens, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        groups.setdefault(int(n), []).append(row)
    return list(groups.items())


class DilatedSelfAttention(nn.Module):
    """torchscale ``DilatedAttention`` with Sub-LN: q/k/v projections, dilated attention, ``inner_attn_ln``,
    ``out_proj``. Parameter names match upstream (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``inner_attn_ln``).

    ``forward`` = ``project_out(attend(project_qkv(x)))``; the three steps are public so a layer can run the
    token-wise ones in chunks at inference.
    """

    # q elements per kernel call at inference (4 MiB in fp32): keeps every temporary small and reusable.
    inference_call_elements = 1 << 20

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        segment_length: list[int],
        dilated_ratio: list[int],
        layer_norm_eps: float = 1e-5,
        backend: str = "auto",
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.segment_length = list(segment_length)
        self.dilated_ratio = list(dilated_ratio)
        self.backend = backend
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.inner_attn_ln = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def project_qkv(self, x: Tensor) -> Tensor:
        """``[..., D]`` → ``[..., 3D]`` (q | k | v), one GEMM."""
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # [3D, D]
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        return F.linear(x, weight, bias)

    def project_out(self, attn: Tensor) -> Tensor:
        """Sub-LN then output projection: ``out_proj(inner_attn_ln(attn))``, ``[..., D]``."""
        return self.out_proj(self.inner_attn_ln(attn))

    def attend(
        self, qkv: Tensor, lengths: list[int], output_cls_attention: bool = False, workspace: dict | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Dilated attention of ``qkv [B, Lmax, 3D]``, slide ``b``'s real tokens at ``[:lengths[b]]`` (CLS first).

        Returns ``(attn [B, Lmax, D], cls_attention [B, H, Lmax] | None, keys [B, Lmax, D] | None)``: ``attn`` is
        zero on batch padding (before ``inner_attn_ln``), which never reaches a real token; with a ``workspace``
        it may be a view of a reused buffer, valid until the next call. ``cls_attention`` is
        ``softmax(q_cls · k_j / sqrt(d))`` over the slide's real tokens (full sequence, not dilated), fp32.
        """
        batch, max_len, dim3 = qkv.shape
        dim = dim3 // 3
        shape = (batch, max_len, self.num_heads, self.head_dim)
        q, k, v = qkv.view(batch, max_len, 3, self.num_heads, self.head_dim).unbind(2)  # [B, Lmax, H, d] views

        def run(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
            return dilated_attention(
                a,
                b,
                c,
                self.segment_length,
                self.dilated_ratio,
                self.backend,
                max_call_elements=self.inference_call_elements if workspace is not None else None,
                workspace=workspace,
            )

        groups = _length_groups(lengths)
        if len(groups) == 1 and groups[0][0] == max_len:
            attn = run(q, k, v)  # [B, L, H, d]
        else:
            attn = q.new_zeros(shape)
            for length, rows in groups:
                if len(rows) == batch:
                    attn[:, :length] = run(q[:, :length], k[:, :length], v[:, :length])
                else:
                    idx = torch.tensor(rows, device=q.device)
                    attn[idx, :length] = run(q[idx, :length], k[idx, :length], v[idx, :length])
        attn = attn.reshape(batch, max_len, dim)
        if not output_cls_attention:
            return attn, None, None
        return attn, self.cls_attention_from_qk(q[:, 0], k, lengths), k.reshape(batch, max_len, dim)

    def forward(
        self, hidden_states: Tensor, lengths: list[int], output_cls_attention: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``[B, Lmax, D]`` (already ``self_attn_layer_norm``-ed) → ``(out [B, Lmax, D], cls_attention, keys)``."""
        attn, cls_attention, keys = self.attend(self.project_qkv(hidden_states), lengths, output_cls_attention)
        return self.project_out(attn), cls_attention, keys

    def cls_attention_from_qk(self, q_cls: Tensor, k: Tensor, lengths: list[int]) -> Tensor:
        """O(L) CLS row of full (non-dilated) attention: q_cls ``[B, H, d]``, k ``[B, Lmax, H, d]`` → ``[B, H, Lmax]``
        fp32, zero on batch padding."""
        logits = torch.einsum("bhd,blhd->bhl", q_cls.float() * self.head_dim**-0.5, k.float())  # [B, H, Lmax]
        valid = torch.arange(k.shape[1], device=k.device) < torch.tensor(lengths, device=k.device).unsqueeze(1)
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, dim=-1)


__all__ = ["DilatedSelfAttention", "attention_with_lse", "chunked_attention_with_lse", "dilated_attention"]
