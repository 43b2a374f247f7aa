"""The host side of an anchored call on the path the integrations take (issue 51, items 2
and 3, checked without a GPU): with the gates prepared once (``prepare_gates``), a prefill
or decode call reads no tensor value back to the host (on a GPU each read waits for the
stream), runs at most a stated number of torch operators, and launches the same kernels
with the same arguments whatever the values of its inputs (no branch on device values,
static pointers: what a CUDA graph captures).

The Triton launches are recorded, not run (``launch.capture_launches``): what is counted is
the host work up to the launch. Metadata checks (``cache_seqlens``, ``cu_seqlens``) read
CPU tensors on the host by design; here the tensors take the device branch of
``kernels/checks.py`` (``checks.device_branch``: device assertions, checked once per
tensor), as they do on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import videoanchor
from benchmarks.bench_host_overhead import host_counts
from videoanchor.kernels import anchored_attention, anchored_attention_varlen, prepare_gates
from videoanchor.kernels import checks as kernel_checks
from videoanchor.kernels.gates import value_scale_range_of
from videoanchor.kernels.launch import capture_launches

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, D = 2, 4, 2, 16

#: The most torch operators one call may run, by case: the output (one ``empty_strided``),
#: the split-KV partials (two ``empty``) and the padding mask's uint8 view. The fast form
#: reads the prepared gate pairs: nothing more than the general form.
MAX_OPS = {
    "decode": 3,
    "decode, padding mask": 4,
    "decode, static cache": 4,
    "prefill, fast form": 1,
    "prefill, general form": 1,
    "varlen decode": 3,
    "varlen prefill, fast form": 1,
}


@pytest.fixture(autouse=True)
def _metadata_on_device():
    with kernel_checks.device_branch():
        yield


def _gates(shape, fast):
    kb, vs = videoanchor.anchor_gates(torch.rand(*shape, device=DEV), 9.5, 2.5)
    return prepare_gates(kb, vs, value_scale_range=value_scale_range_of(vs) if fast else None)


@dataclass
class Case:
    call: Callable  # the call with the prepared gates
    given: Callable  # the same call with the gates as given (prepared per call)
    gates: object
    data: list  # the float inputs (queries, keys, values)
    metadata: dict = field(default_factory=dict)  # padding mask, lengths


def _case(name) -> Case:
    if not name.startswith("varlen"):
        sq = 1 if name.startswith("decode") else 40
        skv = 300 if sq == 1 else 40
        q = torch.randn(B, HQ, sq, D, device=DEV)
        k, v = (torch.randn(B, HKV, skv, D, device=DEV) for _ in range(2))
        gates = _gates((B, skv + 57), "fast" in name)  # room to grow, as the integration keeps
        meta = {}
        if "padding" in name or "static" in name:
            meta["key_padding_mask"] = torch.rand(B, skv, device=DEV) > 0.2
        if "static" in name:
            meta["cache_seqlens"] = torch.tensor([skv - 7, skv], dtype=torch.int32, device=DEV)
        kb, vs = gates.natural(skv)
        return Case(
            lambda: anchored_attention(q, k, v, gates=gates, backend="triton", **meta),
            lambda: anchored_attention(q, k, v, kb, vs, backend="triton", **meta,
                                       value_scale_range=gates.value_scale_range),
            gates, [q, k, v], meta,
        )  # fmt: skip
    lengths_q, lengths_k = ([1, 1], [300, 270]) if "decode" in name else ([40, 23], [40, 23])
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0)], dtype=torch.int32, device=DEV)
                  for n in (lengths_q, lengths_k))  # fmt: skip
    q = torch.randn(sum(lengths_q), HQ, D, device=DEV)
    k, v = (torch.randn(sum(lengths_k), HKV, D, device=DEV) for _ in range(2))
    gates = _gates((sum(lengths_k),), "fast" in name)
    args = (q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k))
    return Case(
        lambda: anchored_attention_varlen(*args, gates=gates, backend="triton"),
        lambda: anchored_attention_varlen(*args, gates.key_bias, gates.value_scale,
                                          backend="triton",
                                          value_scale_range=gates.value_scale_range),
        gates, [q, k, v], {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k},
    )  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("name", list(MAX_OPS))
def test_prepared_call_reads_nothing_back_and_runs_few_operators(name):
    case = _case(name)
    with capture_launches() as launches:
        counts = host_counts(case.call)
        baseline = host_counts(case.given)
    assert launches, "the call launched no kernel"
    assert counts["syncs_per_call"] == 0, f"host reads of device values: {counts['sync_ops']}"
    assert counts["aten_ops_per_call"] <= MAX_OPS[name], counts
    # The same call with the gates as given (a shift and a log2 copy of the key bias per
    # call): the bound is one the per-call preparation would break.
    assert baseline["aten_ops_per_call"] > MAX_OPS[name], baseline
    assert baseline["syncs_per_call"] == 0, baseline["sync_ops"]


def test_host_counts_sees_host_reads():
    """The detector itself: each way of reading a value back is counted once per call."""
    x = torch.arange(6.0, device=DEV)
    for read in (lambda: int(x.max()), lambda: bool((x > 2).any()), lambda: x.tolist(),
                 lambda: torch.nonzero(x), lambda: x.sum().item()):  # fmt: skip
        assert host_counts(read)["syncs_per_call"] >= 1
    # a device-side assertion is not a host read (on a CPU tensor it reads its flag inside)
    assert host_counts(lambda: torch._assert_async(x[1] > 0))["syncs_per_call"] == 0


def _launch_signature(launches, inputs):
    """What a CUDA graph would capture of these launches: kernels, grids, constants and
    scalar arguments as they are; input tensors by address; fresh outputs and workspaces
    by shape, strides and dtype only (a graph allocates them once, at capture)."""
    addresses = {t.data_ptr() for t in inputs if t is not None}
    out = []
    for la in launches:
        args = tuple(
            (a.data_ptr() if a.data_ptr() in addresses else "new", tuple(a.shape), a.stride(),
             a.dtype) if torch.is_tensor(a) else a
            for a in la.args
        )  # fmt: skip
        out.append((la.kernel, la.grid, args, tuple(sorted(la.kwargs.items()))))
    return out


@torch.no_grad()
@pytest.mark.parametrize("name", ["decode, static cache", "decode", "varlen decode"])
def test_prepared_decode_launches_do_not_depend_on_values(name):
    """Two decode steps on the same buffers with new values in place (queries, cache, the
    padding and the filled lengths): the launches are identical, so the host branches on
    no device value and a captured graph replays the step for any values."""
    case = _case(name)
    g = case.gates
    inputs = [*case.data, *case.metadata.values(), g.bias_log2, g.shift, g.value_scale]
    case.call()  # the metadata's device checks run once per tensor
    with capture_launches() as first:
        case.call()
    gen = torch.Generator(device=DEV).manual_seed(1)
    for t in case.data:
        t.copy_(torch.randn(t.shape, generator=gen, device=DEV))
    if "cache_seqlens" in case.metadata:
        case.metadata["cache_seqlens"].copy_(torch.tensor([5, 299], dtype=torch.int32))
        case.metadata["key_padding_mask"].logical_not_()
    with capture_launches() as second:
        case.call()
    assert [la.kernel.__name__ for la in first] == [
        "_anchored_decode_split_kernel", "_anchored_decode_merge_kernel"
    ]  # fmt: skip
    assert _launch_signature(first, inputs) == _launch_signature(second, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_gated_decode_in_a_cuda_graph(dtype):
    """On a GPU: a gated decode step (Qwen2.5-VL-7B's heads, a static 4096-slot cache with
    ``cache_seqlens``, gates prepared once with room to grow) captured in a CUDA graph and
    replayed after the next token's query, K/V and filled length were written in place:
    each replay equals an eager call on the new values, bit for bit, and the float64
    reference to the dtype's rounding."""
    from videoanchor.kernels.reference import anchored_attention_reference

    S, P = 4096, 3000  # cache slots, prompt tokens (gated)
    cuda = torch.device("cuda")
    q = torch.randn(1, 28, 1, 128, device=cuda, dtype=dtype)
    k, v = (torch.randn(1, 4, S, 128, device=cuda, dtype=dtype) for _ in range(2))
    kb, vs = videoanchor.anchor_gates(torch.rand(1, P, device=cuda), 9.5, 2.5)
    kb_buf = torch.zeros(1, S, device=cuda)
    vs_buf = torch.ones(1, S, device=cuda)
    kb_buf[:, :P], vs_buf[:, :P] = kb, vs
    gates = prepare_gates(kb_buf, vs_buf)
    lens = torch.tensor([P + 1], dtype=torch.int32, device=cuda)

    def step():
        return anchored_attention(q, k, v, gates=gates, cache_seqlens=lens, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles the kernels, checks lens once
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for n in (P + 1, P + 2, S):
        q.normal_()
        k[:, :, n - 1].normal_()
        v[:, :, n - 1].normal_()
        lens.fill_(n)
        out.fill_(float("nan"))
        graph.replay()
        eager = step()
        torch.testing.assert_close(out, eager, atol=0, rtol=0)
        ref = anchored_attention_reference(
            q.double(), k[:, :, :n].double(), v[:, :, :n].double(), kb_buf[:, :n].double(),
            vs_buf[:, :n].double(),
        )  # fmt: skip
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_profile_gates_runs_its_cases_on_the_cpu(tmp_path):
    """benchmarks/profile_gates.py (run_gpu.sh's profile driver) with ``--device cpu`` and
    tiny shapes: every case runs and the summary names them all."""
    from benchmarks import profile_gates

    out = tmp_path / "logs" / "profile_gates.txt"
    rows = profile_gates.main(
        ["--S", "32", "--cache", "300", "--calls", "1", "--out", str(out), "--device", "cpu"]
    )
    names = [r["case"] for r in rows]
    assert names == ["prefill/anchored_prepared", "prefill/anchored_given", "prefill/plain",
                     "decode/anchored_prepared", "decode/anchored_given", "decode/plain",
                     "decode/sdpa_gates_as_mask"]  # fmt: skip
    assert all(r["host_ms_per_call"] > 0 and r["aten_ops_per_call"] > 0 for r in rows)
    text = out.read_text()
    assert all(n in text for n in names) and out.with_suffix(".json").exists()
