"""Float64 reference for anchored attention: the plain formula of docs/method.md section 4.

It materialises the (B, Hq, Sq, Skv) logits, so it is for tests and benchmarks only.
"""

from __future__ import annotations

import math

import torch


def anchored_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cache_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    attn_mask: torch.Tensor | None = None,
):
    """``softmax(q k^T * sm_scale + key_bias[j] + mask) @ (value_scale[j] * v)`` in float64.

    Shapes as in :func:`videoanchor.anchored_attention`; ``cache_seqlens`` (B,) limits
    sample b to its first ``cache_seqlens[b]`` keys and aligns the causal
    diagonal to it. ``attn_mask`` (broadcastable to (B, Hq, Sq, Skv)) is added to the
    logits (float) or hides keys where False (bool). Rows with no visible key (or
    ``Skv = 0``) give zeros (and an lse of ``-inf``). Differentiable (plain autograd).
    Returns float64 ``out`` of shape (B, Hq, Sq, D), and
    ``lse`` of shape (B, Hq, Sq) (natural log) when ``return_lse``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    if Skv == 0:  # no key at all: every row is empty
        out = q.new_zeros(q.shape, dtype=torch.float64)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64, device=q.device)
        return (out, lse) if return_lse else out
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)

    logits = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if key_bias is not None:
        logits = logits + key_bias.double()[:, None, None, :]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        logits = logits + attn_mask.double()
    visible = torch.ones(B, 1, Sq, Skv, dtype=torch.bool, device=q.device)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Skv, device=q.device)[None, :]
    # Number of valid keys per sample: all of them, or cache_seqlens[b].
    n_valid = torch.full((B,), Skv, device=q.device)
    if cache_seqlens is not None:
        n_valid = cache_seqlens.to(q.device)
    n_valid = n_valid.view(B, 1, 1, 1)
    visible = visible & (j < n_valid)
    if causal:
        visible = visible & (j <= i + n_valid - Sq)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :].bool()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    logits = logits.masked_fill(~visible, float("-inf"))

    row_max = logits.amax(dim=-1, keepdim=True)
    empty = torch.isinf(row_max) & (row_max < 0)
    row_max = torch.where(empty, torch.zeros_like(row_max), row_max)
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    probs = torch.where(empty, torch.zeros_like(p), p / torch.where(empty, 1.0, denom))
    if value_scale is not None:
        v64 = v64 * value_scale.double()[:, None, :, None]
    out = probs @ v64
    if not return_lse:
        return out
    lse = (row_max + torch.log(denom)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("-inf")), lse)
    return out, lse
