"""benchmarks/report.py: every figure draws, from the committed results and from rows shaped
like those of the benchmarks that have not run yet (GPU), and the page lists every file.

Needs matplotlib (the ``docs`` extra); CI runs this file again after installing it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the docs extra (matplotlib) is not installed")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

META = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.13.0", "git_sha": "0" * 40, "date": "x"}


def _result(tmp_path, stem, rows, **extra) -> report.Result:
    path = tmp_path / f"{stem}.json"
    data = {"meta": META, "rows": rows, **extra}
    path.write_text(json.dumps(data))
    return report.Result(path, data)


def _attention_rows():
    rows = []
    for model in ("qwen2.5-vl-7b", "internvl2-8b"):
        for S in (2048, 8192):
            for i, provider in enumerate(("anchored", "sdpa_mask", "flex", "eager")):
                row = dict(model=model, S=S, B=1, dtype="bfloat16", provider=provider)
                if provider == "eager" and S == 8192:
                    row["error"] = "out of memory"
                else:
                    row.update(ms=1.0 + i * S / 4096, tflops=100.0)
                rows.append(row)
    return rows


def _decode_rows():
    rows = [
        dict(section="decode", B=B, S=S, provider=p, ms=0.1, fraction_of_copy_bw=f * S / 65536)
        for B in (1, 8) for S in (4096, 65536)
        for p, f in (("anchored_split_kv", 0.8), ("sdpa_mask", 0.4), ("flex", 0.5))
    ]  # fmt: skip
    return rows + [dict(section="varlen", provider="anchored", lengths=[1, 2], ms=0.2)]


def _prefill_rows(size_key):
    return [
        {size_key: n, "provider": p, "prefill_ms": 10.0 * n * (1 + i), "dtype": "bfloat16",
         "model": "qwen2.5-vl-7b-dims"}
        for n in (1, 2, 4) for i, p in enumerate(("sdpa", "videoanchor", "eager"))
    ]  # fmt: skip


def test_figures_for_benchmarks_not_run_yet(tmp_path):
    cases = [
        _result(tmp_path, "attention_nvidia-h100", _attention_rows()),
        _result(tmp_path, "decode_nvidia-h100", _decode_rows()),
        _result(tmp_path, "integration_nvidia-h100", _prefill_rows("visual_tokens")),
        _result(tmp_path, "tp_nvidia-h100", _prefill_rows("world_size")),
    ]
    for r in cases:
        fn = report.FIGURES_BY_AREA[r.area]
        fig, caption = fn(r, cases)
        svg = report.svg_bytes(fig)
        assert svg.startswith(b"<?xml") and len(svg) > 2000 and caption
    # the speedup lines are the baseline's time over ours: 3 baselines x 2 models panels
    fig, _ = report.fig_attention(cases[0], cases)
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() != "_nolegend_"]
    ys = {(ln.get_label(), tuple(ln.get_xdata())): tuple(ln.get_ydata()) for ln in lines}
    assert ys[("sdpa_mask", (2048, 8192))] == pytest.approx((1.5, 3.0))
    assert ys[("eager", (2048,))] == pytest.approx((2.5,))  # the OOM point is left out


def test_figure_needs_the_rows_it_draws(tmp_path):
    for area, fn in report.FIGURES_BY_AREA.items():
        r = _result(tmp_path, f"{area}_cpu", [])
        assert fn(r, [r]) is None, area


def test_page_lists_every_committed_result():
    results, _ = report.committed_results()
    assert results, "no committed benchmark results found"
    text, figures = report.build(results, [])
    for r in results:
        assert f"Table: {r.path.name}" in text
        assert f"`benchmarks/results/{r.path.name}`" in text
        # a compile report without main-loop cases (sm_86: spills only) has no figure
        no_mix = r.area == "compile" and not r.data.get("instruction_mix")
        if r.area in report.FIGURES_BY_AREA and not no_mix:
            assert f"](figures/{r.stem}.svg)" in text and f"{r.stem}.svg" in figures
    assert all(data.startswith(b"<?xml") for data in figures.values())


def test_gate_cost_fragment_states_the_measured_ratios(tmp_path):
    """The gate-cost sentence quotes each form against the gates-off kernel, FlexAttention
    and SDPA flash, over the models, the shortest size apart from the others."""
    rows = []
    ms = {"ours_plain": 1.0, "anchored": 1.25, "anchored_general": 1.5, "flex": 1.25,
          "sdpa_flash": 2.0}  # fmt: skip
    for model, f in (("a", 1.0), ("b", 2.0)):
        for S, short in ((2048, 8.0), (8192, 1.0), (16384, 1.0)):
            for p, t in ms.items():
                slow = short if p.startswith("anchored") else 1.0
                rows.append(dict(model=model, S=S, dtype="bfloat16", provider=p,
                                 ms=t * f * slow * S))  # fmt: skip
    text = report._gate_cost_gpu([_result(tmp_path, "attention_gpu", rows)])
    assert "at S = 8192-16384 1.25x our kernel's own time with the gates off, 1.00x" in text
    assert "0.62x SDPA's flash" in text and "at S = 2048 10.00x, 8.00x and 5.00x" in text
    assert "general form (value scale inside the loop): at S = 8192-16384 1.50x" in text
    assert "12.00x" in text  # the general form at 2048: 1.5 * 8
    cpu = _result(tmp_path, "attention_cpu", rows)
    cpu.data["meta"] = dict(META, device="cpu (x86_64, 2 cores)")
    assert report._gate_cost_gpu([cpu]).startswith("No GPU timing")


def test_replaced_code_counts_for_no_current_route(tmp_path):
    """A GPU result of replaced code (report.SUPERSEDED: issue 76's deleted CUDA working-set
    kernel, at 5851f44) is labelled as such on the page, leaves the README's speed table, and
    the verification table says the CUDA default has not run on a GPU; a run of the same
    area at another commit is the current route's."""
    rows = [dict(model="Qwen2.5-VL-7B", frames=16, n=2048, tokens="video-like",
                 seconds_default=0.25, seconds_fast=0.16, seconds_prefill=0.16)]  # fmt: skip
    old = _result(tmp_path, "workset_cuda_nvidia-h100", rows)
    old.data["meta"] = dict(META, git_sha="5851f44cb52d419d9767aa13951b7e3e4fa45206")
    assert "issue 76" in report.superseded(old) and "**superseded**" in report.provenance(old)
    assert not any(r is old for _, r, _, _ in report._speed_rows([old]))
    table = report.verification_table([old], "docs/")
    cuda = [ln for ln in table.splitlines() if "the default on CUDA" in ln]
    assert len(cuda) == 1 and "**not yet**" in cuda[0] and "5851f44" in cuda[0]
    new = _result(tmp_path, "workset_cuda_nvidia-h200", rows)  # META: another commit
    assert report.superseded(new) is None and "superseded" not in report.provenance(new)
    speed = report._speed_rows([new])
    assert [what for what, r, _, _ in speed if r is new][0].startswith("Anchor scores, the default")
    assert f"`{new.path.name}` at 0000000" in report._speed_line([new], "docs/")
    cuda = [ln for ln in report.verification_table([new], "docs/").splitlines()
            if "the default on CUDA" in ln]  # fmt: skip
    assert f"yes: `{new.path.name}`" in cuda[0]
