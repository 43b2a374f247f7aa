"""Engine integrations: one subpackage per engine.

- :mod:`videoanchor.integrations.transformers`: ``attn_implementation="videoanchor_triton"``,
  :func:`~videoanchor.integrations.transformers.configure` and the per-family registry.

Only this layer knows model families and engines. It imports :mod:`videoanchor.kernels` and
:mod:`videoanchor.anchor` and nothing above it (``lint-imports`` checks the layers contract in
``pyproject.toml``). Importing this package imports no engine.
"""
