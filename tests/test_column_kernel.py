"""The column kernel (videoanchor/anchor/solvers/_column_kernel.py, issue 90 step 3) in
Triton's interpreter: each column of the active list solved restricted to its slots, checked
by the restricted KKT conditions in float64 (the contract in the module docstring), and,
where the slots hold every variable, against the CPU's certified minimiser
(solve_ssc_workset)."""

from __future__ import annotations

import math

import pytest
import torch

from videoanchor.anchor.program import gram_row_max, nearest_points, ssc_lambdas

ck = pytest.importorskip("videoanchor.anchor.solvers._column_kernel")
triton = pytest.importorskip("triton")
tl = triton.language
from workset_reference import kkt_rounding, support_spread  # noqa: E402

#: The kernel's stopping tolerance on the relative KKT violations off the support.
TOL = 1e-9
EPS = torch.finfo(torch.float64).eps


@pytest.fixture
def wide_tiles(monkeypatch):
    """Row tiles of 1024 elements (the compiled kernel's are 128: ``ck.TILE``): the same
    code with fewer, wider sweeps' iterations, which the interpreter runs several times
    faster. The tests at the compiled tiling do not request it."""
    monkeypatch.setattr(ck, "TILE", 1024)


@pytest.fixture(autouse=True)
def _quick():
    from interpreter_calls import quick_device_calls, unavailable_reason

    if unavailable_reason():
        yield
        return
    with quick_device_calls():
        yield


def features(n: int, d: int, seed: int, corrupt=()) -> torch.Tensor:
    """Points near 3 subspaces of dimension 3 (sparse ``C``), a few tokens ``corrupt``ed
    on a third of their entries (their columns need outlier entries)."""
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0]
             for _ in range(3)]  # fmt: skip
    lab = torch.randint(0, 3, (n,), generator=g)
    X = torch.stack([bases[int(k)] @ torch.randn(3, generator=g, dtype=torch.float64)
                     for k in lab])  # fmt: skip
    X += 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)
    for j in corrupt:
        rows = torch.randperm(d, generator=g)[: d // 3]
        X[j, rows] += 2.0 * torch.randn(len(rows), generator=g, dtype=torch.float64)
    return X


def program(X: torch.Tensor, tol: float = TOL, max_inner: int = 1000) -> dict:
    G = X @ X.T
    G = (G + G.T) / 2
    lam_e, lam_z, _, _ = ssc_lambdas(X, 800.0, 800.0, row_max=gram_row_max(X, gram=G))
    scalars = torch.tensor([lam_z, lam_e, lam_z * float(G.diagonal().max()), tol, 1e-10],
                           dtype=torch.float64)  # fmt: skip
    return dict(G=G, X=X, n=X.shape[0], d=X.shape[1], scalars=scalars, max_inner=max_inner)


def poisoned_state(prog: dict, cols, M: int, ME: int) -> dict:
    nc = len(cols)
    nan = torch.full((nc,), math.nan, dtype=torch.float64)
    return dict(program=prog, cols=torch.tensor(cols, dtype=torch.int64),
                ids=torch.full((nc, M), -1, dtype=torch.int32),
                z=torch.zeros(nc, M, dtype=torch.float64),
                eids=torch.full((nc, ME), -1, dtype=torch.int32),
                ze=torch.zeros(nc, ME, dtype=torch.float64), mu=nan,
                status=torch.full((nc,), -7, dtype=torch.int32),
                steps_pass=torch.full((nc,), -7, dtype=torch.int32))  # fmt: skip


def fill_slots(st: dict, r: int, g: torch.Generator, coefs, entries, *, start: str) -> None:
    """Row ``r``'s slots: the coefficients ``coefs`` and outlier entries ``entries`` at
    random positions (the others empty: holes anywhere), from a feasible start: the nearest
    point (``"nearest"``) or a random signed combination with some outlier entries set
    (``"random"``, not optimal)."""
    M, ME = st["ids"].shape[1], st["eids"].shape[1]
    pos = torch.randperm(M, generator=g)[: len(coefs)]
    st["ids"][r, pos] = torch.tensor(coefs, dtype=torch.int32)
    if len(entries):
        epos = torch.randperm(ME, generator=g)[: len(entries)]
        st["eids"][r, epos] = torch.tensor(entries, dtype=torch.int32)
    if start == "nearest":
        near = int(nearest_points(st["program"]["G"])[int(st["cols"][r])])
        at = pos[list(coefs).index(near)] if near in coefs else pos[0]
        st["z"][r, at] = 1.0
        return
    k = min(3, len(coefs))
    v = torch.randn(k, generator=g, dtype=torch.float64)
    v[0] = 1.0 - v[1:].sum()  # on the constraint
    st["z"][r, pos[:k]] = v
    if len(entries):
        st["ze"][r, epos[: max(1, len(entries) // 3)]] = 0.05 * torch.randn(
            max(1, len(entries) // 3), generator=g, dtype=torch.float64)  # fmt: skip


def dense(st: dict, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r``'s ``c`` (N) and ``e`` (D) from its slots."""
    p = st["program"]
    c = torch.zeros(p["n"], dtype=torch.float64)
    e = torch.zeros(p["d"], dtype=torch.float64)
    ids, eids = st["ids"][r].long(), st["eids"][r].long()
    c[ids[ids >= 0]] = st["z"][r][ids >= 0]
    e[eids[eids >= 0]] = st["ze"][r][eids >= 0]
    return c, e


def restricted_kkt(st: dict, r: int) -> dict:
    """The contract's restricted KKT conditions of row ``r`` in float64: the largest
    relative violation off the support and stationarity error on it, over the slots; the
    constraint; c_i."""
    p = st["program"]
    lam_z, lam_e = float(p["scalars"][0]), float(p["scalars"][1])
    X, i = p["X"], int(st["cols"][r])
    c, e = dense(st, r)
    res = X[i] - X.T @ c - e
    m = lam_z * (X @ res) - float(st["mu"][r])
    me = lam_z * res
    ids, eids = st["ids"][r].long(), st["eids"][r].long()
    u = ids[(ids >= 0) & (ids != i)]
    o = eids[eids >= 0]
    off = torch.cat([(m[u].abs() - 1.0)[c[u] == 0], ((me[o].abs() - lam_e) / lam_e)[e[o] == 0]])
    on = torch.cat([(m[u] - c[u].sign()).abs()[c[u] != 0],
                    ((me[o] - lam_e * e[o].sign()).abs() / lam_e)[e[o] != 0]])  # fmt: skip
    return dict(off=float(off.max()) if len(off) else -1.0,
                on=float(on.max()) if len(on) else 0.0,
                affine=abs(float(c.sum()) - 1.0), diag=float(c[i]),
                support=int((c != 0).sum()), entries=int((e != 0).sum()))  # fmt: skip


def rounding(st: dict, r: int) -> dict:
    """What float64 rounding alone can put on row ``r``'s restricted KKT check
    (:func:`workset_reference.kkt_rounding`: ``2 gamma_k`` times the terms' magnitudes), with
    ``k = n + d + M + ME`` (the test forms the multipliers from ``X``; the kernel from
    ``G = X X^T``, its slots and its refined solve). The constraint ``1^T c`` is a sum of
    ``n`` (the test's) and ``M`` (the kernel's) terms of ``|c|``.

    On the corrupted tokens here ``||c||_1`` reaches ~300 and ``lambda_z`` ~900, so the
    terms add to ~2e6 and the stationarity is only defined to ~1e-7, while a kernel whose
    outlier update is off by 1e-10 relative is off by ~1e-5
    (test_a_broken_outlier_update_fails_the_check); the on-support stationarity was 1.6e-9
    on an Intel AVX-512 CPU and 3.9e-10 on an AMD one (issue 97)."""
    p = st["program"]
    lam_z, lam_e = float(p["scalars"][0]), float(p["scalars"][1])
    c, e = dense(st, r)
    k = p["n"] + p["d"] + st["ids"].shape[1] + st["eids"].shape[1]
    n_aff = p["n"] + st["ids"].shape[1]
    return dict(
        kkt=kkt_rounding(p["X"], int(st["cols"][r]), c, e, lam_z, lam_e, k),
        affine=2 * n_aff * EPS * float(c.abs().sum()),
    )


def spread(st: dict, r: int, slack: dict) -> tuple[float, float]:
    """How far apart two answers of row ``r``'s restricted system on one support can lie
    when each is within ``slack`` (:func:`rounding`) of it
    (:func:`workset_reference.support_spread`)."""
    c, e = dense(st, r)
    return support_spread(st["program"]["X"], c, e, float(st["program"]["scalars"][0]),
                          max(slack.values()))  # fmt: skip


def run(st: dict, cap_rows=None, count=None) -> None:
    nc = st["ids"].shape[0]
    active = torch.arange(nc, dtype=torch.int32) if cap_rows is None else cap_rows
    count = torch.tensor([len(active) if count is None else count], dtype=torch.int32)
    ck.launch(st, active, count)


def assert_kkt(st: dict, rows) -> list[dict]:
    out = []
    for r in rows:
        got = restricted_kkt(st, r)
        assert int(st["status"][r]) == 0, (r, got, int(st["steps_pass"][r]))
        assert 1 <= int(st["steps_pass"][r]) <= st["program"]["max_inner"]
        assert math.isfinite(float(st["mu"][r]))
        slack = rounding(st, r)
        assert got["off"] <= TOL + slack["kkt"] and got["on"] <= slack["kkt"], (r, got, slack)
        assert got["affine"] <= slack["affine"] and got["diag"] == 0.0, (r, got, slack)
        out.append(got)
    return out


@pytest.mark.parametrize("n, d, M, seed", [(23, 37, 16, 0), (41, 61, 32, 1), (57, 89, 64, 2)])
def test_coefficient_slots_restricted_kkt(n, d, M, seed, request):
    """No outlier slots in use (step 1): random coefficient slots with holes, starts at the
    nearest point and at a random signed (non-optimal) point; every row of the active list
    solved to the restricted KKT conditions; holes and the values off the slots untouched.
    The largest case at wide tiles (578 s at the compiled 128 on a loaded 2-core CPU; the
    compiled tiling is the smaller cases')."""
    if M >= 64:
        request.getfixturevalue("wide_tiles")
    g = torch.Generator().manual_seed(seed)
    X = features(n, d, seed)
    prog = program(X)
    cols = [0, 3, n // 2, n - 1, 7]
    st = poisoned_state(prog, cols, M, 4)
    for r, i in enumerate(cols):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        fill_slots(st, r, g, others[: M - 3 - r % 3], [], start="nearest" if r % 2 else "random")
    holes = st["ids"] < 0
    st["z"][holes] = 0.0
    ids0, eids0 = st["ids"].clone(), st["eids"].clone()
    run(st)
    got = assert_kkt(st, range(len(cols)))
    assert torch.equal(st["ids"], ids0) and torch.equal(st["eids"], eids0)
    assert (st["z"][holes] == 0).all() and (st["ze"] == 0).all()
    assert any(r["support"] > 1 for r in got)


@pytest.mark.parametrize("n, d, M, ME, seed", [(29, 47, 32, 32, 3), (45, 71, 64, 64, 4)])
def test_outlier_slots_restricted_kkt(n, d, M, ME, seed, request):
    """Corrupted tokens with outlier slots (step 2: the Schur complement and its rank-one
    updates), holes in both kinds of slots, starts with outlier entries set off the
    optimum: the restricted KKT conditions, and some outlier entries joined or kept. The
    larger case at wide tiles (the interpreter's time)."""
    if M >= 64:
        request.getfixturevalue("wide_tiles")
    g = torch.Generator().manual_seed(seed)
    corrupt = (1, 4, n - 2)
    X = features(n, d, seed, corrupt=corrupt)
    prog = program(X)
    cols = [1, 4, n - 2, 0]
    st = poisoned_state(prog, cols, M, ME)
    for r, i in enumerate(cols):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        entries = torch.randperm(d, generator=g)[: ME - 5].tolist()
        fill_slots(st, r, g, others[: M - 2], entries, start="random" if r % 2 else "nearest")
    run(st)
    got = assert_kkt(st, range(len(cols)))
    assert sum(r["entries"] for r in got[:3]) > 0, got


_yy_mv = ck._yy_mv


@triton.jit
def _yy_mv_off(X, D, Ee, SE, x, cols64, cmask, used_e, M: tl.constexpr, BE: tl.constexpr):
    """The outlier entries' product ``Y_OF^T Y_OF x`` off by 1e-10 relative."""
    return _yy_mv(X, D, Ee, SE, x, cols64, cmask, used_e, M, BE) * (1.0 + 1e-10)


def test_a_broken_outlier_update_fails_the_check(monkeypatch, wide_tiles):
    """The check's tolerance (:func:`rounding`, ~6e-8 here) is the arithmetic's, not a
    blanket: with the outlier entries' part of the unfactored system off by 1e-10 relative
    (the kernel refines against it), a corrupted token's on-support stationarity is off by
    ~7e-7 (AMD EPYC) and the check fails; the same column with the kernel as it is passes."""
    n, d, M, ME, seed = 29, 47, 32, 32, 3
    g = torch.Generator().manual_seed(seed)
    prog = program(features(n, d, seed, corrupt=(1, 4, n - 2)))
    st = poisoned_state(prog, [1], M, ME)
    others = [j for j in torch.randperm(n, generator=g).tolist() if j != 1]
    fill_slots(st, 0, g, others[: M - 2], torch.randperm(d, generator=g)[: ME - 5].tolist(),
               start="nearest")  # fmt: skip
    start = {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
    run(st)
    assert_kkt(st, [0])
    st.update({k: v.clone() for k, v in start.items()})
    monkeypatch.setattr(ck, "_yy_mv", _yy_mv_off)
    run(st)
    assert int(st["status"][0]) == 0  # (the kernel believes it solved the column)
    with pytest.raises(AssertionError):
        assert_kkt(st, [0])


@pytest.mark.parametrize("n, d, seed", [(21, 31, 5), (33, 53, 6)])
def test_every_variable_in_the_slots_is_the_minimiser(n, d, seed, wide_tiles):
    """Slots that hold every coefficient and every outlier entry: the restricted minimiser
    is the program's, equal to the CPU's certified one (solve_ssc_workset, tol 1e-12)."""
    from videoanchor.anchor.solvers.workset import solve_ssc_workset

    X = features(n, d, seed, corrupt=(2, n - 1))
    prog = program(X)
    ref = solve_ssc_workset(X, tol=1e-12)
    assert ref.converged
    C, E = ref.coef.double(), ref.outliers.double()
    cols = [2, n - 1, 0, 5]
    M = 1 << (n - 2).bit_length()
    ME = 1 << (d - 1).bit_length()
    g = torch.Generator().manual_seed(seed)
    st = poisoned_state(prog, cols, M, ME)
    for r, i in enumerate(cols):
        fill_slots(st, r, g, [j for j in range(n) if j != i], list(range(d)),
                   start="nearest" if r % 2 else "random")  # fmt: skip
    run(st)
    assert_kkt(st, range(len(cols)))
    for r, i in enumerate(cols):
        c, e = dense(st, r)
        assert torch.allclose(c, C[:, i], rtol=0, atol=1e-8), (i, (c - C[:, i]).abs().max())
        assert torch.allclose(e, E[:, i], rtol=0, atol=1e-8), (i, (e - E[:, i]).abs().max())
        assert ((c != 0) == (C[:, i] != 0)).all() and ((e != 0) == (E[:, i] != 0)).all()
    assert any(bool((E[:, i] != 0).any()) for i in cols)


def test_count_and_the_carried_inverse():
    """``count`` (on the device) below the active list: the rows past it untouched (their
    poison kept). Then a pass loop's move: more slots added (value 0) to solved rows, which
    run again from their carried inverse (``Sok`` 1, the support unchanged) and reach the
    restricted optimum; with ``Sok`` zeroed they rebuild it, to the same support."""
    n, d = 37, 43
    g = torch.Generator().manual_seed(7)
    X = features(n, d, 7, corrupt=(3,))
    prog = program(X)
    cols = [3, 10, 20, 30, 36]
    M, ME = 32, 16
    st = poisoned_state(prog, cols, M, ME)
    order = []
    for r, i in enumerate(cols):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        order.append(others)
        fill_slots(st, r, g, others[:8], torch.randperm(d, generator=g)[:6].tolist(),
                   start="nearest")  # fmt: skip
    active = torch.tensor([4, 1, 0, 2], dtype=torch.int32)
    before = {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
    run(st, active, count=2)  # rows 4 and 1 only
    assert_kkt(st, [4, 1])
    for r in (0, 2, 3):
        assert torch.isnan(st["mu"][r]) and int(st["status"][r]) == -7
        assert int(st["steps_pass"][r]) == -7
        for key in ("z", "ze", "ids", "eids"):
            assert torch.equal(st[key][r], before[key][r]), key
    assert st["Sok"][[4, 1]].tolist() == [1, 1]
    # more slots into the free ones (value 0), as the pass loop adds violators
    for r in (4, 1):
        free = torch.nonzero(st["ids"][r] < 0).flatten()[:10]
        st["ids"][r, free] = torch.tensor(order[r][8:18], dtype=torch.int32)
    again = {k: st[k].clone() for k in ("ids", "z", "eids", "ze")}
    run(st, active, count=2)
    carried = assert_kkt(st, [4, 1])
    kept = {k: st[k][[4, 1]].clone() for k in ("z", "ze")}
    for k, v in again.items():
        st[k].copy_(v)
    st["Sok"].zero_()  # the pass loop's reset: rebuilt from zero
    run(st, active, count=2)
    rebuilt = assert_kkt(st, [4, 1])
    assert [r["support"] for r in carried] == [r["support"] for r in rebuilt]
    for at, r in enumerate((4, 1)):
        dc, de = spread(st, r, rounding(st, r))
        assert float((st["z"][r] - kept["z"][at]).abs().max()) <= dc, (r, dc)
        assert float((st["ze"][r] - kept["ze"][at]).abs().max()) <= de, (r, de)


def test_the_support_apart_from_the_candidates(wide_tiles):
    """Slots wider than the support's positions (``state["support"]`` < ``M``: the
    candidates read from global memory, the inverse over the support alone): the restricted
    KKT conditions, and the answer of the same rows with every slot a position (within what
    rounding leaves apart on one support); scratch at the support's size."""
    n, d, M, ME, MS = 45, 71, 128, 32, 64
    g = torch.Generator().manual_seed(11)
    X = features(n, d, 11, corrupt=(4,))
    prog = program(X)
    cols = [4, 0, 20, n - 1]
    st = poisoned_state(prog, cols, M, ME)
    for r, i in enumerate(cols):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        fill_slots(st, r, g, others[: n - 1 - r], torch.randperm(d, generator=g)[:20].tolist(),
                   start="random" if r % 2 else "nearest")  # fmt: skip
    every = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    st["support"] = MS
    run(st)
    got = assert_kkt(st, range(len(cols)))
    assert tuple(st["Sinv"].shape) == (len(cols), MS, MS)
    assert 1 < max(r["support"] for r in got) <= MS
    run(every)
    assert_kkt(every, range(len(cols)))
    for r in range(len(cols)):
        dc, de = spread(st, r, rounding(st, r))
        assert float((st["z"][r] - every["z"][r]).abs().max()) <= dc, r
        assert float((st["ze"][r] - every["ze"][r]).abs().max()) <= de, r


def test_a_support_past_its_positions_stops_the_column():
    """A column whose support would pass the level's positions stops with status 2 (the
    pass loop sets it aside): from a start already past them, at once and untouched; else
    at a feasible point that fills them, its slots written back without poison."""
    n, d, M, ME = 41, 61, 32, 8
    g = torch.Generator().manual_seed(12)
    prog = program(features(n, d, 12))
    cols = [0, 9]
    st = poisoned_state(prog, cols, M, ME)
    for r, i in enumerate(cols):
        others = [j for j in torch.randperm(n, generator=g).tolist() if j != i]
        fill_slots(st, r, g, others[: M - 2], [], start="random" if r == 0 else "nearest")
    st["support"] = 2  # row 0 starts on 3 coefficients; row 1 on 1 and needs more than 2
    z0 = st["z"].clone()
    run(st)
    assert st["status"].tolist() == [2, 2] and st["Sok"].tolist() == [0, 0]
    assert int(st["steps_pass"][0]) == 0 and torch.equal(st["z"][0], z0[0])
    assert int(st["steps_pass"][1]) >= 1 and not torch.isnan(st["z"][1]).any()
    c, _ = dense(st, 1)
    affine = rounding(st, 1)["affine"]  # (what float64 rounding leaves on the constraint)
    assert int((c != 0).sum()) == 2 and abs(float(c.sum()) - 1.0) <= affine, affine


def test_bad_input():
    X = features(11, 13, 8)
    st = poisoned_state(program(X), [0, 1], 8, 4)
    st["ids"][:, 0] = torch.tensor([1, 0], dtype=torch.int32)
    st["z"][:, 0] = 1.0
    active = torch.arange(2, dtype=torch.int32)
    with pytest.raises(TypeError, match="active: expected torch.int32, got torch.int64"):
        ck.launch(st, active.long(), torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"z, ze: expected shapes \(2, 8\) and \(2, 4\)"):
        ck.launch(dict(st, ze=torch.zeros(2, 3, dtype=torch.float64)), active,
                  torch.tensor([2], dtype=torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match=r"support: expected at most the slots \(8\), got 16"):
        ck.launch(dict(st, support=16), active, torch.tensor([2], dtype=torch.int32))
    with pytest.raises(ValueError, match="ME: expected a power of two, got 3"):
        ck.launch(dict(st, eids=torch.full((2, 3), -1, dtype=torch.int32)), active,
                  torch.tensor([2], dtype=torch.int32))  # fmt: skip


#: The levels compiled by the register test: coefficient slots ``M``, and ``M:MS`` where the
#: support's positions are fewer (the candidates in global memory).
LEVELS = ("64", "128", "256", "1024:128", "2048:256")  # (the last two: workset_cuda's)
#: A python with Triton 3.6 (the GPU machines' version), e.g. ``python3 -m venv /tmp/t36 &&
#: /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy array-api-compat``.
TRITON36_ENV = "VIDEOANCHOR_TRITON36_PYTHON"
#: (cc, M) still above the target under Triton 3.6.0: STATIC bytes of spill stores (issue 98
#: defect 6; benchmarks/results/column_kernel_triton36_static.json). Triton 3.9 has none.
KNOWN_SPILLS_36 = {(90, 256): 176, (80, 256): 88, (90, 2048): 200, (80, 2048): 92}


def _python(which: str) -> str:
    """The python that compiles: this one (``running``), or ``$VIDEOANCHOR_TRITON36_PYTHON``
    (``3.6``: skipped where unset; a clear failure where it is not Triton 3.6)."""
    import os
    import subprocess
    import sys

    if which == "running":
        return sys.executable
    exe = os.environ.get(TRITON36_ENV)
    if not exe:
        pytest.skip(f"{TRITON36_ENV} unset: no python with Triton 3.6 (the GPU machines') here")
    if not os.access(exe, os.X_OK):
        pytest.fail(f"{TRITON36_ENV}={exe!r}: not an executable python")
    got = subprocess.run([exe, "-c", "import triton; print(triton.__version__)"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    version = got.stdout.strip()
    if got.returncode != 0 or not version.startswith("3.6."):
        pytest.fail(
            f"{TRITON36_ENV}={exe!r}: expected Triton 3.6, got {version or got.stderr[-500:]!r}"
        )
    return exe


_COMPILED: dict = {}


def _compiled(which: str, cc: int) -> dict:
    """Each level compiled for ``sm_<cc>`` by ``which``'s Triton (one subprocess for the
    levels, kept for the test's other items): ``{M: row}``, and the Triton version."""
    import json
    import os
    import subprocess
    from pathlib import Path

    key = (which, cc)
    if key not in _COMPILED:
        exe = _python(which)
        root = Path(__file__).resolve().parents[1]
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
        probe = subprocess.run(
            [exe, "-c", "import triton; from videoanchor.kernels import aot; "
             "print(triton.__version__); print(aot.unavailable_reason() or '')"],
            capture_output=True, text=True, cwd=str(root), env=env, timeout=600,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-3000:]
        version, reason = (probe.stdout.splitlines() + ["", ""])[:2]
        # (aot gates on the Triton versions it was tested with, 3.9; its harness compiles
        # under 3.6 as well, which is what this python is asked for)
        if reason and not (which == "3.6" and "the AOT harness is tested on" in reason):
            pytest.skip(f"{which} python (triton {version}): {reason}")
        proc = subprocess.run(
            [exe, str(root / "benchmarks" / "bench_column_kernel.py"), "--static", str(cc),
             "--slots", ",".join(LEVELS), "--no-write"],
            capture_output=True, text=True, cwd=str(root), timeout=1800, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert [r["M"] for r in rows] == [int(v.split(":")[0]) for v in LEVELS], proc.stdout[-3000:]
        _COMPILED[key] = (version, {r["M"]: r for r in rows})
    return _COMPILED[key]


@pytest.mark.parametrize("M", [int(v.split(":")[0]) for v in LEVELS])
@pytest.mark.parametrize("cc", [90, 80])
@pytest.mark.parametrize("which", ["running", "3.6"])
def test_levels_compile_within_the_register_target(which, cc, M):
    """STATIC (Triton's bundled ptxas, no GPU): each level of coefficient slots compiled for
    sm_90 and sm_80 holds at most 128 registers, spills nothing and fits 4 blocks of 128
    threads an SM (benchmarks/bench_column_kernel.py --static), under the running Triton
    and, where ``$VIDEOANCHOR_TRITON36_PYTHON`` names a python with Triton 3.6 (the GPU
    machines' version), under 3.6 too: Triton 3.6 lowers a reduction across warps with
    predicated shared-memory loads whose registers ptxas holds from the kernel's entry, so
    its budget differs from 3.9's."""
    version, rows = _compiled(which, cc)
    r = rows[M]
    assert "error" not in r, r
    assert r["cc"] == cc and r["threads"] == 128 and 0 < r["registers"] <= 128, (version, r)
    assert r["ctas_per_sm"] >= 4 and r["shared_bytes"] <= r["shared_limit"], (version, r)
    known = KNOWN_SPILLS_36.get((cc, M)) if version.startswith("3.6.") else None
    if known is not None:  # an expected failure, strict: it fails once the level fits
        assert r["spill_stores"] > 0, (
            f"fits now under {version}: drop {(cc, M)} from KNOWN_SPILLS_36"
        )
        pytest.xfail(f"Triton {version} spills {r['spill_stores']} bytes at M = {M} on sm_{cc} "
                     f"(recorded {known}; issue 98 defect 6)")  # fmt: skip
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (version, r)
