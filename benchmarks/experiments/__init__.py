"""One-topic experiments whose results are recorded in ``benchmarks/results/logs/*/`` and the
docs: the scripts that made those counts, runnable again as modules from the repository root
(``python -m benchmarks.experiments.<topic> --help``). Unlike the ``bench_*.py`` scripts,
they write no canonical ``benchmarks/results/<area>_<device>.json``; their output goes
where they are told, usually the log folder their README describes.
"""
