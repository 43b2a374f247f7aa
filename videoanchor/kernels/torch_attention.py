"""Exact pure-PyTorch anchored attention with bounded memory.

Same semantics as the Triton kernel. Queries are processed in chunks so that the
(chunk, Skv) logits never exceed a fixed budget: a 32k prompt never materialises its full
(B, H, Sq, Skv) logits. Computation is in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch

# Bytes allowed for one chunk's logits (turned into probabilities in place).
_CHUNK_BUDGET_BYTES = 64 * 1024 * 1024


def anchored_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    *,
    causal: bool,
    sm_scale: float,
    key_padding_mask: torch.Tensor | None,
    cache_seqlens: torch.Tensor | None = None,
    chunk_budget_bytes: int = _CHUNK_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``: out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) float32.

    Inputs are assumed validated by :func:`videoanchor.anchored_attention`.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device

    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=device).transpose(1, 2)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=device)
    if Sq == 0:
        return out, lse
    if Skv == 0:
        return out.zero_(), lse.fill_(float("-inf"))

    # K^T [B, Hkv, D, Skv] and scaled V [B, Hkv, Skv, D]; the query heads of a group are
    # stacked along the rows, so K and V are never repeated per query head.
    k_t = k.to(acc_dtype).transpose(-1, -2)
    v_s = v.to(acc_dtype)
    if value_scale is not None:
        v_s = v_s * value_scale.to(acc_dtype)[:, None, :, None]
    bias = None if key_bias is None else key_bias.to(acc_dtype)[:, None, None, None, :]
    pad = None if key_padding_mask is None else key_padding_mask[:, None, None, None, :]
    # Per-sample valid key count (B, 1, 1, 1, 1); the causal diagonal follows it.
    n_valid = None if cache_seqlens is None else cache_seqlens.view(B, 1, 1, 1, 1)
    # Hidden keys (padding, slots past a sample's cache length) must not reach the output
    # whatever their values hold (0 * NaN would).
    readable = key_padding_mask
    if n_valid is not None:
        in_cache = torch.arange(Skv, device=device)[None, :] < cache_seqlens[:, None]
        readable = in_cache if readable is None else readable & in_cache
    if readable is not None:
        v_s = torch.where(readable[:, None, :, None], v_s, 0)

    q_g = q.unflatten(1, (Hkv, group))  # [B, Hkv, G, Sq, D], a view
    out_g = out.unflatten(1, (Hkv, group))
    lse_g = lse.unflatten(1, (Hkv, group))
    bytes_per_row = max(1, B * Hq * Skv * torch.finfo(acc_dtype).bits // 8)
    chunk = max(1, min(Sq, chunk_budget_bytes // bytes_per_row))
    if causal:
        # Smaller chunks let each one stop at its causal horizon (about half the work).
        chunk = min(chunk, max(64, -(-Sq // 8)))
    for i0 in range(0, Sq, chunk):
        i1 = min(Sq, i0 + chunk)
        # Keys past the last row's causal horizon are invisible to the whole chunk.
        n_kv = max(0, min(Skv, i1 + Skv - Sq)) if causal and n_valid is None else Skv
        if n_kv == 0:
            out_g[:, :, :, i0:i1] = 0
            lse_g[:, :, :, i0:i1] = float("-inf")
            continue
        rows_c = group * (i1 - i0)
        q_c = q_g[:, :, :, i0:i1].to(acc_dtype).reshape(B, Hkv, rows_c, D)
        logits = torch.matmul(q_c, k_t[..., :n_kv]).view(B, Hkv, group, i1 - i0, n_kv)
        logits.mul_(sm_scale)
        if bias is not None:
            logits.add_(bias[..., :n_kv])
        hidden = None
        cols = torch.arange(n_kv, device=device)
        if n_valid is not None:
            hidden = cols >= n_valid
        if causal:
            rows = torch.arange(i0, i1, device=device)[:, None]
            diag = (Skv - Sq) if n_valid is None else (n_valid - Sq)
            after = cols[None, :] > rows + diag
            hidden = after if hidden is None else hidden | after
        if pad is not None:
            hidden = ~pad[..., :n_kv] if hidden is None else hidden | ~pad[..., :n_kv]
        if hidden is not None:
            logits.masked_fill_(hidden, float("-inf"))
        row_max = logits.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        probs = logits.sub_(row_max).exp_()
        denom = probs.sum(dim=-1, keepdim=True)
        o = torch.matmul(probs.view(B, Hkv, rows_c, n_kv), v_s[:, :, :n_kv])
        o = o.view(B, Hkv, group, i1 - i0, D) / torch.where(denom > 0, denom, 1.0)
        out_g[:, :, :, i0:i1] = o.to(q.dtype)
        lse_g[:, :, :, i0:i1] = (row_max + torch.log(denom)).squeeze(-1).to(torch.float32)
    return out, lse
