"""What call 4 ran (from the repository root, PYTHONPATH=.): the low-rank, thin and dense
factors' scores in float32 and fp16x3 on CUDA (reformatted for the linter after the run).
'ref64' was meant as a float64 reference, but run() solves in float32 whatever the input's
dtype, so it is the float32 low-rank run (hence its 0.0 in the log)."""

import sys

sys.path.insert(0, "tests")
from test_fast_solver import run, tokens  # noqa: E402

from videoanchor.anchor import admm  # noqa: E402

x = tokens(300, 96, k=5, seed=4).cuda()
ref64 = run(x.double(), 5, precision="full", mode="exact")
for prec in ("full", "fp16x3"):
    out = {}
    for thin in ("low_rank", "thin", "dense"):
        old = dict(admm.THIN)
        if thin == "thin":
            admm.THIN["low_rank_above"] = float("inf")
        if thin == "dense":
            admm.THIN["above"] = float("inf")
        r = run(x, 5, precision=prec, mode="exact")
        admm.THIN.update(old)
        out[thin] = r
        move = float((r.scores.double() - ref64.scores.double()).abs().max())
        print(prec, thin, "vs float64 dense-schedule:", move)
    print(
        prec, "low_rank vs dense", float((out["low_rank"].scores - out["dense"].scores).abs().max())
    )
