"""Global attention that never keeps an (L_q × L_k) map: fused kernels on GPU, chunks on CPU."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def _dense(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
              chunk: int | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over keys; q (N, L_q, d), k (N, L_k, d), v (N, L_k, c) → (N, L_q, c).

    On CUDA (``chunk=None``) torch's scaled_dot_product_attention picks a memory-efficient /
    flash kernel. Elsewhere, or with an explicit ``chunk``, the queries are processed ``chunk``
    at a time and each chunk is recomputed in backward (activation checkpointing), so memory
    stays O(chunk · L_k) instead of O(L_q · L_k).
    """
    if chunk is None and q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
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
