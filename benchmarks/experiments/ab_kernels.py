"""``benchmarks/ab.py --function`` workloads for issue 93: the default's SSC
(``ssc_coefficients(x, solver="auto")``) on one of ``bench_workset``'s sets, with the full
working-set kernel (``full``: both kernels readied first where the tree has them, so that
``run_columns`` takes the full one) or the lean one forced (``lean``: the full one only for a
column that needs an outlier entry, and those after it). A tree without the split (no
``precompile`` in its kernel) runs its one kernel either way. Records the route, a digest of
``C`` and what the process did for each kernel::

    python benchmarks/ab.py A B --function benchmarks/experiments/ab_kernels.py:full \\
        --cases "video 8x48 D1024" "video 16x48 D1024" --rounds 6 --calls 3 \\
        --metric cpu_seconds --out ab_full.json
"""

from __future__ import annotations


def _setup(case: str, force_lean: bool):
    import hashlib
    import warnings

    from benchmarks.bench_workset import SETS
    from videoanchor.anchor import ssc_coefficients
    from videoanchor.anchor.solvers import _workset_kernel as k

    if hasattr(k, "precompile"):
        k.precompile()
        if force_lean:
            ready = k.ready

            def lean_first(kernel="full", *, compile=True):
                return None if kernel == "full" and not compile else ready(kernel, compile=compile)

            k.ready = lean_first
    x = SETS[case][0]()

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = ssc_coefficients(x, solver="auto")
        digest = hashlib.sha1(res.coef.numpy().tobytes()).hexdigest()[:12]
        kernels = ",".join(f"{e['kernel']}:{e['how']}" for e in getattr(k, "EVENTS", []))
        return dict(strategy=res.strategy, coef_sha=digest, kernels=kernels)

    run()  # (its first call: the thread bounds, SciPy's import)
    return run


def full(case: str):
    return _setup(case, False)


def lean(case: str):
    return _setup(case, True)
