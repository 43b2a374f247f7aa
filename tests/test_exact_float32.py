"""The scores do not depend on a user's process-wide float32-matmul setting.

``torch.set_float32_matmul_precision("high")`` (TF32 on CUDA) or ``"medium"`` (bfloat16
passes in oneDNN, on CPUs that have them) lowers every float32 product of the process; on an
H100 TF32 products left the fast solver's 64-frame scores uncorrelated with the faithful
ones. The public SSC and spectral entry points hold float32 products at IEEE precision
(``products.exact_float32_matmul``) and restore the user's setting afterwards.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from videoanchor.anchor import (
    compute_anchor_scores,
    products,
    solve_ssc_admm,
    solve_ssc_blocked,
    spectral_clustering,
    ssc_affinity,
)

LOWERED = {"cuda": "tf32", "mkldnn": "bf16"}


@contextlib.contextmanager
def _lowering(settings=LOWERED):
    """The user's setting lowered (``settings``: backend -> value), restored after."""
    matmul = {name: getattr(torch.backends, name).matmul for name in settings}
    before = {name: m.fp32_precision for name, m in matmul.items()}
    for name, value in settings.items():
        matmul[name].fp32_precision = value
    try:
        yield
    finally:
        for name, value in before.items():
            matmul[name].fp32_precision = value


@pytest.fixture
def lowered():
    """The user's setting lowered on every backend that has one, restored after the test."""
    if not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision (before 2.9)")
    with _lowering():
        yield


def _tokens(n=72, d=40, seed=3):
    from benchmarks.common import synthetic_tokens

    return synthetic_tokens(n, d, k=4, seed=seed)


def test_products_run_at_ieee_precision_inside_and_the_setting_comes_back(lowered, monkeypatch):
    seen = []
    mm = products.Products.mm

    def recording(self, a, b):
        seen.append((torch.backends.cuda.matmul.fp32_precision,
                     torch.backends.mkldnn.matmul.fp32_precision))  # fmt: skip
        return mm(self, a, b)

    monkeypatch.setattr(products.Products, "mm", recording)
    compute_anchor_scores(_tokens(), 4, progress=False, solver="fast")
    assert seen and set(seen) == {("ieee", "ieee")}
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def _lowered_changes_products() -> bool:
    """Whether the lowered setting changes a float32 product on this machine (oneDNN's
    bfloat16 passes need a CPU with them; at 256 x 256 oneDNN takes the product)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    exact = a @ b
    with _lowering({"mkldnn": "bf16"}):
        return not torch.equal(a @ b, exact)


def _every_entry_point(x):
    runs = {
        "fast": compute_anchor_scores(x, 4, progress=False),
        "faithful": compute_anchor_scores(x, 4, progress=False, solver="faithful"),
        "admm": solve_ssc_admm(x, progress=False, scheduled=True),
        "blocked": solve_ssc_blocked(x, block_columns=64, progress=False),
    }
    runs["labels"] = spectral_clustering(ssc_affinity(runs["admm"].coef), 4, seed=0)
    return runs


def test_every_entry_point_gives_the_same_bits_under_a_lowered_setting():
    if not hasattr(torch.backends.mkldnn.matmul, "fp32_precision"):
        pytest.skip("this PyTorch has no per-backend fp32_precision (before 2.9)")
    if not _lowered_changes_products():
        pytest.skip("this CPU computes float32 products alike under the lowered setting "
                    "(no bfloat16 passes in oneDNN here): nothing to compare")  # fmt: skip
    x = _tokens(200, 100)  # large enough that the lowered setting moves C (by ~3e-5)
    default = _every_entry_point(x)
    with _lowering():
        again = _every_entry_point(x)
    for key in ("fast", "faithful"):
        assert torch.equal(again[key].scores, default[key].scores), key
        assert torch.equal(again[key].coef, default[key].coef), key
    for key in ("admm", "blocked"):
        assert torch.equal(again[key].coef.to_dense(), default[key].coef.to_dense()), key
    assert torch.equal(again["labels"], default["labels"])


def test_the_setting_comes_back_after_an_error(lowered):
    with pytest.raises(ValueError):
        compute_anchor_scores(torch.full((8, 4), float("nan")), 2, progress=False)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"


def test_nested_and_concurrent_uses_restore_once_at_the_last_exit(lowered):
    inside, leave_first = threading.Event(), threading.Event()
    states = []

    def first():
        with products.exact_float32_matmul():
            states.append(torch.backends.mkldnn.matmul.fp32_precision)
            inside.set()
            leave_first.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(10)
    with products.exact_float32_matmul():
        with products.exact_float32_matmul():  # nested in the same thread
            states.append(torch.backends.cuda.matmul.fp32_precision)
        leave_first.set()
        t.join(10)
        # the other thread has left; this one is still inside: still exact
        states.append(torch.backends.mkldnn.matmul.fp32_precision)
    assert states == ["ieee", "ieee", "ieee"]
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert products._held == {}


def test_a_legacy_setting_reads_back_the_same_afterwards():
    # a user of the legacy API still reads the precision they set (no mixed-API error)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        compute_anchor_scores(_tokens(), 4, progress=False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_thread_that_keeps_cuda_leaves_it_and_says_so_once(lowered, recwarn):
    # the vLLM side thread: Dynamo checks CUDA's TF32 setting, so that thread never changes
    # it (oneDNN's it still holds), and a lowered CUDA setting is reported once
    seen = []

    def side():
        products.keep_cuda_setting_in_this_thread()
        for _ in range(2):
            with products.exact_float32_matmul():
                seen.append((torch.backends.cuda.matmul.fp32_precision,
                             torch.backends.mkldnn.matmul.fp32_precision))  # fmt: skip

    products._warned.discard("cuda")
    t = threading.Thread(target=side)
    t.start()
    t.join(10)
    assert seen == [("tf32", "ieee"), ("tf32", "ieee")]
    said = [w for w in recwarn if "TF32" in str(w.message)]
    assert len(said) == 1 and "VLLM_FLOAT32_MATMUL_PRECISION" in str(said[0].message)
    # the main thread, meanwhile, still holds both
    with products.exact_float32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert products._held == {}


def test_a_side_thread_first_then_the_main_thread_holds_cuda_and_restores_it(lowered):
    entered, leave = threading.Event(), threading.Event()

    def side():
        products.keep_cuda_setting_in_this_thread()
        with products.exact_float32_matmul():
            entered.set()
            leave.wait(10)

    products._warned.add("cuda")  # (said in the test above)
    t = threading.Thread(target=side)
    t.start()
    assert entered.wait(10)
    with products.exact_float32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    # the main thread let go of CUDA's; the side thread still holds oneDNN's
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    leave.set()
    t.join(10)
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert products._held == {}
