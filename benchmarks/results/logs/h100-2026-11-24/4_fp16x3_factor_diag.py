import sys, torch
sys.path.insert(0, "tests")
from videoanchor.anchor import admm
from test_fast_solver import tokens, run
x = tokens(300, 96, k=5, seed=4).cuda()
ref64 = run(x.double(), 5, precision="full", mode="exact")
for prec in ("full", "fp16x3"):
    out = {}
    for thin in ("low_rank", "thin", "dense"):
        old = dict(admm.THIN)
        if thin == "thin": admm.THIN["low_rank_above"] = float("inf")
        if thin == "dense": admm.THIN["above"] = float("inf")
        r = run(x, 5, precision=prec, mode="exact"); admm.THIN.update(old)
        out[thin] = r
        print(prec, thin, "vs float64 dense-schedule:", float((r.scores.double() - ref64.scores.double()).abs().max()))
    print(prec, "low_rank vs dense", float((out["low_rank"].scores - out["dense"].scores).abs().max()))
