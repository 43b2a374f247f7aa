"""The warm route's bounds on dense ``C`` (one-off, after scene_certificates.py): the
default's working sets (``run_workset``) under its :class:`~videoanchor.anchor.solvers.
workset.Limits` and under wider warm bounds (``warm_work = 6 warm_set^2``, as issue 99 set
``cold_work``, with ``warm_share`` 2 and 8), on the scenes where the default does not certify
(scene_certificates_cpu.json) and on Extended Yale B (``C`` dense: where the warm route
fails, its budget is extra cost), alternated in one process: the route that answered, the
float64 gap, seconds. The variants are passed as ``limits=`` to ``run_workset`` for this
run; the package's default is not changed.

    python benchmarks/experiments/warm_limits.py
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import RESULTS_DIR, environment, finish, parser  # noqa: E402
from benchmarks.scene_family import scenes  # noqa: E402
from benchmarks.share_family import plain_sets  # noqa: E402

COLUMNS = ["set", "n", "d", "limits", "solver", "strategy", "residual", "seconds"]


def main() -> None:
    ap = parser(__doc__)
    ap.parse_args()
    from videoanchor.anchor.scores import ssc_coefficients
    from videoanchor.anchor.solvers import workset as ws

    variants = {"default": ws.LIMITS,
                "warm_work, share 2": ws.Limits(warm_work=6 * ws.LIMITS.warm_set**2,
                                                warm_share=2.0),
                "warm_work, share 8": ws.Limits(warm_work=6 * ws.LIMITS.warm_set**2,
                                                warm_share=8.0)}  # fmt: skip
    prior = json.loads((Path(RESULTS_DIR) / "scene_certificates_cpu.json").read_text())
    uncertified = {r["set"] for r in prior["rows"] if r["default_solver"] != "workset"}
    sets = [(n, m) for n, _, m in scenes() if n in uncertified]
    sets += [(n, m) for n, kind, m in plain_sets() if kind == "yaleb"]
    original = ws.run_workset
    rows = []
    try:
        for name, make in sets:
            x = make()
            if x is None:  # (Yale B's file is not here)
                continue
            for label, limits in variants.items():
                ws.run_workset = functools.partial(original, limits=limits)
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # (the fast answer's warning: recorded)
                    res = ssc_coefficients(x, progress=False)
                rows.append(dict(set=name, n=x.shape[0], d=x.shape[1], limits=label,
                                 solver=res.solver, strategy=res.strategy,
                                 residual=float(res.residual),
                                 seconds=time.perf_counter() - t, loadavg=os.getloadavg()))  # fmt: skip
                print({k: rows[-1][k] for k in COLUMNS}, flush=True)
    finally:
        ws.run_workset = original
    finish("warm_limits", environment("cpu"), rows, None, COLUMNS)


if __name__ == "__main__":
    main()
