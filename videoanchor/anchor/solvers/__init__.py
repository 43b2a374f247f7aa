"""The SSC solvers: one module per route of a plan (:data:`videoanchor.anchor.plan.ROUTES`),
each with the entry ``run(x, plan, opts, *, affine, outliers)`` (checked features, the plan,
the checked :class:`~videoanchor.anchor.options.SSCOptions`) to which
:data:`videoanchor.anchor.solve.SOLVERS` maps its route, and the code they share.

Routes:

- ``"workset_then_fast"``: :mod:`.workset`, the working sets on the CPU (the CPU's default;
  its Numba kernel in :mod:`._workset_kernel`), the fast solver's answer where ``C`` is dense;
- ``"workset_cuda"``: :mod:`.workset_cuda`, the working sets on the features' device (its
  Triton kernels in :mod:`._column_kernel` and :mod:`._pass_kernel`, imported on first use);
- ``"admm"``: :mod:`.admm`, the authors' ADMM (``solver="faithful"``) or the fast solver
  (``solver="fast"``) in torch, on any device;
- ``"admm_cupy"``: :mod:`.admm_cupy`, the same iteration on CuPy arrays;
- ``"blocked"``: :mod:`.blocked`, the authors' ADMM on column blocks (``mode="blocked"``);
- ``"equality"``: :mod:`.equality`, the constrained program (``data_term="exact"``);
- ``"workset_blocks"``: :mod:`.workset_blocks`, the working sets by column blocks against
  local dictionaries, certified against the full one (blocked mode with ``solver="workset"``).

Shared: :mod:`.admm_steps`, the ADMM iteration written once for every array namespace (its
steps, factors and the fast solver's schedule), and :mod:`.fast`, the fast solver's step on
torch with the outliers on an active set.

Importing this package imports no solver.
"""

from __future__ import annotations

__all__ = ["program_kwargs"]


def program_kwargs(opts) -> dict:
    """The program's keyword arguments that the checked options ``opts`` set
    (:meth:`~videoanchor.anchor.options.SSCOptions.program` but ``dtype``, which the plan
    holds), as each route's ``run`` passes them to its solver."""
    return {k: v for k, v in opts.program().items() if k != "dtype"}
