"""The compiled variants of Triton launches, read without a GPU (issue 98 items 1 and 4):
each launch of a wrapped kernel is bound by Triton's own binder for a CUDA target
(``JITFunction`` built from the kernel's Python function and decorator arguments,
``create_function_from_signature`` with the NVIDIA backend for ``sm_90``), which gives the
specialization that a compiled launch keys its cache with: each argument's type
(``*fp64``, ``i32``, ``fp32``, ``constexpr`` ...) and attributes (alignment, the value 1).
Equal keys: one compiled binary; a ``fp32`` where the kernel computes in float64: the
float32 scalar that compiled Triton makes of a Python float (the interpreter keeps
float64, so no value on the CPU shows it).

``record(monkeypatch, module, names, run=True)`` wraps ``module.<name>`` kernels; each
launch appends ``(name, key)`` to the returned list (``run=False``: the launch is recorded
and not run)."""

from __future__ import annotations

import triton.runtime.jit as jit
from triton.backends import backends
from triton.backends.compiler import GPUTarget

TARGET = GPUTarget("cuda", 90, 32)


def _binder(kernel):
    fn = getattr(kernel, "fn", kernel)
    kwargs = {k: v for k, v in (getattr(kernel, "kwargs", None) or {}).items() if v is not None}
    if isinstance(kernel, jit.JITFunction):  # compiled mode: the kernel itself
        jf = kernel
    else:  # the interpreter's wrapper: its function with the decorator's arguments
        jf = jit.JITFunction(fn, **{k: v for k, v in kwargs.items()
                                    if k in ("do_not_specialize",
                                             "do_not_specialize_on_alignment")})  # fmt: skip
    backend = backends["nvidia"].compiler(TARGET)
    return jit.create_function_from_signature(jf.signature, jf.params, backend), jf


def key(kernel, args, kwargs) -> tuple:
    """The launch's cache key as compiled Triton forms it: the specialization of each
    argument, by name, and the options (``num_warps``, ``maxnreg`` ...)."""
    binder, jf = _binder(kernel)
    _, spec, options = binder(*args, **kwargs)
    names = [p.name for p in jf.params]
    return tuple(zip(names, (tuple(s) for s in spec), strict=True)) + tuple(sorted(options.items()))


class _Recorded:
    def __init__(self, name, kernel, seen, run):
        self.name, self.kernel, self.seen, self.run = name, kernel, seen, run

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((self.name, key(self.kernel, args, kwargs)))
            if self.run:
                return self.kernel[grid](*args, **kwargs)
            return None

        return launch


def record(monkeypatch, module, names, *, run: bool = True, seen: list | None = None) -> list:
    """``module``'s kernels ``names`` recorded into ``seen`` (returned)."""
    seen = [] if seen is None else seen
    for name in names:
        monkeypatch.setattr(module, name, _Recorded(name, getattr(module, name), seen, run))
    return seen


def scalar_types(seen) -> set:
    """``(kernel, argument, type)`` of every non-pointer, non-constexpr argument launched."""
    return {(name, arg, spec[0]) for name, k in seen for arg, spec in k
            if isinstance(spec, tuple) and spec and isinstance(spec[0], str)
            and spec[0] != "constexpr" and not spec[0].startswith("*")}  # fmt: skip
