"""Windowed (local) attention without unfolding: O(H·W·m²·C) time and O(H·W·(m² + C)) memory.

The m×m window is visited through m² shifted views of the zero-padded keys and values — no
unfold, no (HW)² tensor, no Python loop over pixels. A custom autograd function keeps only q, k,
v and the (N, m², H, W) attention for backward and accumulates the key/value gradients in place
(autograd's own backward of m² slices would allocate a padded gradient per offset). On the CPU
the loops run over blocks of the batch small enough to stay in a core's L2 cache while the m²
offsets pass over them (1.6× faster at the papers' 256² top skip, fp32); on a GPU over the
whole batch.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


@functools.lru_cache(maxsize=64)
def window_mask(height: int, width: int, m: int, device=None) -> torch.Tensor:
    """(m², H, W) bool: True where offset j of pixel (h, w) lies inside the image (cached)."""
    r = m // 2
    ones = F.pad(torch.ones(1, 1, height, width, device=device), (r, r, r, r))
    return torch.stack([ones[0, 0, dy:dy + height, dx:dx + width]
                        for dy in range(m) for dx in range(m)]).bool()


def _offsets(m: int):
    return [(j, dy, dx) for j, (dy, dx) in enumerate((dy, dx) for dy in range(m) for dx in range(m))]


def _attention(q, k, m):
    """softmax over the window of q·k_j: (N, m², H, W); out-of-image keys masked out."""
    height, width = q.shape[-2:]
    r = m // 2
    kp = F.pad(k, (r, r, r, r))
    logits = q.new_empty(q.shape[0], m * m, height, width)
    for j, dy, dx in _offsets(m):
        torch.sum(q * kp[:, :, dy:dy + height, dx:dx + width], dim=1, out=logits[:, j])
    valid = window_mask(height, width, m, q.device)
    return logits.masked_fill_(~valid, float("-inf")).softmax(dim=1)


_CPU_BLOCK_BYTES = 2 << 20


def _batch_blocks(v: torch.Tensor) -> list[slice]:
    """The batch slices the m² loops run over: on the CPU as many samples as keep a block of v
    within about 2 MiB (a core's L2 cache: the loops pass over it m² times), the whole batch on
    a GPU (one launch per op)."""
    n = v.shape[0]
    if v.device.type != "cpu":
        return [slice(0, n)]
    per_block = max(1, _CPU_BLOCK_BYTES // (v[0].numel() * v.element_size()))
    return [slice(i, min(n, i + per_block)) for i in range(0, n, per_block)]


def _forward_loops(q, k, v, m, keep_attn):
    """The in-place m² loops over NCHW q, k, v: (out, attention (N, m², H, W) or None).

    Without ``keep_attn`` each block's attention is dropped once it is used (inference)."""
    height, width = q.shape[-2:]
    r = m // 2
    out, kept = torch.zeros_like(v), []
    for b in _batch_blocks(v):
        a = _attention(q[b], k[b], m)
        if keep_attn:
            kept.append(a)
        vp, out_b = F.pad(v[b], (r, r, r, r)), out[b]
        for j, dy, dx in _offsets(m):
            out_b.addcmul_(a[:, j:j + 1], vp[:, :, dy:dy + height, dx:dx + width])
    if not keep_attn:
        return out, None
    return out, kept[0] if len(kept) == 1 else torch.cat(kept)  # one block: no copy


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, m):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # NCHW (local_attention)
        out, attn = _forward_loops(q, k, v, m, keep_attn=True)
        ctx.save_for_backward(q, k, v, attn)
        ctx.m = m
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # every tensor of the m² loops in one layout (NCHW); a channels-last one among them
        # would send addcmul_ and sum down their slow strided paths
        grad_out = grad_out.contiguous()
        q, k, v, attn = ctx.saved_tensors
        m = ctx.m
        height, width = q.shape[-2:]
        r = m // 2
        unpad = (slice(None), slice(None), slice(r, r + height), slice(r, r + width))
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)
        for b in _batch_blocks(v):
            a, g_out, q_b, g_q = attn[b], grad_out[b], q[b], grad_q[b]
            kp, vp = F.pad(k[b], (r, r, r, r)), F.pad(v[b], (r, r, r, r))
            grad_vp, grad_kp = torch.zeros_like(vp), torch.zeros_like(kp)
            grad_attn = torch.empty_like(a)
            for j, dy, dx in _offsets(m):
                window = (slice(None), slice(None), slice(dy, dy + height), slice(dx, dx + width))
                torch.sum(g_out * vp[window], dim=1, out=grad_attn[:, j])
                grad_vp[window].addcmul_(a[:, j:j + 1], g_out)
            # softmax backward: g_logits = a ⊙ (g_a − Σ_j a_j g_a_j); masked entries have a = 0
            grad_logits = a * (grad_attn - (a * grad_attn).sum(dim=1, keepdim=True))
            for j, dy, dx in _offsets(m):
                window = (slice(None), slice(None), slice(dy, dy + height), slice(dx, dx + width))
                g = grad_logits[:, j:j + 1]
                g_q.addcmul_(g, kp[window])
                grad_kp[window].addcmul_(g, q_b)
            grad_k[b], grad_v[b] = grad_kp[unpad], grad_vp[unpad]
        return grad_q, grad_k, grad_v, None


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: int) -> torch.Tensor:
    """Y_p = Σ_{o in m×m window of p} softmax_o(q_p · k_{p+o}) v_{p+o}.

    q, k: (N, d, H, W); v: (N, c, H, W) → (N, c, H, W). Out-of-image neighbours are zero-padded
    keys masked out of the softmax (the window's centre is always inside). Training uses the
    custom autograd function, eager inference (no gradient) the same in-place loops without
    keeping the attention; an export trace and torch.compile take the functional form
    :func:`local_attention_functional`, which exporters follow for any input size and the
    compiler differentiates and fuses itself (the loops' in-place ``out=`` writes would break
    the compiled graph). All work in NCHW, as the m² strided loops are slow on mixed layouts:
    channels-last inputs are copied to it, and the output is given back in v's layout (a
    concatenation of mixed layouts downstream is slow too).
    """
    if m % 2 != 1:
        raise ValueError(f"window size m={m} must be odd")
    tracing = (torch.jit.is_tracing() or torch.compiler.is_exporting()
               or torch.compiler.is_compiling())
    if tracing:
        out = local_attention_functional(q, k, v, m)
    elif torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = _LocalAttention.apply(q, k, v, m)
    else:
        out, _ = _forward_loops(q.contiguous(), k.contiguous(), v.contiguous(), m,
                                keep_attn=False)
    if not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def local_attention_functional(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               m: int) -> torch.Tensor:
    """:func:`local_attention` with out-of-place ops and a mask built from the input's shape
    (no cache, no in-place writes): what a trace or export records. Same shapes."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    height, width = q.shape[-2:]
    r = m // 2
    kp, vp = F.pad(k, (r, r, r, r)), F.pad(v, (r, r, r, r))
    inside = F.pad(torch.ones_like(q[:, :1]), (r, r, r, r))
    windows = [(slice(None), slice(None), slice(dy, dy + height), slice(dx, dx + width))
               for dy in range(m) for dx in range(m)]
    logits = torch.stack([(q * kp[w]).sum(1) for w in windows], dim=1)  # (N, m², H, W), NCHW
    valid = torch.stack([inside[w][:, 0] for w in windows], dim=1) > 0
    attn = logits.masked_fill(~valid, float("-inf")).softmax(dim=1)
    return sum(attn[:, j:j + 1] * vp[w] for j, w in enumerate(windows))
