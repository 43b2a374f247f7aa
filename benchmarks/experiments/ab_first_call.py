"""``benchmarks/ab.py --function`` workload for issue 101: the default anchor scores
(``compute_anchor_scores(x, n_clusters=24)``) of ``bench_first_call``'s 768 video-like tokens
(``video_tokens(16, 48, 1024)``), one torch thread, warm: the background compile waited
for and one call made before the timed ones (the kernels and the discretisation's loops
loaded or compiled). Records a digest of the scores and the labels::

    NUMBA_CACHE_DIR=/tmp/ab-cache python benchmarks/ab.py a1c2403 . \\
        --function benchmarks/experiments/ab_first_call.py:scores --rounds 4 --calls 3 \\
        --out ab_warm_cpu.json
"""

from __future__ import annotations


def scores(case: str):
    import hashlib

    import torch

    from benchmarks.common import video_tokens

    torch.set_num_threads(1)
    frames, patches, dim = (int(v) for v in case.split("x"))
    x = video_tokens(frames, patches, dim)
    import videoanchor
    from videoanchor.anchor.solvers import precompile

    precompile.wait(900)

    def run():
        res = videoanchor.compute_anchor_scores(x, n_clusters=24)
        h = hashlib.sha1(res.scores.numpy().tobytes())
        h.update(res.labels.numpy().tobytes())
        return dict(solver=res.solver, digest=h.hexdigest()[:12])

    run()  # (the first call: loads or compiles what it needs)
    return run


scores.cases = lambda: ["16x48x1024"]
