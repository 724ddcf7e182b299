"""Global attention that never keeps an (L_q × L_k) map: torch's fused kernels, or query chunks."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _dense(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
              chunk: int | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over keys; q (N, L_q, d), k (N, L_k, d), v (N, L_k, c) → (N, L_q, c).

    ``chunk=None``: :func:`fused_attention` (torch's flash / memory-efficient kernels, on CPU
    and GPU; float64 on CUDA, which they do not take, uses 1,024-query chunks). Under an export
    trace: plain SDPA, which ONNX opset ≥ 23 keeps as one Attention node. An explicit
    ``chunk``: the queries are processed ``chunk`` at a time and each chunk is recomputed in
    backward (activation checkpointing), so memory stays O(chunk · L_k) instead of O(L_q · L_k).
    """
    if torch.compiler.is_exporting():  # torch.export / ONNX: the exporter's own lowering
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                              scale=scale)[:, 0]
    if chunk is None and not (q.is_cuda and q.dtype == torch.float64):
        return fused_attention(q, k, v, scale)
    chunk = chunk or 1024
    if q.shape[1] <= chunk:
        if not torch.is_grad_enabled():
            return _dense(q, k, v, scale)
        return checkpoint(_dense, q, k, v, scale, use_reentrant=False)
    outs = []
    for start in range(0, q.shape[1], chunk):
        qc = q[:, start:start + chunk]
        if torch.is_grad_enabled():
            outs.append(checkpoint(_dense, qc, k, v, scale, use_reentrant=False))
        else:
            outs.append(_dense(qc, k, v, scale))
    return torch.cat(outs, dim=1)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """:func:`attention` by torch's fused SDPA kernels only (flash, memory-efficient, cuDNN).

    Those kernels never keep the map, but they take 4-D inputs with one head size that is a
    multiple of 8; anything else would fall back to the math kernel, which materialises
    (L_q × L_k) (137 GB for 256², batch 8). So q, k, v get one head and are zero-padded to a
    common size (and made contiguous: the kernels need a unit last stride): zeros add nothing
    to q·kᵀ, and v's padded columns are dropped. Raises if no
    fused kernel can run rather than fall back.
    """
    c = v.shape[-1]
    size = -(-max(q.shape[-1], c) // 8) * 8
    q, k, v = (F.pad(t, (0, size - t.shape[-1])).contiguous().unsqueeze(1) for t in (q, k, v))
    with sdpa_kernel(FUSED):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.squeeze(1)[..., :c]
