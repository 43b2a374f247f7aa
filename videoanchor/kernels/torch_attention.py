"""Exact pure-PyTorch anchored attention with bounded memory, differentiable.

Same semantics as the Triton kernel. Queries are processed in chunks so that the
(chunk, Skv) logits never exceed a fixed budget: a 32k prompt never materialises its full
(B, H, Sq, Skv) logits. Computation is in float32 (float64 inputs stay float64).

When an input requires grad, a custom autograd function runs the same chunked forward
and, in backward, recomputes each chunk's probabilities (FlashAttention style): nothing of
size (Sq, Skv) is saved for backward either, and backward stays within a few chunk budgets.
"""

from __future__ import annotations

import torch

# Bytes allowed for one chunk's logits (turned into probabilities in place).
_CHUNK_BUDGET_BYTES = 64 * 1024 * 1024


class _Prepared:
    """Shared forward/backward state: upcast K^T, scaled and masked V, broadcast masks."""

    def __init__(
        self, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
        causal, sm_scale, chunk_budget_bytes, backward=False,
    ):  # fmt: skip
        B, Hq, Sq, D = q.shape
        Hkv, Skv = k.shape[1], k.shape[2]
        self.B, self.Hq, self.Sq, self.D, self.Hkv, self.Skv = B, Hq, Sq, D, Hkv, Skv
        self.group = Hq // Hkv
        self.acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.device = q.device
        self.causal, self.sm_scale = causal, sm_scale
        acc = self.acc
        # K^T [B, Hkv, D, Skv] and scaled V [B, Hkv, Skv, D]; the query heads of a group
        # are stacked along the rows, so K and V are never repeated per query head.
        k = k.to(acc)
        v_r = v.to(acc)
        v_s = v_r
        if value_scale is not None:
            v_s = v_s * value_scale.to(acc)[:, None, :, None]
        self.bias = None if key_bias is None else key_bias.to(acc)[:, None, None, None, :]
        self.pad = None if key_padding_mask is None else key_padding_mask[:, None, None, None, :]
        # Per-sample valid key count (B, 1, 1, 1, 1); the causal diagonal follows it.
        self.n_valid = None if cache_seqlens is None else cache_seqlens.view(B, 1, 1, 1, 1)
        # Hidden keys (padding, slots past a sample's cache length) must not reach the
        # output whatever their values hold (0 * NaN would).
        readable = key_padding_mask
        if cache_seqlens is not None:
            in_cache = torch.arange(Skv, device=q.device)[None, :] < cache_seqlens[:, None]
            readable = in_cache if readable is None else readable & in_cache
        self.readable = readable
        if readable is not None:
            v_s = torch.where(readable[:, None, :, None], v_s, 0)
            if backward:
                # Backward multiplies K and V by zero weights there (dq, d value_scale).
                k, v_r = (torch.where(readable[:, None, :, None], t, 0) for t in (k, v_r))
        self.k, self.k_t = k, k.transpose(-1, -2)
        self.v_s, self.v_r = v_s, v_r
        # attn_mask as a (B, Hkv, G, Sq, Skv) view (broadcast dims have stride 0).
        self.mask_bool = self.mask_add = None
        if attn_mask is not None:
            m = attn_mask.expand(B, Hq, Sq, Skv).unflatten(1, (Hkv, self.group))
            if attn_mask.dtype == torch.bool:
                self.mask_bool = m
            else:
                self.mask_add = m
        bytes_per_row = max(1, B * Hq * Skv * torch.finfo(acc).bits // 8)
        chunk = max(1, min(Sq, chunk_budget_bytes // bytes_per_row))
        if causal:
            # Smaller chunks let each one stop at its causal horizon (about half the work).
            chunk = min(chunk, max(64, -(-Sq // 8)))
        self.chunk = chunk

    def chunks(self):
        """Yields ``(i0, i1, n_kv)``: query rows [i0, i1) see at most keys [0, n_kv)."""
        Sq, Skv = self.Sq, self.Skv
        for i0 in range(0, Sq, self.chunk):
            i1 = min(Sq, i0 + self.chunk)
            # Keys past the last row's causal horizon are invisible to the whole chunk.
            exact = self.causal and self.n_valid is None
            yield i0, i1, (max(0, min(Skv, i1 + Skv - Sq)) if exact else Skv)

    def probs(self, q_g, i0, i1, n_kv):
        """Chunk queries (B, Hkv, rows, D) and unnormalised probabilities
        (B, Hkv, G, rows, n_kv) with their row max and row sum."""
        B, Hkv, group, D = self.B, self.Hkv, self.group, self.D
        rows_c = group * (i1 - i0)
        q_c = q_g[:, :, :, i0:i1].to(self.acc).reshape(B, Hkv, rows_c, D)
        logits = torch.matmul(q_c, self.k_t[..., :n_kv]).view(B, Hkv, group, i1 - i0, n_kv)
        logits.mul_(self.sm_scale)
        if self.bias is not None:
            logits.add_(self.bias[..., :n_kv])
        if self.mask_add is not None:
            logits.add_(self.mask_add[:, :, :, i0:i1, :n_kv])
        hidden = None
        cols = torch.arange(n_kv, device=self.device)
        if self.n_valid is not None:
            hidden = cols >= self.n_valid
        if self.causal:
            rows = torch.arange(i0, i1, device=self.device)[:, None]
            diag = (self.Skv - self.Sq) if self.n_valid is None else (self.n_valid - self.Sq)
            after = cols[None, :] > rows + diag
            hidden = after if hidden is None else hidden | after
        if self.pad is not None:
            pad = ~self.pad[..., :n_kv]
            hidden = pad if hidden is None else hidden | pad
        if self.mask_bool is not None:
            blocked = ~self.mask_bool[:, :, :, i0:i1, :n_kv]
            hidden = blocked if hidden is None else hidden | blocked
        if hidden is not None:
            logits.masked_fill_(hidden, float("-inf"))
        row_max = logits.amax(dim=-1, keepdim=True)
        # A row with no visible key keeps -inf logits: subtract 0, never -inf - -inf.
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        probs = logits.sub_(row_max).exp_()
        return q_c, probs, row_max, probs.sum(dim=-1, keepdim=True)


def _forward(prep: _Prepared, q: torch.Tensor, out_dtype: torch.dtype):
    B, Hq, Sq, D, Hkv, group = prep.B, prep.Hq, prep.Sq, prep.D, prep.Hkv, prep.group
    out = torch.empty(B, Sq, Hq, D, dtype=out_dtype, device=prep.device).transpose(1, 2)
    lse = torch.empty(B, Hq, Sq, dtype=prep.acc, device=prep.device)
    if Sq == 0:
        return out, lse
    if prep.Skv == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q_g = q.unflatten(1, (Hkv, group))  # [B, Hkv, G, Sq, D], a view
    out_g = out.unflatten(1, (Hkv, group))
    lse_g = lse.unflatten(1, (Hkv, group))
    for i0, i1, n_kv in prep.chunks():
        if n_kv == 0:
            out_g[:, :, :, i0:i1] = 0
            lse_g[:, :, :, i0:i1] = float("-inf")
            continue
        _, probs, row_max, denom = prep.probs(q_g, i0, i1, n_kv)
        rows_c = group * (i1 - i0)
        o = torch.matmul(probs.view(B, Hkv, rows_c, n_kv), prep.v_s[:, :, :n_kv])
        o = o.view(B, Hkv, group, i1 - i0, D) / torch.where(denom > 0, denom, 1.0)
        out_g[:, :, :, i0:i1] = o.to(out_dtype)
        lse_g[:, :, :, i0:i1] = (row_max + torch.log(denom)).squeeze(-1)
    return out, lse


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sums ``g`` over the dims where ``shape`` broadcasts (size 1), keeping them."""
    dims = [d for d, n in enumerate(shape) if n == 1 and g.shape[d] != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g


class _AnchoredAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
        causal, sm_scale, chunk_budget_bytes,
    ):  # fmt: skip
        prep = _Prepared(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
            causal, sm_scale, chunk_budget_bytes,
        )  # fmt: skip
        out, lse = _forward(prep, q, q.dtype)
        ctx.save_for_backward(q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens,
                              attn_mask)  # fmt: skip
        ctx.args = (causal, sm_scale, chunk_budget_bytes)
        ctx.set_materialize_grads(False)
        return out, lse.to(_lse_dtype(q))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask = (
            ctx.saved_tensors
        )
        causal, sm_scale, budget = ctx.args
        need = ctx.needs_input_grad
        grads = [None] * 11
        if grad_out is None and grad_lse is None:
            return tuple(grads)
        # The backward holds about four chunk-sized tensors: halve the chunk.
        prep = _Prepared(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
            causal, sm_scale, max(1, budget // 2), backward=True,
        )  # fmt: skip
        B, Hq, Sq, D = q.shape
        Hkv, Skv, group = prep.Hkv, prep.Skv, prep.group
        acc = prep.acc
        dq = torch.zeros(B, Hkv, group, Sq, D, dtype=acc, device=q.device)
        dk = torch.zeros(B, Hkv, Skv, D, dtype=acc, device=q.device)
        dv_s = torch.zeros(B, Hkv, Skv, D, dtype=acc, device=q.device)
        dbias = torch.zeros(B, Skv, dtype=acc, device=q.device)
        mask_grad = attn_mask is not None and need[7]
        if mask_grad:
            m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
            dmask = torch.zeros(m4.shape, dtype=acc, device=q.device)
        q_g = q.unflatten(1, (Hkv, group))
        go_g = None if grad_out is None else grad_out.unflatten(1, (Hkv, group))
        gl_g = None if grad_lse is None else grad_lse.unflatten(1, (Hkv, group))
        for i0, i1, n_kv in prep.chunks():
            if n_kv == 0 or Skv == 0:
                continue
            c, rows_c = i1 - i0, group * (i1 - i0)
            q_c, probs, _, denom = prep.probs(q_g, i0, i1, n_kv)
            p = probs.div_(torch.where(denom > 0, denom, 1.0))  # [B, Hkv, G, c, n]
            p_r = p.view(B, Hkv, rows_c, n_kv)
            if go_g is not None:
                go_c = go_g[:, :, :, i0:i1].to(acc).reshape(B, Hkv, rows_c, D)
                dp = torch.matmul(go_c, prep.v_s[:, :, :n_kv].transpose(-1, -2))
                dp = dp.view(B, Hkv, group, c, n_kv)
                dv_s[:, :, :n_kv] += torch.matmul(p_r.transpose(-1, -2), go_c)
                # delta_i = sum_j p_ij dp_ij (= dO_i . O_i, here exact)
                delta = (p * dp).sum(dim=-1, keepdim=True)
            else:
                dp = torch.zeros_like(p)
                delta = torch.zeros_like(denom)
            if gl_g is not None:
                # d lse_i / d logit_ij = p_ij
                delta = delta - gl_g[:, :, :, i0:i1, None].to(acc)
            ds = dp.sub_(delta).mul_(p)  # d loss / d logit, [B, Hkv, G, c, n]
            ds_r = ds.view(B, Hkv, rows_c, n_kv)
            dq[:, :, :, i0:i1] = (torch.matmul(ds_r, prep.k[:, :, :n_kv]) * sm_scale).view(
                B, Hkv, group, c, D
            )
            dk[:, :, :n_kv] += torch.matmul(ds_r.transpose(-1, -2), q_c) * sm_scale
            if key_bias is not None and need[3]:
                dbias[:, :n_kv] += ds.sum(dim=(1, 2, 3))
            if mask_grad:
                g = _sum_to(ds.reshape(B, Hq, c, n_kv), m4.shape)
                rows = slice(i0, i1) if m4.shape[2] != 1 else slice(None)
                cols = slice(0, n_kv) if m4.shape[3] != 1 else slice(None)
                dmask[:, :, rows, cols] += g
        if need[0]:
            grads[0] = dq.view(B, Hq, Sq, D).to(q.dtype)
        if need[1]:
            grads[1] = dk.to(k.dtype)
        if need[2] or (value_scale is not None and need[4]):
            if prep.readable is not None:
                dv_s = torch.where(prep.readable[:, None, :, None], dv_s, 0)
            if need[2]:
                dv = dv_s
                if value_scale is not None:
                    dv = dv_s * value_scale.to(acc)[:, None, :, None]
                    if prep.readable is not None:  # a hidden key's scale may hold NaN
                        dv = torch.where(prep.readable[:, None, :, None], dv, 0)
                grads[2] = dv.to(v.dtype)
            if value_scale is not None and need[4]:
                grads[4] = (dv_s * prep.v_r).sum(dim=(1, 3)).to(value_scale.dtype)
        if key_bias is not None and need[3]:
            grads[3] = dbias.to(key_bias.dtype)
        if mask_grad:
            grads[7] = dmask.view(attn_mask.shape).to(attn_mask.dtype)
        return tuple(grads)


def _fused_available(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"
    )


def _fused_forward(q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal,
                   sm_scale, chunk_budget_bytes):  # fmt: skip
    """The forward through PyTorch's fused CPU attention kernel (the one SDPA runs on a CPU,
    which also returns the logsumexp): the key bias is a broadcast additive mask
    (B, 1, 1, Skv), V is pre-scaled, hidden keys get -inf. Causal attention with
    ``Sq == Skv`` uses the kernel's own causal mask; ``Sq == 1`` (decode) needs none (the
    causal diagonal is the last key); other causal shapes (a query chunk after a cache, or
    per-sample cache lengths) go by query blocks, each with its own (B, 1, rows, Skv) mask
    within ``chunk_budget_bytes``. Memory stays O(S): the kernel tiles the logits."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev, out_dtype = q.device, q.dtype
    readable = key_padding_mask
    if cache_seqlens is not None:
        in_cache = torch.arange(Skv, device=dev)[None, :] < cache_seqlens[:, None]
        readable = in_cache if readable is None else readable & in_cache
    k, v = k.to(acc), v.to(acc)
    if value_scale is not None:
        v = v * value_scale.to(acc)[:, None, :, None]
    bias = torch.zeros(B, Skv, dtype=acc, device=dev) if key_bias is None else key_bias.to(acc)
    if readable is not None:
        # a hidden key reaches neither the logits nor the output, whatever it holds (NaN)
        keep = readable[:, None, :, None]
        k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
        bias = bias.masked_fill(~readable, float("-inf"))
    q = q.to(acc)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if causal and Sq == 1:  # the one query sees every key up to the (per-sample) cache end
        causal = False
    if not causal:
        # the query heads of a group share K and V: stack them along the rows
        q_r = q.reshape(B, Hkv, group * Sq, D)
        out, lse = op(q_r, k, v, attn_mask=bias[:, None, None, :], scale=sm_scale)
        out, lse = out.reshape(B, Hq, Sq, D), lse.reshape(B, Hq, Sq)
        visible = None if readable is None else readable.any(dim=-1)[:, None, None]
    else:
        if Sq == Skv and cache_seqlens is None:
            # each KV head with its query heads as one batch entry: K and V broadcast over
            # the group (stride 0), never copied per query head
            shape = (B * Hkv, group, Sq, D)
            k_g, v_g = (t.reshape(B * Hkv, 1, Skv, D).expand(shape) for t in (k, v))
            mask = bias.repeat_interleave(Hkv, dim=0)[:, None, None, :]
            out, lse = op(q.reshape(shape), k_g, v_g, is_causal=True, attn_mask=mask,
                          scale=sm_scale)  # fmt: skip
            out, lse = out.reshape(B, Hq, Sq, D), lse.reshape(B, Hq, Sq)
            visible = None
            if readable is not None:  # row i sees a key iff the first readable one is <= i
                first = torch.where(readable.any(-1), readable.int().argmax(-1), Skv)
                visible = torch.arange(Sq, device=dev)[None, :] >= first[:, None]
                visible = visible[:, None, :]
        else:
            if group > 1:
                k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
            n_valid = torch.full((B,), Skv, device=dev) if cache_seqlens is None else cache_seqlens
            diag = (n_valid - Sq).view(B, 1, 1)  # row i sees keys j <= i + diag
            out = torch.empty(B, Hq, Sq, D, dtype=acc, device=dev)
            lse = torch.empty(B, Hq, Sq, dtype=acc, device=dev)
            vis_rows = torch.empty(B, 1, Sq, dtype=torch.bool, device=dev)
            # one (B, rows, Skv) mask per query block, within the chunk budget
            row_bytes = B * Skv * torch.finfo(acc).bits // 8
            rows = max(1, min(Sq, chunk_budget_bytes // max(1, row_bytes)))
            cols = torch.arange(Skv, device=dev)
            for i0 in range(0, Sq, rows):
                i1 = min(Sq, i0 + rows)
                r = torch.arange(i0, i1, device=dev)[None, :, None]
                hide = cols[None, None, :] > r + diag  # (B, rows, Skv)
                mask = bias[:, None, :].masked_fill(hide, float("-inf"))
                o, l = op(q[:, :, i0:i1], k, v, attn_mask=mask[:, None], scale=sm_scale)
                out[:, :, i0:i1], lse[:, :, i0:i1] = o, l
                vis_rows[:, 0, i0:i1] = torch.isfinite(mask).any(-1)
            visible = vis_rows
    if visible is not None:
        lse = torch.where(visible, lse, float("-inf"))
        out = torch.where(visible[..., None], out, 0)
    # the layout of the chunked form's output: (B, Sq, Hq, D) memory, seen as (B, Hq, Sq, D)
    final = torch.empty(B, Sq, Hq, D, dtype=out_dtype, device=dev).transpose(1, 2)
    return final.copy_(out), lse


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
    attn_mask: torch.Tensor | None = None,
    chunk_budget_bytes: int = _CHUNK_BUDGET_BYTES,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``: out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) float32
    (float64 for float64 inputs).

    ``attn_mask`` (broadcastable to (B, Hq, Sq, Skv)) is added to the logits after the
    key bias (float) or hides the keys where it is False (bool), on top of the other masks.
    Differentiable in q, k, v, key_bias, value_scale and a floating attn_mask (and through
    both outputs). Inputs are assumed validated by :func:`videoanchor.anchored_attention`.

    ``fused``: the forward without gradients through PyTorch's fused CPU attention kernel
    (:func:`_fused_forward`; several times faster than the query chunks here on a CPU).
    None (default): on CPU tensors without ``attn_mask``; False: the query chunks always.
    With gradients the chunked autograd function runs either way.
    """
    tensors = (q, k, v, key_bias, value_scale, attn_mask)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _AnchoredAttentionFn.apply(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
            causal, sm_scale, chunk_budget_bytes,
        )  # fmt: skip
    if fused is None:
        fused = _fused_available(q) and attn_mask is None and min(q.shape[2], k.shape[2]) > 0
    if fused:
        out, lse = _fused_forward(
            q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, causal, sm_scale,
            chunk_budget_bytes,
        )  # fmt: skip
        return out, lse.to(_lse_dtype(q))
    prep = _Prepared(
        q, k, v, key_bias, value_scale, key_padding_mask, cache_seqlens, attn_mask,
        causal, sm_scale, chunk_budget_bytes,
    )  # fmt: skip
    out, lse = _forward(prep, q, q.dtype)
    return out, lse.to(_lse_dtype(q))
